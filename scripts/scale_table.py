"""The GPU recipes' plans as the markdown tables of docs/scale.md, by running `mllm train --dry-run --json`.

Every packaged DeepSpeed recipe (the GPU ones) is planned on `--gpus` x `--gpu` at `--mfu`; the stages
that read LLaVA-1.5's own data files get those files' published sizes (558K captions, 665K instructions)
as `--samples`, the others have no sample count until their data is here.

    python scripts/scale_table.py [--gpus 8] [--gpu h100] [--mfu 0.4] > table.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from mllm.config import load_recipe, recipe_names

# LLaVA-1.5's data files by name -> their published sizes (LLaVA-1.5: "558K", "665K").
KNOWN_SIZES = {"blip_laion_cc_sbu_558k.json": 558_000, "llava_v1_5_mix665k.json": 665_000}


def plan(name: str, gpus: int, gpu: str, mfu: float) -> dict:
    recipe = load_recipe(name)
    samples = [
        f"--samples={s.name}={KNOWN_SIZES[s.data.json.rsplit('/', 1)[-1]]}"
        for s in recipe.stages
        if s.data.json and s.data.json.rsplit("/", 1)[-1] in KNOWN_SIZES
    ]
    cmd = [
        "mllm",
        "train",
        "--recipe",
        name,
        "--dry-run",
        "--json",
        f"--gpus={gpus}",
        f"--gpu={gpu}",
        f"--mfu={mfu}",
    ]
    out = subprocess.run([*cmd, *samples], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def hours(s: float | None) -> str:
    return "?" if s is None else (f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min")


def cell(z: dict) -> str:
    """Model states + activations, without and with gradient checkpointing (GiB), ✓/✗ against the GPU."""
    mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
    star = "*" if z["recipe"] else ""
    return f"{z['states_gib']:.1f} + act → {z['total_gib']:.0f} {mark(z['fits'])} / {z['total_gc_gib']:.0f} {mark(z['fits_gc'])}{star}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--mfu", type=float, default=0.4)
    args = ap.parse_args()
    names = [n for n in recipe_names() if load_recipe(n).engine.backend == "deepspeed"]
    print(
        "| recipe | stage | parameters | trainable | tokens a sample | ZeRO-2 GiB a GPU | ZeRO-3 GiB a GPU "
        "| TFLOP a sample | step | stage |"
    )
    print("|---|---|---:|---:|---|---|---|---:|---:|---:|")
    for name in names:
        p = plan(name, args.gpus, args.gpu, args.mfu)
        for s in p["stages"]:
            zero = {z["zero"]: z for z in s["zero"]}
            runs = ", ".join(
                f"{k} {v['count']:.0f}" + ("" if v["unit"] == "tokens" else f" ({v['unit']})")
                for k, v in s["tokens_by_module"].items()
                if k in ("lm", "tower", "tower2", "image_tower", "text_tower", "geo")
            )
            print(
                f"| {name} | {s['name']} | {count(s['params'])} | {count(s['trainable'])} | {runs} "
                f"| {cell(zero['2'])} | {cell(zero['3'])} | {s['flops_per_sample'] / 1e12:.3g} "
                f"| {s['step_s']:.2f} s | {hours(s['stage_s'])} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
