"""`mllm demo | synth | show | train | chat | serve | eval | view | probe | ckpt | report | plot`: the command line, a thin layer over the library."""

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

# Each command imports what it runs inside its function: `mllm --help`, `mllm report` and `mllm synth`
# then start without torch, transformers and DeepSpeed (seconds of import). The CLI is the top layer
# (tests/test_layering.py reads these imports too), so any module of the project may be imported here.


def cmd_synth(args: argparse.Namespace) -> int:
    from mllm.data.geoworld import write_world

    manifest = write_world(args.out, seed=args.seed, n=args.n, size=args.size)
    print(json.dumps(manifest, indent=1))
    if args.preview:
        from mllm.data.geoworld.preview import write_previews

        for path in write_previews(args.out, args.preview):
            print(f"preview: {path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from mllm.data.geoworld.preview import write_previews

    for path in write_previews(args.world, args.n, args.out):
        print(path)
    return 0


PLAN_FLAGS = ("gpus", "gpu", "gpu_memory", "mfu", "samples", "tokens", "json")


def _stage_numbers(items: list[str], flag: str) -> dict[str, float]:
    """`--samples align=558000 --samples instruct=665000` -> {"align": 558000.0, ...}."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"{flag} {item!r}: expected STAGE=NUMBER, e.g. {flag} align=558000")
    return out


def cmd_dry_run(args: argparse.Namespace) -> int:
    """`mllm train --dry-run`: the recipe planned on paper (mllm.planning), no weights, no GPU."""
    import contextlib

    from mllm.config import load_recipe
    from mllm.planning import plan_recipe, render_text
    from mllm.planning.plan import DEFAULT_MFU

    recipe = load_recipe(args.recipe, args.overrides)
    samples = _stage_numbers(args.samples, "--samples")
    tokens = _stage_numbers(args.tokens, "--tokens")
    # DeepSpeed's logger writes to stdout; a plan's stdout is the plan (and parseable JSON with --json).
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_recipe(
            recipe,
            gpus=8 if args.gpus is None else args.gpus,
            gpu=args.gpu or "h100",
            gpu_memory=args.gpu_memory,
            mfu=DEFAULT_MFU if args.mfu is None else args.mfu,
            samples=samples,
            tokens=tokens,
            only=args.stage or None,
        )
    print(json.dumps(plan.to_dict(), indent=1) if args.json else render_text(plan))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_dry_run(args)
    given = [f for f in PLAN_FLAGS if getattr(args, f) not in (None, [], False)]
    if given:
        raise ValueError(
            f"--{given[0].replace('_', '-')} describes a plan: add --dry-run (or drop it to train)"
        )
    from mllm.config import load_recipe
    from mllm.training.preemption import PreemptionWatch

    recipe = load_recipe(args.recipe, args.overrides)
    # Held until this command returns, past the run's own teardown: a signal after the last checkpoint is
    # recorded, not fatal (a finished run exits 0), and one during start-up stops the run before its first step.
    with PreemptionWatch(recipe.engine.preemption_signals) as watch:
        return _train(args, recipe, watch)


def _train(args: argparse.Namespace, recipe, watch) -> int:
    import torch.distributed as dist

    from mllm.training import distributed as D
    from mllm.training.checkpoint import CheckpointError
    from mllm.training.preemption import PREEMPTED_EXIT, Preempted, touch_marker
    from mllm.training.runlock import RunLocked
    from mllm.training.runner import train_recipe

    out = args.out or str(Path("runs") / recipe.name)
    evaluator = None
    if any(s.eval_every is not None for s in recipe.stages if not args.stage or s.name in args.stage):
        # Built here, above both layers: training takes an evaluator but never imports evaluation.
        from mllm.evaluation.periodic import make_evaluator

        evaluator = make_evaluator(recipe, only=args.stage or None)
    # Only a process group this command started is torn down with os._exit: a program that calls `main`
    # with its own group up (a test, a notebook) gets the status back instead of losing its process.
    owned = not dist.is_initialized()
    try:
        summary = train_recipe(
            recipe, out, only=args.stage or None, evaluator=evaluator, resume=args.resume, preempt=watch
        )
    except Preempted as e:  # exit 75 (EX_TEMPFAIL): train/launch.sh requeues the job on it
        touch_marker()
        if D.is_main():
            print(f"mllm train: {e}", file=sys.stderr, flush=True)
        return _leave(PREEMPTED_EXIT, owned)
    except (RunLocked, CheckpointError) as e:  # one line: another writer (2), the storage failed (1)
        if D.is_main():
            print(f"mllm train: error: {e}", file=sys.stderr, flush=True)
        return _leave(2 if isinstance(e, RunLocked) else 1, owned)
    except RuntimeError as e:
        if D.world_size() > 1 and D.comm_failure(e):  # a dead peer: say so, exit without a hanging teardown
            err = e if isinstance(e, D.DistributedError) else D.explain(e, "training")
            print(f"mllm train: error: {err}", file=sys.stderr, flush=True)
            os._exit(3)
        raise
    if D.is_main():
        print(
            f"model: {summary.get('final')}"
            + (f"\nchat:  mllm chat --model {out}" if recipe.model.kind == "mllm" else "")
        )
    return _leave(0, owned)  # gloo may abort in its own teardown after a finished run (exit 134)


def _leave(code: int, owned: bool) -> int:
    """`code` as the exit status; under a process group this command started, through shutdown_and_exit
    (gloo's teardown)."""
    import torch.distributed as dist

    from mllm.training import distributed as D

    if owned and dist.is_initialized():
        D.shutdown_and_exit(code)
    return code


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    from mllm.training.verify import render, verify_run

    verdicts, resume_from = verify_run(args.run)
    print(render(verdicts, resume_from))
    return 1 if any(v.status == "bad" for v in verdicts) else 0


def cmd_chat(args: argparse.Namespace) -> int:
    from mllm.inference import ChatSession
    from mllm.loading import resolve_model_dir
    from mllm.model import MultimodalLM

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
            path = line[len("/image") :].strip()
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
    from mllm.evaluation.agla import AglaConfig
    from mllm.evaluation.runner import parse_options, run_eval

    agla = AglaConfig(alpha=args.agla_alpha, beta=args.agla_beta, keep_ratio=args.agla_keep)
    metrics = run_eval(
        args.bench,
        args.data,
        args.out,
        model_dir=args.model,
        predictions=args.predictions,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        decoding=args.decoding,
        agla=agla,
        device=args.device,
        dtype=args.dtype,
        options=parse_options(args.option),
        limit=args.limit,
    )
    meta = metrics["meta"]
    if args.predictions:
        from mllm.evaluation.benchmarks import PREDICTION_LAYOUTS

        layout = meta["predictions_layout"]
        print(f"predictions: {args.predictions} read as {layout} ({PREDICTION_LAYOUTS[layout].doc})")
    print(json.dumps({k: v for k, v in metrics.items() if k != "meta"}, indent=1))
    from mllm.evaluation.benchmarks import report_paths

    json_path, jsonl_path = report_paths(args.out)
    print(f"rule: {meta['rule']}\nmetrics: {json_path}\nrecords: {jsonl_path}")
    return 0


def _print_result(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def cmd_probe_regions(args: argparse.Namespace) -> int:
    from mllm.evaluation.regions import run_regions

    _print_result(run_regions(args.model, args.scenes, args.images, args.limit, args.train_regions), args.out)
    return 0


def cmd_probe_dense(args: argparse.Namespace) -> int:
    from mllm.evaluation.dense_probe import run_dense_probe

    _print_result(
        run_dense_probe(
            args.type, args.tower, args.random, args.world, args.train_limit, args.steps, args.seed
        ),
        args.out,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mllm.evaluation.report import load_results, render

    text = render(load_results(args.results), references=not args.no_reference)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    # Imported here, not at the top: matplotlib costs about half a second to import (more on a first
    # run, which builds its font cache), and no other command needs it.
    from mllm.plotting import plot_run

    print(plot_run(args.run, args.out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # the optional `serve` extra
        raise ValueError(f"mllm serve needs {' and '.join(missing)}: pip install 'mllm[serve]'")
    from mllm.serving.app import ServeSettings
    from mllm.serving.images import ImageLimits
    from mllm.serving.server import load_for_serving, serve

    root = Path(args.image_root) if args.image_root else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"--image-root {root}: not a folder")
    settings = ServeSettings(
        model_name=args.name or Path(args.model).resolve().name,
        images=ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels, root=root),
        max_images=args.max_images,
        max_body_bytes=args.max_body_bytes,
        default_max_tokens=args.max_tokens,
        max_batch=args.max_batch,
        batch_window_s=args.batch_window_ms / 1000.0,
    )
    serve(load_for_serving(args.model, args.device, args.dtype), settings, args.host, args.port)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from mllm.viewer import build_view

    path = build_view(args.results, args.out, data=args.data, title=args.title, page_size=args.page_size)
    print(f"{path} (open it in a browser; it needs only its folder)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mllm.loading import resolve_model_dir
    from mllm.model import MultimodalLM

    model = MultimodalLM.from_pretrained(resolve_model_dir(args.model))
    if args.format == "hf":
        from mllm.hf_export import export_hf

        out = export_hf(model, args.out)
        print(f"{out}: LlavaForConditionalGeneration + LlavaProcessor (transformers from_pretrained)")
    else:
        out = model.save_pretrained(args.out)
        print(f"{out}: native mllm folder (MultimodalLM.from_pretrained)")
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from mllm.lora import merge_lora_dir

    out = merge_lora_dir(args.model, args.adapter, args.out)
    print(f"{out}: merged model (no adapter needed)")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from mllm.data.check import run_check

    return run_check(
        args.file, args.images, args.tokenizer, args.template, args.max_length, args.num_image_tokens
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from mllm.demo import run_demo

    run_demo(args.out, overrides=args.overrides, n=args.n, quick=args.quick, seed=args.seed)
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from mllm.evidence.claims import CLAIMS, get_claim
    from mllm.evidence.runner import BlockedClaim, run_arms, run_claim

    if args.claim == "summary":
        from mllm.evidence.report import summarize

        print(summarize(Path(args.out or "runs/evidence")), end="")
        return 0
    if args.claim == "list":
        for c in CLAIMS.values():
            state = (
                f"blocked: {c.blocked}" if c.blocked else f"{len(c.arms)} arms, {len(c.budgets)} budget(s)"
            )
            print(f"{c.name:11s} {c.title} [{state}]")
        return 0
    claim = get_claim(args.claim)
    if args.no_table and not args.arms:
        print("mllm evidence: --no-table needs --arms (the arms to train and evaluate)", file=sys.stderr)
        return 2
    where = dict(out=args.out or f"runs/evidence/{args.claim}", bases=args.bases, budget=args.budget)
    try:
        if args.no_table:
            costs = run_arms(claim, args.arms, args.seeds, quick=args.quick, **where)
        else:
            claim = claim.with_arms(args.arms) if args.arms else claim
            summary = run_claim(claim, args.seeds, scale=args.scale, quick=args.quick, **where)
    except BlockedClaim as e:
        print(f"mllm evidence: {e}", file=sys.stderr)
        return 2
    if args.no_table:
        for arm, by_seed in costs.items():
            for seed, cost in by_seed.items():
                print(f"{arm} s{seed}: trained in {cost['cpu_s']} CPU-s, evaluated")
        print("no table written (--no-table): run again without --arms for the claim's table")
        return 0
    for lv in summary["levels"]:
        print(f"budget {lv['budget']} ({lv['describe']}): {lv['table']}")
        for comp, v in lv["verdicts"].items():
            print(f"  {comp}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mllm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synth -> train (LM, align, instruct) -> evaluate, on the CPU in minutes")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--n", type=int, default=None, help="training scenes (default: the recipe's)")
    d.add_argument("--quick", action="store_true", help="a reduced run for tests (minutes -> seconds)")
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the world, the training streams and every stage (results differ per seed)",
    )
    d.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    d.set_defaults(func=cmd_demo)

    ev = sub.add_parser(
        "evidence",
        help="a seed paper's claim measured on GeoWorld: arms at equal compute, seeds, paired intervals",
    )
    from mllm.evidence.claims import CLAIMS  # plain data: cheap to import

    ev.add_argument(
        "claim",
        help=f"{' | '.join(CLAIMS)}; `list` (the claims) or `summary` "
        "(every claim's verdicts under --out, default runs/evidence)",
    )
    ev.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ev.add_argument("--out", default=None, help="the claim's folder (default runs/evidence/CLAIM)")
    ev.add_argument(
        "--bases",
        default=None,
        help="where each seed's base (`mllm demo --seed S`) lives or is built "
        "(default: OUT/../bases, shared by the claims)",
    )
    ev.add_argument("--budget", type=int, default=0, help="the budget level to run (0: the claim's first)")
    ev.add_argument(
        "--scale",
        action="store_true",
        help="while a comparison is unresolved, run the next budget, to the cap",
    )
    ev.add_argument(
        "--arms", nargs="+", default=None, help="only these arms and the comparisons between them"
    )
    ev.add_argument(
        "--no-table",
        action="store_true",
        help="with --arms: train and evaluate those arms (any, even one) and write no table, so that one "
        "seed's arms can run in parallel processes; a later run without --arms writes the table",
    )
    ev.add_argument("--quick", action="store_true", help="tiny sizes for tests (no evidence at all)")
    ev.set_defaults(func=cmd_evidence)

    s = sub.add_parser("synth", help="write a GeoWorld dataset and its benchmark sets")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--size", type=int, default=64)
    s.add_argument(
        "--preview",
        type=int,
        default=0,
        metavar="N",
        help="also draw N scenes with captions and QA (OUT/preview.png) and the MMVP pairs (OUT/preview_mmvp.png)",
    )
    s.set_defaults(func=cmd_synth)

    sh = sub.add_parser(
        "show", help="contact sheets of a written GeoWorld: scenes with captions and QA, MMVP pairs (PNG)"
    )
    sh.add_argument("world", help="a folder written by `mllm synth`")
    sh.add_argument("--n", type=int, default=12, help="scenes on the sheet")
    sh.add_argument(
        "--out", default=None, help="the PNG (default WORLD/preview.png; pairs beside it, *_mmvp.png)"
    )
    sh.set_defaults(func=cmd_show)

    t = sub.add_parser("train", help="run a recipe's stages")
    t.add_argument(
        "--recipe",
        required=True,
        help="a recipe YAML file, or a packaged recipe by name (e.g. clip-tiny; mllm/recipes/)",
    )
    t.add_argument("--out", default=None)
    t.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    t.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    t.add_argument(
        "--resume",
        action="store_true",
        help="refuse to start: the run folder must hold a checkpoint or a finished stage (for requeued jobs)",
    )
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="plan instead of train: build every stage's model on the meta device (no weights, no GPU) and "
        "print parameters, tokens, memory a GPU under ZeRO-0/2/3/3+offload, FLOPs and time (docs/scale.md)",
    )
    t.add_argument("--gpus", type=int, default=None, help="dry run: GPUs (default 8)")
    t.add_argument(
        "--gpu", default=None, help="dry run: GPU preset h100 | h200 | a100 | a100-40gb (default h100)"
    )
    t.add_argument("--gpu-memory", type=float, default=None, help="dry run: GB a GPU (default: the preset's)")
    t.add_argument(
        "--mfu", type=float, default=None, help="dry run: model FLOPs utilisation in (0, 1] (default 0.4)"
    )
    t.add_argument(
        "--samples",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="dry run: samples of a stage whose data is not here",
    )
    t.add_argument(
        "--tokens",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="dry run: mean tokens a sample of a stage",
    )
    t.add_argument("--json", action="store_true", help="dry run: the plan as JSON")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. engine.backend=torch stages.align.lr=1e-3")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("chat", help="talk to a trained model")
    c.add_argument("--model", required=True)
    c.add_argument("--image", default=None)
    c.add_argument("--prompt", default=None, help="answer once and exit")
    c.add_argument("--max-new-tokens", type=int, default=128)
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="evaluate a model (or score a predictions file) on a benchmark folder")
    e.add_argument(
        "bench",
        help="mmvp | pope | mathverse | refcoco | qa | mmvp_vlm | retrieval (the last two "
        "take a contrastive model)",
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model or run folder: generate the answers")
    src.add_argument(
        "--predictions",
        help="answers produced elsewhere, scored: mllm's JSONL {<benchmark id>, response}, a LLaVA answers "
        "file, lmms-eval --log_samples output, MathVerse's output file or a VLMEvalKit table (.tsv/.xlsx)",
    )
    e.add_argument("--data", required=True, help="the benchmark folder in its official layout")
    e.add_argument("--out", required=True, help="metrics JSON; per-item records go beside it as .jsonl")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--decoding", choices=["greedy", "agla"], default="greedy")
    e.add_argument("--agla-alpha", type=float, default=2.0)
    e.add_argument("--agla-beta", type=float, default=0.5)
    e.add_argument("--agla-keep", type=float, default=0.5, help="share of patches the augmented view keeps")
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    e.add_argument("--limit", type=int, default=None, help="only the first N items (smoke tests)")
    e.add_argument(
        "--option",
        action="append",
        default=[],
        help="benchmark option key=value (e.g. letter_prompt=true, box_format=norm1000, "
        "answer_overrides=FILE.json, cot=true, split=testA, rule=official: the public scorer exactly, "
        "for pope and refcoco)",
    )
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser(
        "probe",
        help="vision-encoder evaluations outside the benchmark registry: "
        "`mllm probe regions` (CLOC/CLIP), `mllm probe dense` (a tower's patch tokens)",
    )
    psub = pr.add_subparsers(dest="probe_command", required=True)
    prr = psub.add_parser(
        "regions", help="region retrieval R@1 and grounding on GeoWorld scenes (mllm.evaluation.regions)"
    )
    prr.add_argument("--model", required=True, help="a CLOC or contrastive model folder")
    prr.add_argument(
        "--scenes", required=True, help="a GeoWorld scenes.jsonl (held-out: WORLD/eval/scenes.jsonl)"
    )
    prr.add_argument("--images", default=None, help="image root (default: the world folder)")
    prr.add_argument("--limit", type=int, default=None)
    prr.add_argument(
        "--train-regions",
        default=None,
        help="a training regions.jsonl: also report the mean-box reference for grounding",
    )
    prr.add_argument("--out", default=None, help="also write the result JSON here")
    prr.set_defaults(func=cmd_probe_regions)
    prd = psub.add_parser(
        "dense", help="per-patch colour/shape linear probe of a frozen tower (mllm.evaluation.dense_probe)"
    )
    prd.add_argument("--tower", help="a saved tower folder (HF), e.g. RUN/tips/final/image_tower")
    prd.add_argument("--type", required=True, help="tower type: clip | dinov2 | dinov2_registers | ...")
    prd.add_argument("--random", default=None, help="JSON config of an untrained tower (a baseline) instead")
    prd.add_argument("--world", required=True)
    prd.add_argument("--train-limit", type=int, default=1000)
    prd.add_argument("--steps", type=int, default=300)
    prd.add_argument("--seed", type=int, default=0)
    prd.add_argument("--out", default=None, help="also write the result JSON here")
    prd.set_defaults(func=cmd_probe_dense)

    x = sub.add_parser(
        "export", help="write a model as a transformers LLaVA folder (hf) or a native copy (mllm)"
    )
    x.add_argument("--model", required=True, help="a model or run folder")
    x.add_argument("--format", choices=["hf", "mllm"], default="hf")
    x.add_argument("--out", required=True)
    x.set_defaults(func=cmd_export)

    ml = sub.add_parser("merge-lora", help="fold a LoRA adapter (peft format) into its base model")
    ml.add_argument("--model", required=True, help="the base model folder the adapter was trained on")
    ml.add_argument("--adapter", required=True, help="the adapter folder (a stage's final/adapter)")
    ml.add_argument("--out", required=True)
    ml.set_defaults(func=cmd_merge_lora)

    dat = sub.add_parser("data", help="data tools: `mllm data check FILE --images DIR`")
    dsub = dat.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser(
        "check", help="list every problem in a LLaVA-format file (exit 1 if any error, 0 if clean)"
    )
    dc.add_argument("file", help="a LLaVA JSON list or JSONL file")
    dc.add_argument("--images", default=None, help="the image root (data.images; default: the file's folder)")
    dc.add_argument(
        "--tokenizer", default=None, help="a tokenizer or model folder: also tokenise every sample"
    )
    dc.add_argument(
        "--template", default="chatml", help="chat template for tokenising (plain for align data)"
    )
    dc.add_argument(
        "--max-length", type=int, default=None, help="refuse samples longer than this many tokens"
    )
    dc.add_argument("--num-image-tokens", type=int, default=1, help="positions one <image> expands to")
    dc.set_defaults(func=cmd_data_check)

    ck = sub.add_parser("ckpt", help="checkpoint tools: `mllm ckpt verify RUN`")
    cksub = ck.add_subparsers(dest="ckpt_command", required=True)
    cv = cksub.add_parser(
        "verify",
        help="check every checkpoint of a run against its manifest (sizes, sha256); exit 1 if any is bad",
    )
    cv.add_argument("run", help="a run folder (or a stage, checkpoints/ or one checkpoint folder)")
    cv.set_defaults(func=cmd_ckpt_verify)

    r = sub.add_parser("report", help="a markdown table across `mllm eval` results, beside published numbers")
    r.add_argument("results", nargs="+", help="metrics JSON files written by `mllm eval`")
    r.add_argument("--out", default=None)
    r.add_argument("--no-reference", action="store_true")
    r.set_defaults(func=cmd_report)

    pl = sub.add_parser(
        "plot", help="a run's learning curves (loss, learning rate, eval_every accuracy) as a PNG"
    )
    pl.add_argument("run", help="a run folder (its stages' metrics.jsonl and evals.jsonl)")
    pl.add_argument("--out", default=None, help="the PNG to write (default: RUN/curves.png)")
    pl.set_defaults(func=cmd_plot)

    vw = sub.add_parser(
        "view", help="`mllm eval` results as a static HTML report: every item, filters, disagreements first"
    )
    vw.add_argument(
        "results", nargs="+", help="metrics JSON files written by `mllm eval` (records beside them)"
    )
    vw.add_argument("--out", required=True, help="a folder: index.html and thumbs/ go there")
    vw.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[BENCH=]DIR",
        help="the benchmark folder, where it is no longer where the result says (meta.data)",
    )
    vw.add_argument("--title", default=None)
    vw.add_argument("--page-size", type=int, default=50, help="cards a page (the page can change it)")
    vw.set_defaults(func=cmd_view)

    sv = sub.add_parser(
        "serve",
        help="serve a model: the OpenAI chat completions API (/v1) and a chat page (/); docs/serving.md",
    )
    sv.add_argument("--model", required=True, help="a model or run folder")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="0: any free port (the start line names it)")
    sv.add_argument("--name", default=None, help="the model's name in the API (default: the folder's name)")
    sv.add_argument(
        "--image-root", default=None, help="allow image_url parts naming local files under this folder"
    )
    sv.add_argument("--max-image-bytes", type=int, default=10_000_000)
    sv.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    sv.add_argument("--max-images", type=int, default=1, help="images per conversation")
    sv.add_argument("--max-body-bytes", type=int, default=32_000_000)
    sv.add_argument("--max-tokens", type=int, default=256, help="answer length when a request names none")
    sv.add_argument("--max-batch", type=int, default=8, help="requests answered together at most")
    sv.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="how long a batch waits for more requests"
    )
    sv.add_argument("--device", default="auto")
    sv.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    sv.set_defaults(func=cmd_serve)
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
