"""Kill anywhere, resume exactly: randomised SIGKILL trials against one uninterrupted reference run.

Each trial draws 1-3 kill points (after a step, inside a checkpoint write, between the checkpoint's
rename and the `latest` update, halfway through a metrics line) at random steps, SIGKILLs a training
process there, checks the checkpoint folder's invariants after every kill, then lets a last process
finish. The finished run's loss sequence must equal the reference's exactly (fp32 on the CPU is
deterministic), and so must its final weights.

Every run is a real process killed by a real SIGKILL: a child forked from a `forkserver` process
that has imported torch, transformers and the trainer but never started a thread (so a launch costs
the training, not the imports). Forking the pytest process itself deadlocks once earlier tests have
left threads holding locks (OpenMP pools, W&B/TensorBoard writers): the child waits forever. Trials (the long tier, `-m slow`): `MLLM_FAULT_TRIALS` (default 24), seed: `MLLM_FAULT_SEED` (default 0); the quick tier runs three fixed ones. A failure
prints each failed trial's faults and the command that replays the same list.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import random
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe, write_tiny_world
from safetensors.torch import load_file

from mllm.config import recipe_from_dict
from mllm.training.checkpoint import CheckpointManager
from mllm.training.runner import build_model, train_recipe

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
KILL_POINTS = ("after_step", "mid_checkpoint", "before_latest", "mid_metrics")
CHILD_TIMEOUT_S = 300


def _text_records(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    out = []
    for i in range(n):
        c, s = rng.choice(colours), rng.choice(shapes)
        out.append(
            {
                "id": f"t{i}",
                "conversations": [
                    {"from": "human", "value": f"What color is the {s}?"},
                    {"from": "gpt", "value": f"The {s} is {c}."},
                ],
            }
        )
    return out


@dataclass(frozen=True)
class Setup:
    """One training configuration the trials run (each with its own uninterrupted reference)."""

    name: str
    recipe: dict


def _setups(world: dict[str, Path], text_json: Path, base: Path) -> dict[str, Setup]:
    def make(stage_kind: str, data: dict, backend: str, zero: str | None, ga: int) -> dict:
        rec = tiny_recipe(
            world, backend, str(REPO / zero) if zero else None, steps=(1, STEPS), checkpoint_every=1
        )
        st = rec["stages"][1]
        st.update(name="s", kind=stage_kind, data=data, grad_accum=ga, batch_size=4)
        rec["stages"] = [st]
        rec["model"]["init_from"] = str(base)
        rec["engine"].update(threads=1, keep_last=2)
        return rec

    text = {"json": str(text_json)}
    image = {"json": str(world["instruct"]), "images": str(world["images"])}
    return {
        "lm-torch": Setup("lm-torch", make("lm_pretrain", text, "torch", None, 2)),
        "image-torch": Setup("image-torch", make("instruct", image, "torch", None, 1)),
        "lm-zero2": Setup("lm-zero2", make("lm_pretrain", text, "deepspeed", "train/ds/zero2.json", 1)),
    }


def _child_env() -> dict[str, str]:
    """Environment of a launched training process: none of this process's process-group variables."""
    env = dict(os.environ)
    for k in ("MLLM_FAULT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "mllm.training.runner"])


def _child_main(fn: Callable[[], None], log: str, env: dict[str, str]) -> None:
    """The child: output to `log`, the given environment, one thread; its exit code says how `fn` ended."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(1)
        fn()
        code = 0
    except BaseException:  # noqa: BLE001 - reported through the log and the exit code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_in_child(
    fn: Callable[[], None], log: Path, fault: str | None = None, timeout_s: float = CHILD_TIMEOUT_S
) -> int:
    """Run `fn` (picklable) in a fresh child with `MLLM_FAULT=fault`; its exit code (-9 when SIGKILLed)."""
    env = _child_env()
    if fault:
        env["MLLM_FAULT"] = fault
    proc = _CTX.Process(target=_child_main, args=(fn, str(log), env))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise TimeoutError(f"training child {proc.pid} ran past {timeout_s}s; log: {log}")
    return int(proc.exitcode)


def _train_run(recipe: dict, out: Path) -> None:
    train_recipe(recipe_from_dict(recipe), out, log=lambda *a: None)


def _make_base(recipe: dict, corpus: list[Path], tok_dir: Path, base: Path) -> None:
    build_model(recipe_from_dict(recipe).model, tok_dir, corpus, seed=0).save_pretrained(base)


def _train(recipe: dict, out: Path) -> Callable[[], None]:
    return functools.partial(_train_run, recipe, out)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "s" / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "s" / "final").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.parent.name}/{f.name}:{k}"] = v
    return out


def _complete(ckpt: Path) -> bool:
    """A checkpoint folder has everything a resume reads."""
    if not (ckpt / "trainer_state.json").is_file() or not (ckpt / "rng_rank0.safetensors").is_file():
        return False
    return (ckpt / "trainable.safetensors").is_file() or (ckpt / "ds").is_dir()


def check_invariants(root: Path, fault: str, last_complete: int) -> list[str]:
    """What must hold in `root` (a stage's checkpoints/) right after a SIGKILL at `fault`."""
    errors = []
    mgr = CheckpointManager(root)
    for step in mgr.steps():
        if not _complete(root / mgr.name(step)):
            errors.append(f"step-{step} is incomplete")
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not (root / name).is_dir() or not _complete(root / name):
            errors.append(f"`latest` names {name!r}, which is missing or partial")
    got = mgr.latest()
    got_step = int(got.name.split("-")[1]) if got else 0
    if got_step != last_complete:
        errors.append(
            f"latest() resumes from step {got_step}, the last complete checkpoint is {last_complete}"
        )
    point, _, step = fault.partition(":")
    if point == "mid_checkpoint":
        tmp = root / f".tmp-{mgr.name(int(step))}"
        if not tmp.is_dir():
            errors.append(
                f"killed mid-checkpoint but {tmp.name} does not exist (the kill point was not reached?)"
            )
        if int(step) in mgr.steps():
            errors.append(f"the partial {tmp.name} is listed as a checkpoint")
    return errors


@dataclass
class Trial:
    index: int
    setup: str
    faults: list[str]

    def __str__(self) -> str:
        return f"trial {self.index} [{self.setup}] kills: {', '.join(self.faults) or '-'}"


def draw_trials(n: int, seed: int) -> list[Trial]:
    """Seeded: the same (n, seed) always gives the same list. One trial in 6 uses the image stage, one in
    6 DeepSpeed ZeRO-2, the rest the LM-only stage under plain torch."""
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        setup = "image-torch" if i % 6 == 1 else "lm-zero2" if i % 6 == 4 else "lm-torch"
        faults, done = [], 0
        for _ in range(rng.randint(1, 3)):
            if done >= STEPS:
                break
            point = rng.choice(KILL_POINTS)
            step = rng.randint(done + 1, STEPS)
            faults.append(f"{point}:{step}")
            # the last complete checkpoint after this kill (checkpoint_every=1)
            done = step if point in ("after_step", "before_latest") else step - 1
        trials.append(Trial(i, setup, faults))
    return trials


def expected_checkpoint(fault: str) -> int:
    point, _, step = fault.partition(":")
    return int(step) if point in ("after_step", "before_latest") else int(step) - 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    world = write_tiny_world(root / "world", n=16)
    text_json = root / "text.json"
    text_json.write_text(json.dumps(_text_records()))
    base = root / "base"

    make_base = functools.partial(
        _make_base, tiny_recipe(world), [world["align"], text_json], root / "tok", base
    )
    assert run_in_child(make_base, root / "base.log") == 0, (root / "base.log").read_text()[-3000:]
    setups = _setups(world, text_json, base)
    refs = {}
    for name, setup in setups.items():
        out = root / f"ref-{name}"
        code = run_in_child(_train(setup.recipe, out), root / f"ref-{name}.log")
        assert code == 0, (root / f"ref-{name}.log").read_text()[-3000:]
        refs[name] = ([m["loss"] for m in _metrics(out)], _final_weights(out))
        assert len(refs[name][0]) == STEPS
    return root, setups, refs


def run_trial(trial: Trial, root: Path, setups: dict[str, Setup], refs: dict) -> list[str]:
    recipe = setups[trial.setup].recipe
    out = root / f"trial-{trial.index}"
    log = root / f"trial-{trial.index}.log"
    errors: list[str] = []
    resumed = None
    for fault in trial.faults:
        code = run_in_child(_train(recipe, out), log, fault)
        if code != -signal.SIGKILL:
            return [f"{fault}: expected a SIGKILL, exit code {code}; log {log}:\n{log.read_text()[-2000:]}"]
        resumed = expected_checkpoint(fault)
        errors += [f"after {fault}: {e}" for e in check_invariants(out / "s" / "checkpoints", fault, resumed)]
    code = run_in_child(_train(recipe, out), log)
    if code != 0:
        return errors + [f"the resumed run failed (exit {code}); log {log}:\n{log.read_text()[-2000:]}"]
    summary = json.loads((out / "run.json").read_text())["stages"]["s"]
    if (summary["resumed_from"] or None) != (resumed or None):
        errors.append(f"resumed from {summary['resumed_from']}, expected {resumed}")
    leftovers = [p.name for p in (out / "s" / "checkpoints").glob(".tmp-*")]
    if leftovers:
        errors.append(f"temporary files left after the resumed run: {leftovers}")
    metrics = _metrics(out)
    want_losses, want_weights = refs[trial.setup]
    if [m["step"] for m in metrics] != list(range(1, STEPS + 1)):
        errors.append(f"metrics steps {[m['step'] for m in metrics]}")
    losses = [m["loss"] for m in metrics]
    if losses != want_losses:
        errors.append(
            f"loss sequence differs from the uninterrupted run:\n  got  {losses}\n  want {want_losses}"
        )
    weights = _final_weights(out)
    if set(weights) != set(want_weights) or any(
        not torch.equal(weights[k], want_weights[k]) for k in weights
    ):
        errors.append("final weights differ from the uninterrupted run's")
    return errors


def test_trials_are_seeded_and_cover_every_point():
    a, b = draw_trials(48, 0), draw_trials(48, 0)
    assert [str(t) for t in a] == [str(t) for t in b]
    points = {f.partition(":")[0] for t in a for f in t.faults}
    assert points == set(KILL_POINTS)
    assert {t.setup for t in a} == {"lm-torch", "image-torch", "lm-zero2"}


def _run_trials(trials: list[Trial], root: Path, setups: dict[str, Setup], refs: dict) -> list[str]:
    failures = []
    for trial in trials:
        errors = run_trial(trial, root, setups, refs)
        if errors:
            failures.append(f"{trial}\n    " + "\n    ".join(errors))
    return failures


#: the quick tier's trials: one SIGKILL at each kill point, every setup at least once, and one trial killed
#: twice (a resumed run killed again)
EACH_POINT = (
    Trial(0, "lm-torch", ["after_step:3"]),
    Trial(1, "image-torch", ["mid_checkpoint:4"]),
    Trial(2, "lm-zero2", ["before_latest:2", "mid_metrics:5"]),
)


def test_the_quick_trials_kill_at_every_point_in_every_setup():
    assert {f.partition(":")[0] for t in EACH_POINT for f in t.faults} == set(KILL_POINTS)
    assert {t.setup for t in EACH_POINT} == {"lm-torch", "image-torch", "lm-zero2"}


def test_a_kill_at_each_point_resumes_exactly(bench):
    """The quick tier's share of the randomised trials below (the long tier runs 24 of them)."""
    root, setups, refs = bench
    (root / "each-point").mkdir(exist_ok=True)
    failures = _run_trials(list(EACH_POINT), root / "each-point", setups, refs)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_kill_anywhere_resume_exactly(bench):
    root, setups, refs = bench
    n = int(os.environ.get("MLLM_FAULT_TRIALS", "24"))
    seed = int(os.environ.get("MLLM_FAULT_SEED", "0"))
    trials = draw_trials(n, seed)
    failures = _run_trials(trials, root, setups, refs)
    kills = sum(len(t.faults) for t in trials)
    summary = f"{len(trials)} trials, {kills} SIGKILLs, {len(failures)} failed"
    print(summary)
    assert not failures, (
        f"{summary} (replay: MLLM_FAULT_TRIALS={n} MLLM_FAULT_SEED={seed} pytest -m slow tests/test_faults.py)\n"
        + "\n".join(failures)
    )
