"""The text a default tokenizer is trained on: every string the recipe's stages will feed it.

When a recipe names no tokenizer, the first model built trains a byte-level BPE (mllm.tokenizer) on
its data files: every turn of LLaVA JSON (`corpus_from_records`), or, for a contrastive text tower,
every caption of GeoWorld captions.jsonl as well (`caption_corpus`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mllm.data.records import read_records


def corpus_from_records(paths: list[Path]) -> list[str]:
    """Every turn's text in the given LLaVA files (the default tokenizer is trained on them)."""
    texts = []
    for p in paths:
        for rec in read_records(p):
            for turn in rec.get("conversations", []) if isinstance(rec, dict) else []:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    texts.append(turn["value"].replace("<image>", ""))
    return texts


def caption_corpus(paths: Sequence[Path]) -> list[str]:
    """Every caption string in the given files: GeoWorld captions.jsonl (short, long, negatives) or
    LLaVA JSON (every turn), so the tokenizer covers whatever the stages will feed the text tower."""
    texts: list[str] = []
    for p in paths:
        p = Path(p)
        if p.suffix == ".jsonl" and p.is_file():
            for rec in read_records(p):
                if not isinstance(rec, dict):
                    continue
                texts += [rec[k] for k in ("short", "long") if isinstance(rec.get(k), str)]
                # mllm.data.geoworld.rewrites: the other captions a contrastive stage may pick
                texts += [rec[k] for k in ("noisy", "synthetic") if isinstance(rec.get(k), str)]
                texts += [
                    t for k in ("rewrites", "sub_captions") for t in rec.get(k) or () if isinstance(t, str)
                ]
                negs = rec.get("negatives")
                if isinstance(negs, dict):
                    texts += [v for v in negs.values() if isinstance(v, str)]
        if p.suffix == ".json" and p.is_file():
            texts += corpus_from_records([p])
    return texts
