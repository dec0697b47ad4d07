"""A recipe's plan: per stage, parameters, tokens, memory per GPU under each ZeRO stage, FLOPs and time.

Time is FLOPs over delivered throughput: a step's model FLOPs (`workload.flops` x the global batch) over
GPUs x the preset's bf16 dense peak x MFU. MFU is the planner's one assumption and is stated with every
number it produces; a GPU-hour is worth what the achieved MFU says, which only a run measures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mllm.config import Recipe, StageConfig
from mllm.data.records import read_records
from mllm.families import get_stage_kind, resolve_template
from mllm.planning.build import MetaModel, build_meta, stage_view
from mllm.planning.hardware import GPUS
from mllm.planning.lengths import SeqStats, fixed_length, from_data
from mllm.planning.memory import largest_layer_params, model_states
from mllm.planning.workload import WORKLOADS, activation_bytes, flops
from mllm.training.engine import load_ds_config

__all__ = ["DEFAULT_MFU", "RecipePlan", "StagePlan", "plan_recipe", "render_text"]

DEFAULT_MFU = 0.4  # a planning assumption for bf16 ZeRO training of 3-7B models; say yours with --mfu
GIB = 2**30


@dataclass
class ModuleRow:
    name: str
    params: int
    trainable: int


@dataclass
class ZeroRow:
    zero: str  # "0" | "2" | "3" | "3+offload"
    states_gib: float  # model states per GPU
    cpu_gib: float  # offloaded states per node
    total_gib: float  # states + activations
    total_gc_gib: float  # states + activations under gradient checkpointing
    fits: bool
    fits_gc: bool
    recipe: bool  # the ZeRO configuration the stage runs with


@dataclass
class StagePlan:
    name: str
    kind: str
    task: str
    modules: list[ModuleRow]
    params: int
    trainable: int
    image_tokens: int | None  # tokens an image becomes in the LM (a MultimodalLM), else None
    sequence: SeqStats
    tokens_by_module: dict[str, dict[str, Any]]  # {"count": tokens a sample, "unit": "tokens"} a module
    flops_by_module: dict[str, float]  # training FLOPs a sample of each
    micro_batch: int
    grad_accum: int
    global_batch: int
    gradient_checkpointing: bool
    activations_gib: float
    activations_gc_gib: float
    zero: list[ZeroRow]
    flops_per_sample: float | None
    flops_per_step: float | None
    recompute_flops_per_step: float | None
    step_s: float | None
    steps: int | None
    stage_s: float | None
    notes: list[str] = field(default_factory=list)


@dataclass
class RecipePlan:
    recipe: str
    gpus: int
    gpu: str
    gpu_memory_gb: float
    peak_tflops: float
    mfu: float
    parts: list[dict[str, str]]
    tokenizer: str
    stages: list[StagePlan]
    total_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(gpus: int, mfu: float, gpu_memory: float | None) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus {gpus!r}: need at least one GPU (a whole number >= 1)")
    if not (isinstance(mfu, (int, float)) and 0 < mfu <= 1):
        raise ValueError(f"--mfu {mfu!r} is outside (0, 1]: it is the share of the GPU's peak a run delivers")
    if gpu_memory is not None and not gpu_memory > 0:
        raise ValueError(f"--gpu-memory {gpu_memory!r}: need a positive size in GB")


def _per_stage(values: dict[str, float] | None, names: list[str], flag: str) -> dict[str, float]:
    values = dict(values or {})
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"{flag}: no stage {unknown[0]!r} in the recipe; it has {names}")
    for k, v in values.items():
        if not v > 0:
            raise ValueError(f"{flag} {k}={v}: need a positive number")
    return values


def _recipe_zero(recipe: Recipe, stage: StageConfig) -> str:
    """Which of ZERO_STAGES the stage runs with ("" when none of them: ZeRO-1)."""
    if recipe.engine.backend != "deepspeed":
        return "0"  # plain torch: every rank holds everything, as ZeRO-0
    zero = load_ds_config(stage.zero_config or recipe.engine.zero_config, stage, recipe.engine.precision)
    z = zero.get("zero_optimization", {})
    stage_no = int(z.get("stage", 0))
    if stage_no == 3:
        offload = (z.get("offload_param") or {}).get("device", "none") != "none"
        return "3+offload" if offload else "3"
    return {0: "0", 2: "2"}.get(stage_no, "")


def _lengths(meta: MetaModel, stage: StageConfig, recipe: Recipe, how: str) -> SeqStats:
    """The stage's sequence statistics: from its data when here (for the tasks that read conversations),
    else `max_length` (or, for tasks of fixed shapes, none) with the data's record count when it is here."""
    model = meta.model
    max_length = recipe.model.max_length
    mm = getattr(model, "meta", None)
    image_tokens = int(getattr(model, "num_image_tokens", 0) or 0)
    images = 1.0 if how == "conversation" and image_tokens else 0.0
    data = Path(stage.data.json) if stage.data.json else None
    here = data is not None and data.is_file()
    if how in ("conversation", "text") and here and mm is not None:
        template = resolve_template(stage, mm.template)
        return from_data(
            data,
            model.tokenizer,
            meta.real_tokenizer,
            template,
            model.image_token_id,
            image_tokens,
            max_length,
            with_images=how == "conversation",
            seed=recipe.engine.seed,
        )
    samples = len(read_records(data)) if here else None
    why = "data here" if here else ("data not here" if data is not None else "no data file")
    if how == "none":
        return fixed_length(0, 0.0, 0, samples, f"the task's fixed shapes ({why})")
    return fixed_length(max_length, images, image_tokens, samples, f"max_length ({why})")


def _override(seq: SeqStats, samples: float | None, tokens: float | None) -> SeqStats:
    if tokens is not None:
        text_share = seq.labelled / seq.mean if seq.mean else 0.0
        seq = dataclasses.replace(
            seq,
            source=f"mean {tokens:g} tokens a sample as given (--tokens); longest {seq.peak:g} ({seq.source})",
            mean=float(tokens),
            mean_sq=float(tokens) ** 2,
            p50=float(tokens),
            labelled=float(tokens) * text_share,
        )
    if samples is not None:
        seq = dataclasses.replace(seq, samples=int(samples))
    return seq


def _buffer_bytes(module: nn.Module, precision: str) -> float:
    """Buffers at the working precision (DeepSpeed's bf16 engine casts the module, buffers included)."""
    total = 0.0
    for b in module.buffers():
        size = 2 if (b.is_floating_point() and precision == "bf16") else b.element_size()
        total += b.numel() * size
    return total


def _plan_stage(
    meta: MetaModel,
    recipe: Recipe,
    stage: StageConfig,
    gpus: int,
    memory_gb: float,
    peak: float,
    mfu: float,
    samples: float | None,
    tokens: float | None,
) -> StagePlan:
    task = get_stage_kind(stage.kind).task
    workload = WORKLOADS.get(task)
    notes: list[str] = []
    module, _ = stage_view(meta.model, stage, workload.module if workload is not None else None)
    rows = [
        ModuleRow(
            n,
            sum(p.numel() for p in c.parameters()),
            sum(p.numel() for p in c.parameters() if p.requires_grad),
        )
        for n, c in module.named_children()
    ]
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    seq = _override(_lengths(meta, stage, recipe, workload.lengths if workload else "none"), samples, tokens)
    if seq.over_max:
        notes.append(f"{seq.over_max:.1%} of the drawn samples exceed max_length and would be refused")
    image_tokens = getattr(meta.model, "num_image_tokens", None) if seq.images else None

    micro, accum = stage.batch_size, stage.grad_accum
    global_batch = micro * accum * gpus
    act = act_gc = 0.0
    per_sample = recompute = None
    tokens_by: dict[str, dict[str, Any]] = {}
    flops_by: dict[str, float] = {}
    if workload is None:
        notes.append(f"no workload model for task {task!r}: memory without activations, no FLOPs or time")
    else:
        blocks = workload.blocks(module, stage, seq)
        f = flops(blocks)
        per_sample, recompute, flops_by = f.model, f.recompute, f.by_block
        tokens_by = {b.name: {"count": b.tokens, "unit": b.unit} for b in blocks}
        if workload.note:
            notes.append(workload.note)
        act = micro * activation_bytes(blocks, checkpointed=False)
        act_gc = micro * activation_bytes(blocks, checkpointed=True)

    states = model_states(
        trainable,
        params - trainable,
        _buffer_bytes(module, recipe.engine.precision),
        largest_layer_params(module),
        gpus,
    )
    ours = _recipe_zero(recipe, stage)
    if not ours:
        notes.append("the stage's ZeRO config is stage 1, which the table does not estimate (see ZeRO-2)")
    zero = []
    for s in states:
        total, total_gc = (s.gpu_bytes + act) / GIB, (s.gpu_bytes + act_gc) / GIB
        zero.append(
            ZeroRow(
                s.zero,
                s.gpu_bytes / GIB,
                s.cpu_bytes / GIB,
                total,
                total_gc,
                total <= memory_gb,
                total_gc <= memory_gb,
                s.zero == ours,
            )
        )

    step_s = steps = stage_s = per_step = recompute_step = None
    if per_sample is not None:
        per_step = per_sample * global_batch
        recompute_step = recompute * global_batch
        step_s = per_step / (gpus * peak * 1e12 * mfu)
        if stage.max_steps is not None:
            steps = int(stage.max_steps)
        elif seq.samples:
            per_rank = math.ceil(seq.samples / (micro * gpus))  # micro-batches each rank sees an epoch
            steps = max(1, math.ceil(stage.epochs * per_rank / accum))
        else:
            notes.append(
                f"stage time needs the number of samples: the data is not here; give --samples {stage.name}=N"
            )
        if steps is not None:
            stage_s = steps * step_s
    return StagePlan(
        name=stage.name,
        kind=stage.kind,
        task=task,
        modules=rows,
        params=params,
        trainable=trainable,
        image_tokens=image_tokens,
        sequence=seq,
        tokens_by_module=tokens_by,
        flops_by_module=flops_by,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=global_batch,
        gradient_checkpointing=stage.gradient_checkpointing,
        activations_gib=act / GIB,
        activations_gc_gib=act_gc / GIB,
        zero=zero,
        flops_per_sample=per_sample,
        flops_per_step=per_step,
        recompute_flops_per_step=recompute_step,
        step_s=step_s,
        steps=steps,
        stage_s=stage_s,
        notes=notes,
    )


def plan_recipe(
    recipe: Recipe,
    gpus: int = 8,
    gpu: str = "h100",
    gpu_memory: float | None = None,
    mfu: float = DEFAULT_MFU,
    samples: dict[str, float] | None = None,
    tokens: dict[str, float] | None = None,
    only: list[str] | None = None,
) -> RecipePlan:
    """Plan `recipe` (or the stages `only` names) on `gpus` GPUs of preset `gpu` at `mfu`.

    `gpu_memory` (GB) replaces the preset's memory; `samples` / `tokens` (stage -> number) give a stage's
    sample count and mean tokens a sample where its data is not here."""
    _check(gpus, mfu, gpu_memory)
    preset = GPUS[gpu]
    names = [s.name for s in recipe.stages]
    samples = _per_stage(samples, names, "--samples")
    tokens = _per_stage(tokens, names, "--tokens")
    stages = [s for s in recipe.stages if not only or s.name in only]
    if not stages:
        raise ValueError(f"no stage to plan; the recipe has {names}")
    meta = build_meta(recipe)
    memory = float(gpu_memory or preset.memory_gb)
    plans = [
        _plan_stage(
            meta, recipe, s, gpus, memory, preset.peak_tflops, mfu, samples.get(s.name), tokens.get(s.name)
        )
        for s in stages
    ]
    times = [p.stage_s for p in plans]
    return RecipePlan(
        recipe=recipe.name,
        gpus=gpus,
        gpu=preset.name,
        gpu_memory_gb=memory,
        peak_tflops=preset.peak_tflops,
        mfu=float(mfu),
        parts=[{"what": p.what, "origin": p.origin, "detail": p.detail} for p in meta.parts],
        tokenizer=meta.tokenizer.origin,
        stages=plans,
        total_s=sum(times) if all(t is not None for t in times) else None,
    )


# ---------------------------------------------------------------------------------------------- text
def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:.0f} {unit}"
    return f"{n:.0f}"


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.3g}"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"


def _lengths_line(seq: SeqStats) -> str:
    if seq.p50 == seq.max == seq.mean:
        n = f"; {seq.samples} samples" if seq.samples else ""
        return f"{seq.source}{n}"
    return (
        f"mean {seq.mean:.0f}, p50 {seq.p50:.0f}, p90 {seq.p90:.0f}, p99 {seq.p99:.0f}, max {seq.max:.0f} tokens; "
        f"a sample: {seq.images:.2g} image(s), {seq.labelled:.0f} labelled tokens; {seq.samples} samples ({seq.source})"
    )


def render_text(plan: RecipePlan) -> str:
    """The plan as a terminal table."""
    out = [
        f"{plan.recipe}: dry run on {plan.gpus} x {plan.gpu} ({plan.gpu_memory_gb:g} GB, "
        f"{plan.peak_tflops:g} TFLOPS bf16 dense) at MFU {plan.mfu:g}",
        "configs: " + "; ".join(f"{p['what']} {p['origin']} ({p['detail']})" for p in plan.parts),
        f"tokenizer: {plan.tokenizer}",
    ]
    for s in plan.stages:
        out += ["", f"stage {s.name} (kind {s.kind}, task {s.task})"]
        width = max(len(r.name) for r in [*s.modules, ModuleRow("all", 0, 0)])
        out.append(f"  {'parameters':<{width}}  {'total':>9}  {'trainable':>9}")
        for r in [*s.modules, ModuleRow("all", s.params, s.trainable)]:
            out.append(f"  {r.name:<{width}}  {_count(r.params):>9}  {_count(r.trainable):>9}")
        if s.image_tokens:
            out.append(f"  image tokens: {s.image_tokens} an image")
        if s.tokens_by_module:
            out.append(
                "  a sample runs: "
                + ", ".join(f"{k} on {_num(v['count'])} {v['unit']}" for k, v in s.tokens_by_module.items())
            )
        out.append("  lengths: " + _lengths_line(s.sequence))
        out.append(
            f"  batch: {s.micro_batch} a GPU x {s.grad_accum} accumulation x {plan.gpus} GPUs = {s.global_batch} a step"
        )
        gc = ", the recipe's choice" if s.gradient_checkpointing else ""
        label = 34
        out.append(
            f"  {'memory a GPU (GiB)':<{label}}"
            + "".join(f"{'ZeRO-' + z.zero + ('*' if z.recipe else ''):>14}  " for z in s.zero)
        )
        out.append(f"  {'model states':<{label}}" + "".join(f"{z.states_gib:>12.1f}    " for z in s.zero))
        rows = (
            (f"+ activations {s.activations_gib:.1f}", "total_gib", "fits"),
            (f"+ activations, grad ckpt {s.activations_gc_gib:.1f}{gc}", "total_gc_gib", "fits_gc"),
        )
        for name, total, fits in rows:
            out.append(
                f"  {name:<{label}}"
                + "".join(
                    f"{getattr(z, total):>12.1f} {'ok' if getattr(z, fits) else 'NO':>3}" for z in s.zero
                )
            )
        offload = next(z for z in s.zero if z.zero == "3+offload")
        out.append(
            f"  (* the stage's ZeRO config; ok/NO: fits {plan.gpu_memory_gb:g} GB; ZeRO-3+offload also needs "
            f"{offload.cpu_gib:.0f} GiB of CPU memory a node)"
        )
        if s.flops_per_sample is not None:
            out.append(
                f"  FLOPs: {s.flops_per_sample / 1e12:.3g} TFLOP a sample, {s.flops_per_step / 1e15:.3g} PFLOP a step "
                "(6N a token where trained, 4N where gradients only pass, 2N forward-only, + attention)"
            )
            out.append(
                f"  time at MFU {plan.mfu:g}: {_duration(s.step_s)} a step; "
                + (f"{s.steps} step(s) = {_duration(s.stage_s)}" if s.steps else "stage: ? (samples unknown)")
            )
        out += [f"  note: {n}" for n in s.notes]
    if plan.total_s is not None and len(plan.stages) > 1:
        out += ["", f"all stages: {_duration(plan.total_s)} on {plan.gpus} x {plan.gpu} at MFU {plan.mfu:g}"]
    return "\n".join(line.rstrip() for line in out)
