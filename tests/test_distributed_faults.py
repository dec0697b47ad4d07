"""Distributed faults: with 2 processes (gloo on the CPU), one SIGKILLed mid-run must make the other
exit non-zero with a clear error in bounded time, never hang (the ZeRO-3 "hang forever" failure).

The two ranks are launched the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment), one with `MLLM_FAULT=after_step:2`. The recipe's `engine.dist_timeout_s` is small
(15 s); the test waits at most a generous multiple of it (subprocess timeouts, so it cannot hang).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import subprocess_env, tiny_recipe, write_tiny_world
from test_faults import _text_records

from mllm.config import recipe_from_dict
from mllm.training.distributed import free_port
from mllm.training.runner import build_model

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 15
WAIT_S = 240  # generous: start-up of two processes on a shared 2-core machine, plus the timeout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    world = write_tiny_world(root / "world", n=8)
    text = root / "text.json"
    text.write_text(json.dumps(_text_records()))
    base = root / "base"
    build_model(recipe_from_dict(tiny_recipe(world)).model, root / "tok", [text], seed=0).save_pretrained(
        base
    )
    return root, world, text, base


def _recipe(setup, backend: str, zero: str | None, steps: int = 40) -> Path:
    root, world, text, base = setup
    rec = tiny_recipe(world, backend, str(REPO / zero) if zero else None, steps=(1, steps))
    rec["stages"] = [
        dict(
            rec["stages"][1],
            name="s",
            kind="lm_pretrain",
            data={"json": str(text)},
            grad_accum=1,
            batch_size=2,
        )
    ]
    rec["model"]["init_from"] = str(base)
    rec["engine"].update(dist_timeout_s=TIMEOUT_S, threads=1, checkpoint_every=0)
    path = root / f"recipe-{backend}-{Path(zero or 'none').stem}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _launch(recipe: Path, out: Path, faults: dict[int, str]) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = subprocess_env(
            REPO,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            **({"MLLM_FAULT": faults[rank]} if rank in faults else {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mllm.cli", "train", "--recipe", str(recipe), "--out", str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int, str, float]]:
    t0 = time.monotonic()
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, WAIT_S - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank was still running after {WAIT_S}s: the survivor hangs") from None
        out.append((p.returncode, text, time.monotonic() - t0))
    return out


@pytest.mark.parametrize(
    "backend,zero",
    [("torch", None), pytest.param("deepspeed", "train/ds/zero3.json", marks=pytest.mark.slow)],
)
def test_survivor_exits_with_a_clear_error(setup, tmp_path, backend, zero):
    recipe = _recipe(setup, backend, zero)
    (r0, text0, _), (r1, text1, _) = _wait(_launch(recipe, tmp_path / "run", {1: "after_step:2"}))
    assert r1 == -9, text1[-3000:]
    assert r0 == 3, text0[-3000:]
    assert "rank 0" in text0 and "lost contact with the other processes" in text0, text0[-3000:]
    assert f"engine.dist_timeout_s={TIMEOUT_S}" in text0, text0[-3000:]
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][:2] == [1, 2] and len(metrics) <= 3


@pytest.mark.slow
def test_silent_peer_is_bounded_by_the_recipe_timeout(setup, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, connections open, silent): only the process-group timeout can free
    rank 0, and gloo's "Timed out" must come back as the clear error naming the recipe's timeout."""
    recipe = _recipe(setup, "torch", None)
    procs = _launch(recipe, tmp_path / "run", {1: "hang_after_step:2"})
    try:
        text0, _ = procs[0].communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"rank 0 still waiting after {WAIT_S}s: the timeout is not honoured") from None
    finally:
        procs[1].kill()
        procs[1].communicate(timeout=60)
    assert procs[0].returncode == 3, text0[-3000:]
    assert "lost contact with the other processes" in text0 and f"dist_timeout_s={TIMEOUT_S}" in text0, text0[
        -3000:
    ]
    assert "Timed out" in text0 or "timed out" in text0, text0[-3000:]


def test_two_ranks_train_normally(setup, tmp_path):
    """The control: the same launch without a fault finishes on both ranks."""
    recipe = _recipe(setup, "torch", None, steps=3)
    results = _wait(_launch(recipe, tmp_path / "run", {}))
    for code, text, _ in results:
        assert code == 0, text[-3000:]
