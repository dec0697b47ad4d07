"""Corrupted checkpoints: every checkpoint carries a manifest (size + sha256 of each file, as written);
resume verifies it, refuses a checkpoint whose file changed or vanished (naming the file, in the log)
and falls back to the newest good one; `mllm ckpt verify RUN` checks a run without training.

Faults injected on a real run's checkpoints: one byte flipped in the weights, a file truncated, a
file deleted, every checkpoint damaged. Each fallback resume must reproduce the uninterrupted run's
loss sequence exactly (the steps after the good checkpoint are trained again).
"""

from __future__ import annotations

import shutil

import pytest
from cluster_helpers import lm_recipe, losses, make_base, run_cli, tail, write_recipe

from mllm.cli import main
from mllm.training.manifest import MANIFEST, read_manifest, verify
from mllm.training.preemption import PREEMPTED_EXIT


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A run stopped (preempted) after step 4 with checkpoints at steps 1-4, and the uninterrupted losses."""
    root = tmp_path_factory.mktemp("corrupt")
    setup = make_base(root)
    rec = write_recipe(lm_recipe(setup, checkpoint_every=1, keep_last=4), root / "r.yaml")
    ref, log = root / "ref", root / "ref.log"
    assert run_cli(["train", "--recipe", str(rec), "--out", str(ref)], log) == 0, tail(log)
    stopped = root / "stopped"
    code = run_cli(["train", "--recipe", str(rec), "--out", str(stopped)], log, MLLM_FAULT="term_mid_step:4")
    assert code == PREEMPTED_EXIT, tail(log)
    return root, rec, stopped, losses(ref)


def _copy(bench, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bench[2], run)
    return run, run / "s" / "checkpoints"


def _flip_byte(path, offset=-9):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_manifest_of_its_files(bench):
    ckpt = bench[2] / "s" / "checkpoints" / "step-00000004"
    entries = read_manifest(ckpt)
    assert set(entries) == {
        "trainable.safetensors",
        "optimizer.pt",
        "optimizer_params.json",
        "scheduler.json",
        "rng_rank0.safetensors",
        "rng_rank0.json",
        "trainer_state.json",
    }
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in entries.values())
    assert verify(ckpt) == []


def test_resume_refuses_a_changed_checkpoint_and_falls_back(bench, tmp_path, capsys):
    root, rec, _, want = bench
    run, ckpts = _copy(bench, tmp_path)
    bad = ckpts / "step-00000004" / "trainable.safetensors"
    _flip_byte(bad)
    assert main(["ckpt", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"BAD   {ckpts / 'step-00000004'}" in out and f"{bad}: contents changed" in out, out
    assert "ok    " in out and "resume s: from step-00000003" in out, out
    log = tmp_path / "resume.log"
    assert run_cli(["train", "--recipe", str(rec), "--out", str(run)], log) == 0, tail(log)
    text = log.read_text()
    assert f"refusing checkpoint {ckpts / 'step-00000004'}: {bad}: contents changed" in text, text[-2000:]
    assert "resuming from step-00000003, the newest checkpoint that verifies" in text
    assert losses(run) == want  # step 4 trained again from step 3: the same sequence


def test_truncated_and_vanished_files_are_named(bench, tmp_path):
    root, rec, _, want = bench
    run, ckpts = _copy(bench, tmp_path)
    opt = ckpts / "step-00000004" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    (ckpts / "step-00000003" / "rng_rank0.json").unlink()
    problems4, problems3 = verify(ckpts / "step-00000004"), verify(ckpts / "step-00000003")
    assert problems4 == [
        f"{opt}: 100 bytes, {MANIFEST} says {read_manifest(ckpts / 'step-00000004')['optimizer.pt']['bytes']} (truncated or rewritten)"
    ]
    assert problems3 == [f"{ckpts / 'step-00000003' / 'rng_rank0.json'}: vanished (listed in {MANIFEST})"]
    log = tmp_path / "resume.log"
    assert run_cli(["train", "--recipe", str(rec), "--out", str(run)], log) == 0, tail(log)
    text = log.read_text()
    assert "refusing checkpoint" in text and "resuming from step-00000002" in text, text[-2000:]
    assert losses(run) == want


def test_no_trustworthy_checkpoint_stops_and_changes_nothing(bench, tmp_path):
    root, rec, _, _ = bench
    run, ckpts = _copy(bench, tmp_path)
    for step in range(1, 5):
        _flip_byte(ckpts / f"step-{step:08d}" / "scheduler.json", offset=2)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    log = tmp_path / "resume.log"
    assert run_cli(["train", "--recipe", str(rec), "--out", str(run)], log) == 1, tail(log)
    err = [ln for ln in log.read_text().splitlines() if ln.startswith("mllm train: error:")]
    assert len(err) == 1 and "no checkpoint in" in err[0] and "passes its manifest" in err[0], tail(log)
    assert all(f"step-0000000{s}:" in err[0] for s in range(1, 5)), err[0]
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before  # nothing moved or deleted
    assert len((run / "s" / "metrics.jsonl").read_text().splitlines()) == 4


def test_verify_command_on_good_old_and_empty_folders(bench, tmp_path, capsys):
    assert main(["ckpt", "verify", str(bench[2])]) == 0
    out = capsys.readouterr().out
    assert out.count("ok    ") == 4 and "4 checkpoint(s): 4 ok, 0 bad, 0 unverifiable" in out, out
    assert main(["ckpt", "verify", str(bench[2] / "s" / "checkpoints" / "step-00000002")]) == 0
    assert "1 checkpoint(s)" in capsys.readouterr().out
    run, ckpts = _copy(bench, tmp_path)
    (ckpts / "step-00000001" / MANIFEST).unlink()  # a checkpoint from before checksums
    assert main(["ckpt", "verify", str(run)]) == 0
    assert "old   " in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ckpt", "verify", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no checkpoint" in err, err


def test_resume_flag_refuses_a_folder_without_checkpoints(bench, tmp_path, capsys):
    rec = bench[1]
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        if folder.name == "empty":
            (folder / "s" / "checkpoints").mkdir(parents=True)
        before = sorted(p.name for p in folder.rglob("*")) if folder.exists() else None
        assert main(["train", "--recipe", str(rec), "--out", str(folder), "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "nothing to resume" in err, err
        assert (sorted(p.name for p in folder.rglob("*")) if folder.exists() else None) == before
