"""`mllm demo | synth | train | chat | eval`: the command line, a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Offline unless the user says otherwise: nothing here needs the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


def cmd_synth(args: argparse.Namespace) -> int:
    from mllm.data.geoworld import write_world

    manifest = write_world(args.out, seed=args.seed, n=args.n, size=args.size)
    print(json.dumps(manifest, indent=1))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mllm.config import load_recipe
    from mllm.training import distributed as D
    from mllm.training.runner import train_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or str(Path("runs") / recipe.name)
    summary = train_recipe(recipe, out, only=args.stage or None)
    if D.is_main():
        print(f"model: {summary.get('final')}\nchat:  mllm chat --model {out}")
    import torch.distributed as dist

    if dist.is_initialized():  # gloo may abort in its own teardown after a finished run (exit 134)
        D.shutdown_and_exit(0)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from mllm.inference import ChatSession
    from mllm.model import MultimodalLM
    from mllm.training.runner import resolve_model_dir

    model = MultimodalLM.from_pretrained(resolve_model_dir(args.model))
    session = ChatSession(model, max_new_tokens=args.max_new_tokens)
    if args.image:
        session.set_image(args.image)
    if args.prompt is not None:
        for piece in session.ask(args.prompt):
            print(piece, end="", flush=True)
        print()
        return 0
    print("mllm chat: /image PATH attaches an image, /reset clears the conversation, /quit leaves.")
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(path)
                print(f"(image {path} attached; new conversation)")
            except ValueError as e:
                print(f"error: {e}")
            continue
        if line.startswith("/"):
            print("unknown command; use /image PATH, /reset or /quit")
            continue
        try:
            for piece in session.ask(line):
                print(piece, end="", flush=True)
            print()
        except ValueError as e:
            print(f"error: {e}")


def cmd_eval(args: argparse.Namespace) -> int:
    from mllm.evaluation.mmvp import evaluate_mmvp
    from mllm.evaluation.qa import evaluate_qa
    from mllm.model import MultimodalLM
    from mllm.training.runner import resolve_model_dir

    model = MultimodalLM.from_pretrained(resolve_model_dir(args.model))
    runners = {"qa": lambda: evaluate_qa(model, args.data), "mmvp": lambda: evaluate_mmvp(model, args.data)}
    if args.bench not in runners:
        print(f"unknown benchmark {args.bench!r}; known: {sorted(runners)}", file=sys.stderr)
        return 2
    metrics, records = runners[args.bench]()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps(metrics, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mllm.demo import run_demo

    run_demo(args.out, overrides=args.overrides, n=args.n, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synth -> train (LM, align, instruct) -> evaluate, on the CPU in minutes")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=None, help="training scenes (default: the recipe's)")
    d.add_argument("--quick", action="store_true", help="a reduced run for tests (minutes -> seconds)")
    d.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", help="write a GeoWorld dataset and its benchmark sets")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--size", type=int, default=64)
    s.set_defaults(func=cmd_synth)

    t = sub.add_parser("train", help="run a recipe's stages")
    t.add_argument("--recipe", required=True)
    t.add_argument("--out", default=None)
    t.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    t.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    t.add_argument("overrides", nargs="*", help="key=value, e.g. engine.backend=torch stages.align.lr=1e-3")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("chat", help="talk to a trained model")
    c.add_argument("--model", required=True)
    c.add_argument("--image", default=None)
    c.add_argument("--prompt", default=None, help="answer once and exit")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="evaluate a model on a benchmark folder")
    e.add_argument("bench")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"mllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
