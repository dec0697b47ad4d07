"""Shared by the cluster-life tests (preemption, storage faults, corruption, world size, run lock): a tiny
text-only LM stage, real `mllm train` processes (forkserver children that run the CLI's own `main`, or
subprocesses launched as torchrun does), and readers for what a run leaves on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from helpers import subprocess_env, tiny_recipe, write_tiny_world
from safetensors.torch import load_file
from test_faults import _CTX, _child_env, _text_records

from mllm.config import recipe_from_dict
from mllm.training.distributed import free_port
from mllm.training.runner import build_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
CHILD_TIMEOUT_S = 300


def make_base(root: Path) -> tuple[dict[str, Path], Path, Path]:
    """The tiny world, a text corpus and a saved base model (built in a child: no threads left here)."""
    world = write_tiny_world(root / "world", n=8)
    text = root / "text.json"
    text.write_text(json.dumps(_text_records()))
    base = root / "base"
    proc = _CTX.Process(target=_build_base, args=(tiny_recipe(world), root / "tok", text, base))
    proc.start()
    proc.join(CHILD_TIMEOUT_S)
    assert proc.exitcode == 0 and base.is_dir(), f"building the base model failed ({proc.exitcode})"
    return world, text, base


def _build_base(recipe: dict, tok: Path, text: Path, base: Path) -> None:
    torch.set_num_threads(1)
    build_model(recipe_from_dict(recipe).model, tok, [text], seed=0).save_pretrained(base)


def lm_recipe(
    setup: tuple[dict[str, Path], Path, Path],
    kind: str = "torch",
    nproc: int = 1,
    global_batch: int = 4,
    steps: int = STEPS,
    **engine,
) -> dict:
    """An lm_pretrain stage `s` of `steps` optimiser steps over `global_batch` samples each: batch_size 2
    a process, grad_accum making up the rest. `kind`: torch, zero2 or zero3."""
    world, text, base = setup
    backend, zero = ("torch", None) if kind == "torch" else ("deepspeed", str(REPO / f"train/ds/{kind}.json"))
    rec = tiny_recipe(world, backend, zero, steps=(1, steps))
    ga = global_batch // (2 * nproc)
    rec["stages"] = [
        dict(
            rec["stages"][1],
            name="s",
            kind="lm_pretrain",
            data={"json": str(text)},
            grad_accum=ga,
            batch_size=2,
        )
    ]
    rec["model"]["init_from"] = str(base)
    rec["engine"].update(threads=1, checkpoint_every=0, keep_last=2, dist_timeout_s=60)
    rec["engine"].update(engine)
    return rec


def write_recipe(rec: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(rec))
    return path


# ---------------------------------------------------------------------------------------- processes
def _cli_main(argv: list[str], log: str, env: dict[str, str]) -> None:
    """A forkserver child running `mllm <argv>` in-process: its exit code is the CLI's."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(1)
        from mllm.cli import main

        code = main(argv)
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def start_cli(argv: list[str], log: Path, **env: str):
    """`mllm ARGV` in a forkserver child (imports already done), started; the Process object."""
    full = _child_env()
    full.update(env)
    proc = _CTX.Process(target=_cli_main, args=(argv, str(log), full))
    proc.start()
    return proc


def join(proc, log: Path, timeout_s: float = CHILD_TIMEOUT_S) -> int:
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"child {proc.pid} ran past {timeout_s}s; log: {log}\n{tail(log)}")
    return int(proc.exitcode)


def run_cli(argv: list[str], log: Path, **env: str) -> int:
    proc = start_cli(argv, log, **env)
    return join(proc, log)


def launch_ranks(
    recipe: Path, out: Path, nproc: int, per_rank: dict[int, dict[str, str]] | None = None, **env
):
    """`python -m mllm.cli train` once per rank, as torchrun launches them (gloo on the CPU)."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        extra = dict(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            **env,
            **(per_rank or {}).get(rank, {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mllm.cli", "train", "--recipe", str(recipe), "--out", str(out)],
                env=subprocess_env(REPO, **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout_s: float = CHILD_TIMEOUT_S) -> list[tuple[int, str]]:
    t0, out = time.monotonic(), []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"a rank was still running after {timeout_s}s") from None
        out.append((p.returncode, text))
    return out


def wait_for(predicate, timeout_s: float = 120.0, every_s: float = 0.02, alive=None) -> bool:
    """Poll until `predicate()`; False on timeout or when `alive()` says the process is gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        if alive is not None and not alive():
            return predicate()
        time.sleep(every_s)
    return False


# ---------------------------------------------------------------------------------------- readers
def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.is_file() else f"({path} missing)"


def metrics(run: Path) -> list[dict]:
    path = run / "s" / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            pass
    return out


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run)]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "s" / "final").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{f.name}:{k}"] = v
    return out


def traced(folder: Path) -> dict[int, list]:
    """step -> the sample ids all ranks trained at that step (sorted), from MLLM_TRACE_SAMPLES files."""
    steps: dict[int, list] = defaultdict(list)
    for f in sorted(folder.glob("rank*.jsonl")):
        for ln in f.read_text().splitlines():
            rec = json.loads(ln)
            steps[rec["step"]].extend(rec["ids"])
    return {s: sorted(ids, key=str) for s, ids in sorted(steps.items())}
