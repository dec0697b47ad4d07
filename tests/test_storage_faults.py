"""Storage faults during a checkpoint write: a full disk (ENOSPC) or an I/O error (EIO), injected by a
writer that fails part-way (`MLLM_FAULT=enospc_checkpoint:N` / `eio_checkpoint:N`: half a file written,
then the OSError naming it).

By default the run stops with one line naming the file and the cause; the last good checkpoint is
intact (its manifest verifies) and a resume from it reproduces the uninterrupted run exactly. With
`engine.checkpoint_retries: K` the run trains on and writes the checkpoint at the next interval.
`keep_last` never removes the last good checkpoint before a newer one is committed.
"""

from __future__ import annotations

import json

import pytest
from cluster_helpers import lm_recipe, losses, make_base, metrics, run_cli, tail, write_recipe

from mllm.config import ConfigError, recipe_from_dict
from mllm.training.checkpoint import SUPERSEDED_PREFIX, CheckpointManager
from mllm.training.manifest import verify


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    setup = make_base(root)
    ref = write_recipe(lm_recipe(setup, checkpoint_every=2), root / "ref.yaml")
    out, log = root / "ref", root / "ref.log"
    assert run_cli(["train", "--recipe", str(ref), "--out", str(out)], log) == 0, tail(log)
    return root, setup, losses(out)


def _ckpts(run):
    return CheckpointManager(run / "s" / "checkpoints")


@pytest.mark.parametrize(
    "fault,cause", [("enospc", "No space left on device"), ("eio", "Input/output error")]
)
def test_failed_write_stops_with_the_path_and_cause_and_keeps_the_last_good(bench, tmp_path, fault, cause):
    root, setup, want = bench
    rec = write_recipe(lm_recipe(setup, checkpoint_every=2, keep_last=1), tmp_path / "r.yaml")
    out, log = tmp_path / "run", tmp_path / "run.log"
    argv = ["train", "--recipe", str(rec), "--out", str(out)]
    assert run_cli(argv, log, MLLM_FAULT=f"{fault}_checkpoint:4") == 1, tail(log)
    err = [ln for ln in log.read_text().splitlines() if ln.startswith("mllm train: error:")]
    assert len(err) == 1, tail(log)
    assert "checkpoint step-00000004 not written" in err[0] and cause in err[0], err[0]
    assert ".tmp-step-00000004/rng_rank0.json" in err[0], err[0]  # the file the writer failed on
    assert "step-00000002, is intact" in err[0], err[0]
    mgr = _ckpts(out)
    assert mgr.steps() == [2] and not verify(mgr.root / "step-00000002")  # keep_last=1: still there
    assert not list(mgr.root.glob(".tmp-*")) and not (out / "train.lock").exists()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert run_cli(argv, log) == 0, tail(log)  # resume from step 2: the uninterrupted run, exactly
    assert losses(out) == want


def test_retry_setting_trains_on_and_saves_at_the_next_interval(bench, tmp_path):
    root, setup, want = bench
    rec = write_recipe(lm_recipe(setup, checkpoint_every=2, checkpoint_retries=1), tmp_path / "r.yaml")
    out, log = tmp_path / "run", tmp_path / "run.log"
    assert (
        run_cli(["train", "--recipe", str(rec), "--out", str(out)], log, MLLM_FAULT="eio_checkpoint:2") == 0
    ), tail(log)
    text = log.read_text()
    assert "warning: checkpoint step-00000002 not written" in text and "Input/output error" in text, text[
        -2000:
    ]
    assert "1 of engine.checkpoint_retries=1" in text
    assert _ckpts(out).steps() == [4, 6] and losses(out) == want
    # Two failures in a row exceed retries=1: the second one stops the run.
    out2 = tmp_path / "run2"
    code = run_cli(
        ["train", "--recipe", str(rec), "--out", str(out2)],
        log,
        MLLM_FAULT="eio_checkpoint:2,enospc_checkpoint:4",
    )
    assert code == 1 and "checkpoint step-00000004 not written" in log.read_text().splitlines()[-1], tail(log)
    assert _ckpts(out2).steps() == []


def test_negative_retry_setting_is_a_one_line_error(bench):
    rec = lm_recipe(bench[1])
    rec["engine"]["checkpoint_retries"] = -1
    with pytest.raises(ConfigError, match=r"^engine.checkpoint_retries=-1 must be >= 0"):
        recipe_from_dict(rec)


def test_keep_last_and_rewrites_never_drop_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    mgr = CheckpointManager(root, keep_last=1)

    def save(step: int, text: str) -> None:
        (mgr.begin(step) / "f.txt").write_text(text)
        mgr.commit(step, {})

    save(1, "one")
    (mgr.begin(2) / "f.txt").write_text("partial")  # a write that fails before its commit
    mgr.abort(2)
    assert mgr.steps() == [1] and mgr.latest().name == "step-00000001"
    save(2, "two")
    assert mgr.steps() == [2]  # pruned only once step 2 was committed
    # A step written again (after a resume) replaces the old folder only after the new one is in place;
    # a kill in between leaves it set aside, and the next run puts it back.
    (mgr.begin(2) / "f.txt").write_text("two again")
    (root / "step-00000002").rename(root / f"{SUPERSEDED_PREFIX}step-00000002")  # the kill point
    assert mgr.latest() is None
    mgr.clean_orphans()
    assert (root / "step-00000002" / "f.txt").read_text() == "two" and not list(root.glob(".tmp-*"))
    save(2, "two again")
    assert (root / "step-00000002" / "f.txt").read_text() == "two again"
    assert json.loads((root / "step-00000002" / "manifest.json").read_text())["kind"] == "checkpoint_manifest"
    assert [p.name for p in root.iterdir() if p.name.startswith(SUPERSEDED_PREFIX)] == []
