"""scripts/base_probe.py: a candidate base is built beside the demo from its finished stages (only what
the overrides change is trained), scored on the world's POPE, QA and MMVP, and a re-run only scores it."""

from __future__ import annotations

import json

from scripts_loader import load_script


def _script():
    return load_script("base_probe")


def test_a_candidate_is_built_from_the_demos_stages_and_scored(tmp_path, capsys):
    probe = _script()
    argv = ["--bases", str(tmp_path), "--seed", "0", "--name", "mix", "--quick"]
    argv += ["stages.instruct.data.live.existence_yes=0.9", "stages.instruct.data.live.existence_near=0.0"]
    out = probe.main(argv)
    assert out["shared_with_demo"] == ["lm_pretrain", "tower_warmup", "align"]  # only instruct trained
    assert set(out["pope"]) == {"random", "popular", "adversarial"}
    assert all(0 <= v["accuracy"] <= 100 and 0 <= v["yes_ratio"] <= 100 for v in out["pope"].values())
    assert 0 <= out["qa"] <= 100 and 0 <= out["mmvp"] <= 100
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and json.loads(last[7:]) == out
    cost = tmp_path / "s0" / "variants" / "mix" / "cost.json"
    stamp = cost.stat().st_mtime_ns
    assert probe.main(argv) == out  # a re-run scores the same model again, and trains nothing
    assert cost.stat().st_mtime_ns == stamp
