"""Peak memory and time of the `clip` and `siglip` objectives: ours (chunked) vs the naive full B x B matrix.

Naive = the usual implementation: logits = s * img @ txt.T (+ b) as one matrix, then
(CE(logits) + CE(logits.T)) / 2 for CLIP, -sum(logsigmoid(z * logits)) / B for SigLIP.
Ours = `encoders.objectives.get_objective(name, chunk=...)`, whose chunked kernels never hold B x B.
Each measurement is one forward + backward (gradients for img, txt, scale, bias) in fp32 on CPU.

Memory method: every measurement runs in a fresh Python subprocess (so one run's freed-but-cached pages
cannot hide the next one's), which warms up on a tiny batch, builds its inputs, resets the kernel's
peak-RSS mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs the step, and reads VmHWM from
/proc/self/status. Reported: peak RSS during the step minus RSS just before it, i.e. what the loss
itself needed beyond its inputs (tracemalloc cannot see torch's allocations). Where clear_refs is not
writable, getrusage's ru_maxrss (peak since process start) is used and the JSON says so.

Time: wall time of the same forward + backward, in the same subprocess. Naive and ours alternate
(naive first on even repeats, ours first on odd ones); medians over repeats. The machine may be shared:
only ratios measured in the same run mean anything.

Threads: one intra-op thread by default (--threads 0 = torch's default). On a shared, oversubscribed
machine every parallel op waits at its barrier for a descheduled worker thread, a cost per *op* rather
than per flop, which punishes the chunked form (more, smaller ops) for the neighbours' load, not for its
work: measured at B = 1024, D = 64, chunk 128, load average 13.7 on 2 cores, naive 0.21 s vs ours 0.10 s
with one thread but 0.79 s vs 2.05 s with two. On an idle or larger machine pass --threads 0.

The headline batch is the largest of --sizes. The naive step needs 5.15 GB beyond its inputs at
B = 16384, D = 512 (measured; 4x per doubling of B), so ~20 GB at B = 32768: more than a shared 23 GB
machine can spare, hence the default headline B = 16384; pass `--sizes 8192,16384,32768` where memory
allows. Cost: the B = 16384 steps dominate; `--sizes 2048,4096,8192,16384 --repeats 1` took 12 min on
2 cores at load average ~14 (other jobs running), so the default (3 sizes, 2 repeats) is well over the
~5 minutes it is meant for on such a machine; `--sizes 2048,4096,8192` is the short run.

Usage: python bench/contrastive_loss.py [--sizes 4096,8192,16384] [--dim 512] [--repeats 2]
       python bench/contrastive_loss.py --quick        # tiny smoke run: B 512, 1024, D 64
Last line: RESULT {"clip": {...}, "siglip": {...}, "peak_memory_ratio": ..., "time_ratio": ..., ...}:
per objective the headline-B ratios (naive / ours, higher = ours better) and "by_batch" for every size;
the top-level ratios are the smaller of the two objectives' at the headline B.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import machine, result

OBJECTIVES = ("clip", "siglip")
IMPLS = ("naive", "ours")


# ------------------------------------------------------------------------------------ worker (one step)
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _step(objective: str, impl: str, img, txt, scale, bias, chunk: int):
    import torch
    import torch.nn.functional as F

    if impl == "ours":
        from encoders.objectives import get_objective

        loss, _ = get_objective(objective, chunk=chunk)(
            img, txt, scale, bias if objective == "siglip" else None
        )
    elif objective == "clip":
        logits = scale * img @ txt.T
        labels = torch.arange(img.shape[0])
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        logits = scale * img @ txt.T + bias
        z = 2 * torch.eye(img.shape[0]) - 1
        loss = -F.logsigmoid(z * logits).sum() / img.shape[0]
    loss.backward()
    return float(loss.detach())


def worker(objective: str, impl: str, b: int, d: int, chunk: int, seed: int, threads: int) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    if threads > 0:
        torch.set_num_threads(threads)

    def inputs(n: int):
        g = torch.Generator().manual_seed(seed)
        img = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
        txt = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
        return img, txt, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)

    # Warm-up (kernels, thread pool, imports) on a tiny batch through the same code path (chunked: 64 rows in
    # blocks of 16). Tiny on purpose: a large warm-up would leave freed blocks resident in the heap (glibc
    # raises its mmap threshold after freeing a large block), and the step could reuse them unseen by RSS.
    _step(objective, impl, *inputs(64), 16)
    img, txt, scale, bias = inputs(b)
    gc.collect()
    before = _rss_bytes()
    reset_ok = _reset_peak()
    t = time.perf_counter()
    loss = _step(objective, impl, img, txt, scale, bias, chunk)
    seconds = time.perf_counter() - t
    peak = _peak_bytes(reset_ok)
    return {
        "objective": objective,
        "impl": impl,
        "B": b,
        "D": d,
        "chunk": chunk,
        "loss": loss,
        "seconds": seconds,
        "peak_delta_mb": (peak - before) / 2**20,
        "rss_before_mb": before / 2**20,
        "peak_method": "VmHWM after clear_refs" if reset_ok else "ru_maxrss since start",
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------ driver
def run_one(objective: str, impl: str, b: int, d: int, chunk: int, seed: int, threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the installed mllm, as in the parent
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            objective,
            impl,
            str(b),
            str(d),
            str(chunk),
            str(seed),
            str(threads),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(
            f"{objective}/{impl} B={b} failed (exit {out.returncode}; killed for memory if -9):\n"
            f"{out.stderr[-2000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4096,8192,16384", help="batch sizes; the largest is the headline")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024, help="rows per block in our kernels")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--quick", action="store_true", help="tiny smoke run: B 512,1024, D 64, chunk 128, 1 repeat"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per measurement; 0 = torch default"
    )
    ap.add_argument(
        "--worker",
        nargs=7,
        metavar=("OBJ", "IMPL", "B", "D", "CHUNK", "SEED", "THREADS"),
        help=argparse.SUPPRESS,
    )
    args = ap.parse_args()
    if args.worker:
        obj, impl, b, d, chunk, seed, threads = args.worker
        print(json.dumps(worker(obj, impl, int(b), int(d), int(chunk), int(seed), int(threads))))
        return
    if args.quick:
        args.sizes, args.dim, args.chunk, args.repeats = "512,1024", 64, 128, 1
    sizes = sorted(int(s) for s in args.sizes.split(","))
    runs: dict[tuple[str, int, str], list[dict]] = {}
    t0 = time.perf_counter()
    for b in sizes:
        for rep in range(args.repeats):
            for obj in OBJECTIVES:
                for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                    r = run_one(obj, impl, b, args.dim, args.chunk, seed=rep, threads=args.threads)
                    runs.setdefault((obj, b, impl), []).append(r)
                    print(
                        f"B={b:6d} {obj:6s} {impl:5s} rep {rep}: {r['seconds']:8.3f} s  "
                        f"peak +{r['peak_delta_mb']:9.1f} MB  loss {r['loss']:.6f}",
                        flush=True,
                    )
    med = {
        k: {
            "seconds": statistics.median(r["seconds"] for r in v),
            "peak_delta_mb": statistics.median(r["peak_delta_mb"] for r in v),
        }
        for k, v in runs.items()
    }
    info = machine()
    info["threads"] = runs[(OBJECTIVES[0], sizes[0], "ours")][0][
        "threads"
    ]  # the measurements', not this driver's
    out: dict = {
        "machine": info,
        "D": args.dim,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "sizes": sizes,
        "headline_B": sizes[-1],
        "threads": runs[(OBJECTIVES[0], sizes[0], "ours")][0]["threads"],
        "peak_method": runs[(OBJECTIVES[0], sizes[0], "ours")][0]["peak_method"],
    }
    print(
        f"\n{'objective':9s} {'B':>6s} {'naive s':>9s} {'ours s':>9s} {'naive MB':>10s} {'ours MB':>10s} "
        f"{'mem ratio':>9s} {'time ratio':>10s}"
    )
    for obj in OBJECTIVES:
        per_b = {}
        for b in sizes:
            n, o = med[(obj, b, "naive")], med[(obj, b, "ours")]
            mem_ratio = n["peak_delta_mb"] / max(o["peak_delta_mb"], 1e-3)
            time_ratio = n["seconds"] / o["seconds"]
            per_b[str(b)] = {
                "naive_s": round(n["seconds"], 4),
                "ours_s": round(o["seconds"], 4),
                "naive_peak_mb": round(n["peak_delta_mb"], 1),
                "ours_peak_mb": round(o["peak_delta_mb"], 1),
                "peak_memory_ratio": round(mem_ratio, 2),
                "time_ratio": round(time_ratio, 3),
            }
            print(
                f"{obj:9s} {b:6d} {n['seconds']:9.3f} {o['seconds']:9.3f} {n['peak_delta_mb']:10.1f} "
                f"{o['peak_delta_mb']:10.1f} {mem_ratio:9.2f} {time_ratio:10.3f}"
            )
        head = per_b[str(sizes[-1])]
        out[obj] = {
            "peak_memory_ratio": head["peak_memory_ratio"],
            "time_ratio": head["time_ratio"],
            "by_batch": per_b,
        }
    out["peak_memory_ratio"] = min(out[o]["peak_memory_ratio"] for o in OBJECTIVES)
    out["time_ratio"] = min(out[o]["time_ratio"] for o in OBJECTIVES)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    result(out)


if __name__ == "__main__":
    main()
