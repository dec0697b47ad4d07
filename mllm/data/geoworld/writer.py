"""`write_world`: one call writes the whole synthetic world (training data + benchmark sets).

Layout (all JSON paths relative to the stated root):

    OUT/images/000000.png ...         train images (PNG)
    OUT/scenes.jsonl                  {"id", "image", "scene"}            scene graphs
    OUT/align.json                    LLaVA blip_laion_cc_sbu_558k layout (prompt, framed long caption)
    OUT/instruct.json                 LLaVA mix665k layout, 2-4 QA turns per image
    OUT/captions.jsonl                {"id", "image", "short", "long", "negatives"}  (see `negatives`)
                                      + "rewrites", "noisy", "sub_captions", "synthetic" (`rewrites`)
    OUT/regions.jsonl                 {"id", "image", "width", "height", "regions": [{"box", "phrase"}]}
    OUT/eval/{images/,qa.jsonl,scenes.jsonl}                      held-out QA (see `heldout`)
    OUT/eval/captions.jsonl           {"id", "image", "short", "long"} of the held-out images (retrieval)
    OUT/mmvp_vlm/{Questions.csv,MLLM_VLM Images/<Type>/,scenes.jsonl}  (see `mmvp_vlm`)
    OUT/mmvp/{Questions.csv,MMVP Images/,patterns.json,scenes.jsonl}   (see `mmvp`)
    OUT/pope/{images/,geoworld_pope_*.json,scenes.jsonl}               (see `pope`)
    OUT/refcoco/{images/,refcoco_val.jsonl,scenes.jsonl}               (see `refcoco`)
    OUT/mathverse/{images/,testmini.json,testmini_text_only.json,scenes.jsonl}  (see `mathverse`)
    OUT/manifest.json                 seed, sizes, counts of every file, "version": 1
    OUT/.geoworld                     marker: lets a rewrite replace a half-written world safely

Train items come from the stream ("train", i) and every held-out item from its own stream; held-out
images identical to any earlier image are redrawn, so no benchmark image appears in training.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .files import read_jsonl, write_json, write_jsonl
from .heldout import default_n_eval, write_eval
from .language import (
    ALIGN_PROMPTS,
    align_caption,
    long_caption,
    multiple_choice,
    pick_turns,
    qa_pool,
    region_phrase,
    short_caption,
)
from .mathverse import write_mathverse
from .mmvp import PATTERNS, write_mmvp
from .mmvp_vlm import write_mmvp_vlm
from .negatives import hard_negatives
from .pope import SPLITS, write_pope
from .refcoco import write_refcoco
from .render import figure_regions, render, save_png
from .rewrites import caption_variants
from .sampling import pixel_key, stream, world_scene
from .scene import Scene, scene_from_dict

VERSION = 1
_OWNED_DIRS = ("images", "eval", "mmvp", "pope", "refcoco", "mathverse", "mmvp_vlm")
_OWNED_FILES = (
    "scenes.jsonl",
    "align.json",
    "instruct.json",
    "captions.jsonl",
    "regions.jsonl",
    "manifest.json",
)
#: Written first, so an interrupted write is still recognised (and replaced) as a GeoWorld folder.
MARKER = ".geoworld"


def _prepare(out: Path) -> None:
    """Make `out`; clear a previous (even half-written) world there, but never a folder that is not one."""
    out.mkdir(parents=True, exist_ok=True)
    owned = [out / d for d in _OWNED_DIRS] + [out / f for f in _OWNED_FILES]
    if not (out / MARKER).exists() and not (out / "manifest.json").exists():
        clash = [p.name for p in owned if p.exists()]
        if clash:
            raise FileExistsError(f"{out} holds {clash} but is not a GeoWorld folder; refusing to overwrite")
    for p in owned:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (out / MARKER).write_text(f"GeoWorld version {VERSION}\n", encoding="utf-8")


def _regions(scene: Scene) -> list[dict[str, Any]]:
    if scene.figure is not None:
        return [{"box": box, "phrase": phrase} for box, phrase in figure_regions(scene)]
    out = []
    for i, s in enumerate(scene.shapes):
        phrase = region_phrase(scene, i)
        if phrase:
            out.append({"box": list(s.box), "phrase": phrase})
    return out


def write_world(
    out: str | Path,
    seed: int,
    n: int = 2000,
    size: int = 64,
    n_eval: int | None = None,
    *,
    mmvp_pairs: int = 64,
    pope_questions: int = 300,
    refcoco_n: int = 200,
    mathverse_problems: int = 40,
    math_size: int = 256,
    math_frac: float = 0.1,
    max_shapes: int = 5,
    mc_frac: float = 0.2,
    mmvp_vlm_pairs: int = 8,
) -> dict[str, Any]:
    """Write a GeoWorld to `out` and return its manifest (also written to manifest.json).

    n: training scenes; size: image side in pixels (≥ 48; shapes keep radius ≥ 7 px);
    n_eval: held-out QA items (default n // 5, ≥ 10 per category, a multiple of the 8 categories,
    so 400 = 50 per category at n = 2000); mmvp_pairs: MMVP pairs (64 = 8 per pattern; official
    150); pope_questions: questions per POPE split (rounded to a multiple of 6; official 3,000);
    refcoco_n: referring expressions; mathverse_problems: problems, each written in 5 versions
    (+ Text Only; official testmini has 788); math_size: MathVerse figure width in px (text must
    stay legible); math_frac: share of training scenes that are labelled-triangle math figures;
    max_shapes: most primitives in a scene; mc_frac: share of instruct turns (of the closed-answer
    categories) asked MMVP-style, "{q} (a) X (b) Y" answered "(a)"/"(b)"; mmvp_vlm_pairs: MMVP-VLM
    pairs per pattern (official: 15 per pattern). Hard negatives and eval captions use their own
    RNG streams, so the other files are the same as without them.

    The same arguments always produce byte-identical files. An existing (or half-written) world in
    `out` is replaced; a folder that is not a world but holds one of the world's file or folder
    names is refused (FileExistsError) rather than overwritten.
    """
    if size < 48:
        raise ValueError("size must be at least 48 px for shapes to stay recognisable")
    if n < 1:
        raise ValueError("n must be positive")
    out = Path(out)
    _prepare(out)
    (out / "images").mkdir()
    n_eval = default_n_eval(n) if n_eval is None else n_eval

    seen: set[bytes] = set()
    scenes, align, instruct, captions, regions = [], [], [], [], []
    train_objects: list[set[str]] = []
    turns_total = boxes_total = 0
    for i in range(n):
        rng = stream(seed, "train", i)
        scene = world_scene(rng, size, math_frac, max_shapes)
        img = render(scene)
        seen.add(pixel_key(img))
        ident, image = f"{i:06d}", f"images/{i:06d}.png"
        save_png(img, out / image)
        train_objects.append(scene.objects())
        long = long_caption(scene)
        captions.append(
            {
                "id": ident,
                "image": image,
                "short": short_caption(scene, rng),
                "long": long,
                "negatives": hard_negatives(scene, stream(seed, "negatives", i)),
                # LaCLIP rewrites, ALIGN noisy, DreamLIP sub-captions, ALIP synthetic (own RNG stream)
                **caption_variants(scene, stream(seed, "caption-variants", i)),
            }
        )
        prompt = rng.choice(ALIGN_PROMPTS)
        align.append(
            {
                "id": ident,
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"{prompt}\n<image>"},
                    # Its own RNG stream, so the framing leaves every other draw (QA, eval) unchanged.
                    {"from": "gpt", "value": align_caption(scene, stream(seed, "align_caption", i))},
                ],
            }
        )
        conv = []
        for j, (cat, (q, a)) in enumerate(pick_turns(qa_pool(scene, rng), rng)):
            if rng.random() < mc_frac:
                q, a = multiple_choice(cat, q, a, rng) or (q, a)
            conv.append({"from": "human", "value": f"<image>\n{q}" if j == 0 else q})
            conv.append({"from": "gpt", "value": a})
        turns_total += len(conv) // 2
        instruct.append({"id": ident, "image": image, "conversations": conv})
        regs = _regions(scene)
        boxes_total += len(regs)
        regions.append(
            {"id": ident, "image": image, "width": scene.width, "height": scene.height, "regions": regs}
        )
        scenes.append({"id": ident, "image": image, "scene": scene.to_dict()})
    write_jsonl(out / "scenes.jsonl", scenes)
    write_json(out / "align.json", align)
    write_json(out / "instruct.json", instruct)
    write_jsonl(out / "captions.jsonl", captions)
    write_jsonl(out / "regions.jsonl", regions)

    eval_rows = write_eval(out, seed, n_eval, size, seen, max_shapes)
    mmvp_rows = write_mmvp(out, seed, mmvp_pairs, size, seen)
    pope_rows = write_pope(out, seed, pope_questions, size, seen, train_objects, max_shapes)
    ref_rows = write_refcoco(out, seed, refcoco_n, size, seen, max_shapes)
    mv_rows = write_mathverse(out, seed, mathverse_problems, math_size, seen)
    vlm_rows = write_mmvp_vlm(out, seed, mmvp_vlm_pairs, size, seen)
    eval_captions = [
        {
            "id": r["id"],
            "image": r["image"],
            "short": short_caption(sc, stream(seed, "eval-captions", i)),
            "long": long_caption(sc),
        }
        for i, r in enumerate(read_jsonl(out / "eval" / "scenes.jsonl"))
        for sc in [scene_from_dict(r["scene"])]
    ]
    write_jsonl(out / "eval" / "captions.jsonl", eval_captions)

    pope_images = len({r["image"] for r in pope_rows[SPLITS[0]]})
    counts: dict[str, int] = {
        "images": n,
        "scenes.jsonl": n,
        "align.json": n,
        "instruct.json": n,
        "instruct_turns": turns_total,
        "captions.jsonl": n,
        "regions.jsonl": n,
        "region_boxes": boxes_total,
        "eval/images": n_eval,
        "eval/qa.jsonl": len(eval_rows),
        "eval/scenes.jsonl": n_eval,
        "eval/captions.jsonl": len(eval_captions),
        "mmvp_vlm/Questions.csv": len(vlm_rows),
        "mmvp_vlm/MLLM_VLM Images": len(vlm_rows),
        "mmvp/MMVP Images": len(mmvp_rows),
        "mmvp/Questions.csv": len(mmvp_rows),
        "mmvp/patterns.json": len(mmvp_rows),
        "mmvp/scenes.jsonl": len(mmvp_rows),
        "pope/images": pope_images,
        "pope/scenes.jsonl": pope_images,
        **{f"pope/geoworld_pope_{s}.json": len(pope_rows[s]) for s in SPLITS},
        "refcoco/images": len(ref_rows),
        "refcoco/refcoco_val.jsonl": len(ref_rows),
        "refcoco/scenes.jsonl": len(ref_rows),
        "mathverse/images": 4 * mathverse_problems,
        "mathverse/scenes.jsonl": 4 * mathverse_problems,
        "mathverse/testmini.json": len(mv_rows),
        "mathverse/testmini_text_only.json": mathverse_problems,
    }
    manifest: dict[str, Any] = {
        "version": VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "n_eval": n_eval,
        "params": {
            "mmvp_pairs": mmvp_pairs,
            "pope_questions": pope_questions,
            "refcoco_n": refcoco_n,
            "mathverse_problems": mathverse_problems,
            "math_size": math_size,
            "math_frac": math_frac,
            "max_shapes": max_shapes,
            "mc_frac": mc_frac,
            "mmvp_vlm_pairs": mmvp_vlm_pairs,
        },
        "counts": counts,
        "eval_categories": dict(sorted(Counter(r["category"] for r in eval_rows).items())),
        "mmvp_patterns": dict(Counter(PATTERNS[k % len(PATTERNS)] for k in range(mmvp_pairs))),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


#: the held-out sets write_world draws after the training scenes, in order: each image is checked against
#: the training images and every set before it, so a larger set must see the same ones
HELD_OUT_ORDER: tuple[str, ...] = ("eval", "mmvp", "pope")


def write_held_out_at(world: str | Path, out: str | Path, bench: str, n: int) -> int:
    """A larger held-out set `bench` ("mmvp": `n` pairs; "pope": `n` questions per split) for a world
    already written, exactly as `write_world` would have written it with `mmvp_pairs=n` or
    `pope_questions=n` (files under `out/<bench>/`); returns the number of rows written.

    Why: methods differ by a point or two, which the world's 64 pairs or 300 questions per split cannot
    resolve (the official POPE has 3,000 per split). The draws are per item, so the world's own set is
    this set's first items, and the new ones are as held-out as it is: each is checked against every
    training image and every set write_world drew before it (re-rendered from the scene graphs, since
    MMVP's files are JPEG), and POPE's negatives use the training world's object statistics. `out` must
    not be the world itself.
    """
    world, out = Path(world), Path(out)
    if bench not in HELD_OUT_ORDER[1:]:
        raise ValueError(f"a larger held-out set is written for {HELD_OUT_ORDER[1:]}, not {bench!r}")
    if out.resolve() == world.resolve():
        raise ValueError(f"{out}: write the larger {bench} beside the world, not over its own set")
    manifest = json.loads((world / "manifest.json").read_text(encoding="utf-8"))
    seed, size, max_shapes = manifest["seed"], manifest["size"], manifest["params"]["max_shapes"]
    seen: set[bytes] = set()
    train_objects: list[set[str]] = []
    before = HELD_OUT_ORDER[: HELD_OUT_ORDER.index(bench)]
    for name in ["scenes.jsonl", *(f"{b}/scenes.jsonl" for b in before)]:
        for row in read_jsonl(world / name):
            scene = scene_from_dict(row["scene"])
            seen.add(pixel_key(render(scene)))
            if name == "scenes.jsonl":
                train_objects.append(scene.objects())
    if bench == "mmvp":
        return len(write_mmvp(out, seed, n, size, seen))
    rows = write_pope(out, seed, n, size, seen, train_objects, max_shapes)
    return sum(len(r) for r in rows.values())


def _strip_image(text: str) -> str:
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


def iter_text(out: str | Path) -> Iterator[str]:
    """Every caption, phrase, question, option and answer string of a written world.

    Meant as the corpus a tiny tokenizer is trained on; the `<image>` placeholder is removed
    (it is a special token, not text to be split into pieces). Strings repeat as often as the
    world uses them, so frequencies are the real ones.
    """
    out = Path(out)
    for row in read_jsonl(out / "captions.jsonl"):
        yield row["short"]
        yield row["long"]
    for name in ("align.json", "instruct.json"):
        for item in json.loads((out / name).read_text(encoding="utf-8")):
            for turn in item["conversations"]:
                yield _strip_image(turn["value"])
    for row in read_jsonl(out / "regions.jsonl"):
        for r in row["regions"]:
            yield r["phrase"]
    for row in read_jsonl(out / "eval" / "qa.jsonl"):
        yield row["question"]
        yield row["answer"]
    with open(out / "mmvp" / "Questions.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["Question"]
            yield row["Options"]
    for split in SPLITS:
        for row in read_jsonl(out / "pope" / f"geoworld_pope_{split}.json"):
            yield row["text"]
            yield row["label"]
    for row in read_jsonl(out / "refcoco" / "refcoco_val.jsonl"):
        yield row["sentence"]
    for name in ("testmini.json", "testmini_text_only.json"):
        for item in json.loads((out / "mathverse" / name).read_text(encoding="utf-8")):
            yield item["question"]
            yield item["query_wo"]
            yield item["query_cot"]
            yield item["answer"]
