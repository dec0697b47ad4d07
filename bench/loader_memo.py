"""What the demo's loaders cost per sample, and what two changes save: the tower warm-up's sample memo
(`data.cache_samples`, mllm.data.memo) and one tokenizer call per conversation (mllm.chat).

    python bench/loader_memo.py            # 600 warm-up rows, 400 live conversations
    python bench/loader_memo.py --quick

1. Warm-up sample: a GeoWorld row drawn again with the scene augmentation, its per-patch labels and
   density, and the demo tower's preprocessing (`SceneLabelDataset[i]`), against the same row from the
   memo (`MemoDataset[i]` once made). The warm-up reads each row ~8 times (400 steps x 64 / 3,000 rows).
2. Live instruct sample's tokenisation: `encode_conversation` (all segments in one tokenizer call)
   against the per-segment calls it replaced (written out here as the reference), on the same
   conversations; the outputs are checked equal.
Both pairs alternate in one process; the last line is `RESULT {json}` with the ratios.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch
from _common import alternate, machine, median, result

from encoders.supervised import PatchTargets
from encoders.towers import TINY_CONFIGS, TowerConfig, build_tower
from mllm.chat import IGNORE_INDEX, encode_conversation, get_template
from mllm.data.geoworld import write_world
from mllm.data.geoworld.augment import AugmentConfig
from mllm.data.geoworld.live import LiveWorldConfig, conversation, qa_turns
from mllm.data.geoworld.sampling import world_scene
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.data.memo import MemoDataset
from mllm.data.scene_labels import SceneLabelDataset
from mllm.tokenizer import ensure_image_token, train_tokenizer


def per_segment(conv, tok, image_id: int, n_image: int) -> list[int]:
    """The reference: mllm.chat.encode_conversation's ids before the change (one call per segment)."""
    turns = [("user" if t["from"] == "human" else "assistant", t["value"]) for t in conv]
    ids: list[int] = []
    for seg in get_template("chatml").render(turns, tok, False):
        for t in tok(seg.text, add_special_tokens=False)["input_ids"]:
            ids.extend([t] * n_image if t == image_id else [t])
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows, convs, repeats = (120, 80, 3) if args.quick else (600, 400, 5)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_world(
            root,
            seed=0,
            n=rows,
            size=64,
            n_eval=8,
            mmvp_pairs=1,
            pope_questions=2,
            refcoco_n=1,
            mathverse_problems=1,
            mmvp_vlm_pairs=1,
        )
        tower = build_tower(
            TowerConfig(type="resnet", config=TINY_CONFIGS["resnet"], select_layer=-1)
        )  # the demo's
        targets = PatchTargets(colours=COLOR_NAMES, shapes=SHAPES, density=True)
        made = SceneLabelDataset(
            root / "scenes.jsonl", root, targets, tower.grid, tower.preprocess, augment=AugmentConfig()
        )
        memo = MemoDataset(made)
        for i in range(len(made)):
            memo[i]
        warm = alternate(
            {
                "made": lambda: [made[i] for i in range(len(made))],
                "memo": lambda: [memo[i] for i in range(len(memo))],
            },
            repeats,
            log=print,
        )
    rng = random.Random(0)
    scenes = [world_scene(rng, 64) for _ in range(convs)]
    texts = [
        conversation(qa_turns(s, random.Random(i), LiveWorldConfig(turns=(3, 6))))
        for i, s in enumerate(scenes)
    ]
    tok = train_tokenizer([t["value"] for c in texts for t in c], 2048)  # as the demo's: GeoWorld's text
    image_id = ensure_image_token(tok)
    for c in texts:
        enc = encode_conversation(c, tok, "chatml", image_id, 64, 1)
        want = per_segment(c, tok, image_id, 64)
        if enc["input_ids"].tolist() != want or not (enc["labels"] != IGNORE_INDEX).any():
            sys.exit("encode_conversation differs from the per-segment reference")
    enc_t = alternate(
        {
            "per_segment": lambda: [per_segment(c, tok, image_id, 64) for c in texts],
            "one_call": lambda: [encode_conversation(c, tok, "chatml", image_id, 64, 1) for c in texts],
        },
        repeats,
        log=print,
    )
    m = {k: median(v) for k, v in {**warm, **enc_t}.items()}
    out = {
        "warmup_ms_per_sample_made": round(1e3 * m["made"] / rows, 3),
        "warmup_ms_per_sample_memo": round(1e3 * m["memo"] / rows, 4),
        "warmup_made_over_memo": round(m["made"] / m["memo"], 1),
        "tokenise_ms_per_conversation_per_segment": round(1e3 * m["per_segment"] / convs, 3),
        "tokenise_ms_per_conversation_one_call": round(1e3 * m["one_call"] / convs, 3),
        "tokenise_per_segment_over_one_call": round(m["per_segment"] / m["one_call"], 2),
        "machine": machine(),
    }
    result(out)


if __name__ == "__main__":
    main()
