"""Peak memory against the number of samples: a LLaVA-format JSON of 10k vs 200k samples.

Each figure is the peak RSS of a fresh process (VmHWM) that does one thing:
  eager  json.load of the whole file (what `read_records` did before it was lazy)
  lazy   mllm.data.records.read_records + one pass over every record (what ConversationDataset's
         load-time structure check does)
  train  a tiny MultimodalLM trains 3 steps on the file (ConversationDataset, BatchOrder, engine)
The per-sample figure is (RSS(big) - RSS(small)) / (big - small). Usage:
  python bench/scale.py [--small 10000] [--big 200000] [--modes eager,lazy,train] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_IMAGES = 8
WORDS = (
    "red green blue yellow circle square triangle large small left right top bottom above below the a "
    "of is there how many what color shape pointing up down"
).split()


def write_llava(path: Path, n: int, seed: int = 0) -> Path:
    """n LLaVA records (two to four turns, an image each, ~400 bytes), streamed to disk, plus images."""
    from PIL import Image

    rng = random.Random(seed)
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    for k in range(N_IMAGES):
        if not (images / f"{k}.png").is_file():
            Image.new("RGB", (32, 32), (30 * k, 200 - 20 * k, 90)).save(images / f"{k}.png")
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(n):
            turns = [
                {"from": "human", "value": "<image>\n" + " ".join(rng.choices(WORDS, k=12)) + "?"},
                {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(4, 20)))},
            ]
            if rng.random() < 0.5:
                turns += [
                    {"from": "human", "value": " ".join(rng.choices(WORDS, k=8)) + "?"},
                    {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=6))},
                ]
            rec = {"id": f"{i:09d}", "image": f"images/{i % N_IMAGES}.png", "conversations": turns}
            f.write(("" if i == 0 else ",\n") + json.dumps(rec))
        f.write("\n]\n")
    return path


def _peak_mb() -> float:
    """This process's peak RSS: VmHWM, which (unlike ru_maxrss) is not inherited from a big parent
    through fork + exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_mode(mode: str, path: Path, base: Path | None) -> dict:
    """In this process: do `mode` on `path`, return the peak RSS and the time it took."""
    if mode == "train":  # libraries first: the start figure is the baseline the data adds to
        import torch

        from mllm.config import recipe_from_dict
        from mllm.training.runner import train_recipe

        torch.set_num_threads(1)
    start_mb, t0 = _peak_mb(), time.time()
    if mode == "eager":
        with open(path) as f:
            n = len(json.load(f))
    elif mode == "lazy":
        from mllm.data.records import read_records

        recs = read_records(path)
        n = sum(1 for r in recs if isinstance(r, dict))
    elif mode == "train":
        rec = {
            "name": "scale",
            "model": {"init_from": str(base)},
            "stages": [
                {
                    "name": "s",
                    "kind": "instruct",
                    "data": {"json": str(path), "images": str(path.parent)},
                    "lr": 1e-3,
                    "batch_size": 4,
                    "max_steps": 3,
                    "warmup_ratio": 0.0,
                }
            ],
            "engine": {"backend": "torch", "precision": "fp32", "progress": False, "threads": 1},
        }
        out = Path(tempfile.mkdtemp(prefix="scale-run-"))
        summary = train_recipe(recipe_from_dict(rec), out, log=lambda *a: None)
        n = summary["stages"]["s"]["steps"]
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return {
        "mode": mode,
        "n": n,
        "start_mb": round(start_mb, 1),
        "peak_mb": round(_peak_mb(), 1),
        "seconds": round(time.time() - t0, 2),
    }


def measure(mode: str, path: Path, base: Path | None = None, timeout: float = 900) -> dict:
    """`run_mode` in a fresh interpreter (peak RSS is per process and never goes down)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", mode, str(path)] + (
        [str(base)] if base else []
    )
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} on {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_base(out: Path) -> Path:
    """A tiny CLIP + Llama MultimodalLM with a tokenizer trained on the bench's words (saved once)."""
    import torch

    from encoders.towers import TowerConfig
    from mllm.model import MultimodalLM, build_lm
    from mllm.tokenizer import ensure_image_token, train_tokenizer

    if (out / "mllm.json").is_file():
        return out
    torch.manual_seed(0)
    tok = train_tokenizer([" ".join(WORDS)] * 20, vocab_size=300)
    ensure_image_token(tok, "<image>")
    lm = build_lm(
        None,
        dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        len(tok),
    )
    tower = TowerConfig(
        type="clip",
        select_layer=-1,
        config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
    )
    MultimodalLM.build(tower, "mlp2x_gelu", lm, tok, max_length=256).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--big", type=int, default=200_000)
    ap.add_argument("--modes", default="eager,lazy,train")
    ap.add_argument("--dir", default=None, help="where the JSON files go (default: a temporary folder)")
    ap.add_argument("--run", nargs="+", metavar="MODE PATH [BASE]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:  # the measured child
        mode, path, *base = args.run
        print(json.dumps(run_mode(mode, Path(path), Path(base[0]) if base else None)))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="scale-"))
    files = {}
    for n in (args.small, args.big):
        files[n] = root / f"llava-{n}" / "data.json"
        files[n].parent.mkdir(parents=True, exist_ok=True)
        if not files[n].is_file():
            write_llava(files[n], n)
    base = make_base(root / "base") if "train" in args.modes else None
    rows = []
    for mode in args.modes.split(","):
        small, big = measure(mode, files[args.small], base), measure(mode, files[args.big], base)
        per = (big["peak_mb"] - small["peak_mb"]) * 2**20 / (args.big - args.small)
        rows.append(
            {
                "mode": mode,
                "small": small,
                "big": big,
                "growth_mb": round(big["peak_mb"] - small["peak_mb"], 1),
                "bytes_per_sample": round(per, 1),
            }
        )
        print(
            f"{mode:6s} peak RSS {args.small}: {small['peak_mb']:.0f} MB ({small['seconds']}s)   "
            f"{args.big}: {big['peak_mb']:.0f} MB ({big['seconds']}s)   growth {rows[-1]['growth_mb']} MB = "
            f"{per:.0f} bytes/sample",
            flush=True,
        )
    size = files[args.big].stat().st_size / 2**20
    print(json.dumps({"file_mb": round(size, 1), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
