"""Scale without memory growth: a 200k-sample LLaVA JSON (~64 MB) is indexed, not held, and trains.

Figures from `python bench/scale.py` on this machine (peak RSS, VmHWM, 10k -> 200k samples):
json.load of the whole file grows by 344 MB (1897 bytes a sample); the lazy index by 3.3 MB (18 bytes
a sample: 12 bytes of offsets and lengths, plus allocator slack); a 3-step training run by 2.1 MB.
The bounds below (24 MB for the index, 48 MB for training) sit an order of magnitude under what an
eager load adds, and well over what the index needs, so they fail on a regression to eager parsing
(or to any per-sample Python object) and not on noise.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.scale import make_base, measure, write_llava  # noqa: E402
from mllm.data.records import DataError, read_records  # noqa: E402

SMALL, BIG = 10_000, 200_000
INDEX_BOUND_MB = 24
TRAIN_BOUND_MB = 48


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    out = {}
    for n in (SMALL, BIG):
        (root / str(n)).mkdir()
        out[n] = write_llava(root / str(n) / "data.json", n)
    return root, out


def test_lazy_index_does_not_grow_with_samples(files):
    _, f = files
    small, big = measure("lazy", f[SMALL]), measure("lazy", f[BIG])
    assert (small["n"], big["n"]) == (SMALL, BIG)
    growth = big["peak_mb"] - small["peak_mb"]
    print(
        f"lazy index: {small['peak_mb']} MB at {SMALL}, {big['peak_mb']} MB at {BIG} (growth {growth:.1f} MB)"
    )
    assert growth < INDEX_BOUND_MB, (small, big)


@pytest.mark.slow
def test_200k_samples_train_without_memory_growth(files):
    root, f = files
    base = make_base(root / "base")
    small, big = measure("train", f[SMALL], base), measure("train", f[BIG], base)
    assert small["n"] == big["n"] == 3  # three optimiser steps on each
    growth = big["peak_mb"] - small["peak_mb"]
    print(f"train: {small['peak_mb']} MB at {SMALL}, {big['peak_mb']} MB at {BIG} (growth {growth:.1f} MB)")
    assert growth < TRAIN_BOUND_MB, (small, big)


def test_lazy_records_match_json_load(files):
    _, f = files
    recs = read_records(f[SMALL])
    eager = json.loads(f[SMALL].read_text())
    assert len(recs) == len(eager)
    for i in (0, 1, 4999, -1):
        assert recs[i] == eager[i]
    assert recs[10:13] == eager[10:13]
    with pytest.raises(IndexError):
        recs[SMALL]


def test_lazy_reader_agrees_with_json_on_random_corruptions(tmp_path, monkeypatch):
    """Same accept/reject decision as json.loads, and the same line, on 300 corrupted files; small
    chunks so records straddle buffer refills (multi-byte UTF-8 and newlines inside strings too)."""
    import mllm.data.records as R

    monkeypatch.setattr(R, "CHUNK", 97)
    p = tmp_path / "a.json"
    for trial in range(300):
        rng = random.Random(trial)
        recs = [
            {"id": i, "x": "é漢\n" * rng.randint(0, 5), "n": [1, 2.5e3]} for i in range(rng.randint(1, 40))
        ]
        text = json.dumps(recs, indent=rng.choice([None, 1]), ensure_ascii=False)
        k = rng.randrange(len(text))
        text = text[:k] + rng.choice(["}", ",", "x", "", "]", '"', "[", "1"]) + text[k + 1 :]
        p.write_text(text)
        try:
            want = json.loads(text)
        except json.JSONDecodeError as e:
            with pytest.raises(DataError, match=rf"a\.json:{e.lineno}: JSON syntax error"):
                read_records(p)
            continue
        if isinstance(want, list):
            assert list(read_records(p)) == want, text
        else:
            with pytest.raises(DataError, match="expected a list of samples"):
                read_records(p)


def test_jsonl_and_forked_workers(tmp_path):
    """JSONL is indexed the same way; a DataLoader with forked workers reads records concurrently."""
    import torch
    from torch.utils.data import DataLoader

    p = tmp_path / "a.jsonl"
    rows = [{"id": i, "v": "x" * (i % 7)} for i in range(200)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = read_records(p)
    assert list(recs) == rows
    loader = DataLoader(
        recs,
        batch_size=16,
        num_workers=2,
        collate_fn=lambda b: [r["id"] for r in b],
        multiprocessing_context="fork",
    )
    assert [i for batch in loader for i in batch] == list(range(200))
    assert torch.get_num_threads() >= 1
