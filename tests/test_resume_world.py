"""Resume on another world size or backend (gloo on the CPU).

- 2 -> 1: DeepSpeed ZeRO-3 on 2 processes under `train/launch.sh` (the deepspeed launcher), preempted by
  SIGUSR1 sent to the script: it passes the signal to both ranks, both write the checkpoint, the script
  exits 75 and calls `scontrol requeue` (a stand-in on PATH); the run then resumes as plain torch in 1
  process.
- 1 -> 2: plain torch in 1 process, preempted at step 3; resumed under DeepSpeed ZeRO-2 on 2 processes.

Every run trains the same 4 samples an optimiser step (2 processes x batch 2, or 1 process x batch 2 x
grad_accum 2). Checked against one uninterrupted 1-process run: the samples of every step (the union over
ranks, from MLLM_TRACE_SAMPLES) are the same, so none is repeated or skipped; the losses after the
resume match to rtol 1e-5 (another process count reduces in another order: measured differences are
below 1e-6). `MLLM_WORLD_MATRIX=1` adds every other pairing of torch:1, zero2:1/2, zero3:1/2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_helpers import (
    REPO,
    STEPS,
    launch_ranks,
    lm_recipe,
    losses,
    make_base,
    metrics,
    run_cli,
    tail,
    traced,
    wait_all,
    wait_for,
    write_recipe,
)
from helpers import subprocess_env

from mllm.data.order import BatchOrder, continue_position
from mllm.data.samplers import ModalityLengthOrder
from mllm.training.checkpoint import CheckpointManager
from mllm.training.manifest import read_manifest
from mllm.training.preemption import PREEMPTED_EXIT

RTOL = 1e-5


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(g - w) <= RTOL * abs(w) for g, w in zip(got, want))


def test_data_position_continues_the_same_sample_stream():
    n = 30
    two = [BatchOrder(n, 2, 0, r, 2) for r in range(2)]  # 2 processes x 2 = 4 a micro-batch
    one = BatchOrder(n, 2, 0, 0, 1)  # 1 process x 2

    def stream(orders, start, stop):
        return [i for pos in range(start, stop) for o in orders for i in list(o.batches(pos, pos + 1))[0]]

    assert continue_position(3, 4, one) == 6 and continue_position(6, 2, two[0]) == 3
    assert stream(two, 0, 3) + stream([one], 6, 15) == stream([one], 0, 15)  # same samples, same order
    # Epoch 1, after its first micro-batch of 4 (epoch 0 had 8 micro-batches of 4; of 2, 15).
    assert continue_position(9, 4, one) == 15 + 2
    with pytest.raises(ValueError, match="not a whole number of this run's global micro-batches"):
        continue_position(3, 2, two[0])  # 6 samples in: batches of 4 would straddle them
    lengths = [5] * 12 + [-3] * 12
    grouped = ModalityLengthOrder(lengths, 2, 0, 0, 1)
    assert continue_position(6, 4, grouped) == 12  # an epoch boundary: allowed
    with pytest.raises(ValueError, match="ModalityLengthOrder orders samples differently"):
        continue_position(2, 4, grouped)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    setup = make_base(root)
    rec = write_recipe(lm_recipe(setup, "torch", 1), root / "ref.yaml")
    trace, log = root / "ref-trace", root / "ref.log"
    trace.mkdir()
    code = run_cli(
        ["train", "--recipe", str(rec), "--out", str(root / "ref")], log, MLLM_TRACE_SAMPLES=str(trace)
    )
    assert code == 0, tail(log)
    return root, setup, losses(root / "ref"), traced(trace)


def _check(bench, out: Path, trace: Path, stopped_at: int) -> None:
    _, _, want, want_samples = bench
    got = losses(out)
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))
    assert _close(got[:stopped_at], want[:stopped_at]), (got, want)
    assert _close(got[stopped_at:], want[stopped_at:]), f"after the resume:\n  got  {got}\n  want {want}"
    assert traced(trace) == want_samples  # every step trained exactly the reference's samples
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"{out}: stopped at step {stopped_at}, largest relative loss difference {worst:.1e}")


def _env(**extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # deepspeed, python
    return subprocess_env(REPO, OMP_NUM_THREADS="1", **{"PATH": path, **extra})


@pytest.mark.slow
def test_zero3_two_processes_under_launch_sh_resume_as_torch_one(bench, tmp_path):
    root, setup, _, _ = bench
    rec2 = write_recipe(lm_recipe(setup, "zero3", 2), tmp_path / "zero3.yaml")
    rec1 = write_recipe(lm_recipe(setup, "torch", 1), tmp_path / "torch.yaml")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (fake / "scontrol").chmod(0o755)
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    env = _env(NPROC="2", SLURM_JOB_ID="777", MLLM_TRACE_SAMPLES=str(trace))
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    script = [str(REPO / "train" / "launch.sh"), "train", "--recipe", str(rec2), "--out", str(out)]
    proc = subprocess.Popen(
        ["bash", *script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert wait_for(lambda: len(metrics(out)) >= 2, timeout_s=240, alive=lambda: proc.poll() is None)
        proc.send_signal(signal.SIGUSR1)
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == PREEMPTED_EXIT, text[-4000:]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "777"]
    assert text.count("SIGUSR1 received: finishing the optimiser step") == 2, text[-4000:]  # both ranks
    stopped = len(metrics(out))
    latest = CheckpointManager(out / "s" / "checkpoints").latest()
    assert 2 <= stopped < STEPS and latest.name == f"step-{stopped:08d}"
    files = set(read_manifest(latest))
    assert {"rng_rank0.json", "rng_rank1.json"} <= files  # every rank took part in the checkpoint
    assert {f"ds/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files
    log = tmp_path / "resume.log"
    assert (
        run_cli(["train", "--recipe", str(rec1), "--out", str(out)], log, MLLM_TRACE_SAMPLES=str(trace)) == 0
    ), tail(log)
    assert "written by 2 process(es) under deepspeed (ZeRO-3) with 1 under torch" in log.read_text()
    _check(bench, out, trace, stopped)


def test_torch_one_process_resumes_under_zero2_on_two(bench, tmp_path):
    root, setup, _, _ = bench
    rec1 = write_recipe(lm_recipe(setup, "torch", 1), tmp_path / "torch.yaml")
    rec2 = write_recipe(lm_recipe(setup, "zero2", 2), tmp_path / "zero2.yaml")
    out, trace, log = tmp_path / "run", tmp_path / "trace", tmp_path / "part1.log"
    trace.mkdir()
    argv = ["train", "--recipe", str(rec1), "--out", str(out)]
    assert (
        run_cli(argv, log, MLLM_FAULT="usr1_mid_step:3", MLLM_TRACE_SAMPLES=str(trace)) == PREEMPTED_EXIT
    ), tail(log)
    results = wait_all(launch_ranks(rec2, out, 2, MLLM_TRACE_SAMPLES=str(trace)), timeout_s=300)
    for code, text in results:
        assert code == 0, text[-4000:]
    assert "written by 1 process(es) under torch (ZeRO-0) with 2 under deepspeed (ZeRO-2)" in results[0][1]
    _check(bench, out, trace, 3)


MATRIX = [
    ("zero2", 2, "zero2", 1),
    ("zero2", 1, "zero3", 2),
    ("zero3", 2, "zero3", 1),
    ("zero3", 1, "zero2", 2),
    ("zero2", 2, "torch", 1),
    ("torch", 1, "zero3", 2),
    ("zero3", 2, "zero2", 2),
]


@pytest.mark.skipif(not os.environ.get("MLLM_WORLD_MATRIX"), reason="long variant: MLLM_WORLD_MATRIX=1")
@pytest.mark.parametrize("src,n,dst,m", MATRIX, ids=[f"{a}x{b}-to-{c}x{d}" for a, b, c, d in MATRIX])
def test_matrix(bench, tmp_path, src, n, dst, m):
    root, setup, _, _ = bench
    out, trace = tmp_path / "run", tmp_path / "trace"
    trace.mkdir()
    for part, (kind, nproc) in enumerate(((src, n), (dst, m))):
        rec = write_recipe(lm_recipe(setup, kind, nproc), tmp_path / f"{part}.yaml")
        fault = {"MLLM_FAULT": "term_mid_step:3"} if part == 0 else {}
        if nproc == 1:
            log = tmp_path / f"part{part}.log"
            code = run_cli(
                ["train", "--recipe", str(rec), "--out", str(out)],
                log,
                MLLM_TRACE_SAMPLES=str(trace),
                **fault,
            )
            assert code == (PREEMPTED_EXIT if part == 0 else 0), tail(log)
        else:
            per_rank = {nproc - 1: fault}  # the signal reaches one rank only: all stop together
            results = wait_all(launch_ranks(rec, out, nproc, per_rank, MLLM_TRACE_SAMPLES=str(trace)))
            for code, text in results:
                assert code == (PREEMPTED_EXIT if part == 0 else 0), text[-4000:]
    _check(bench, out, trace, 3)
