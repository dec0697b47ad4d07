"""What a training task runs per sample: which modules, on how many tokens, and where gradients flow.

A stage's cost is not one number times its parameters: in `align` the tower runs forward only, the
projector trains, and the frozen LM still runs backward (to the projector) without weight gradients;
in `geoglip` only the geometric encoder runs. So each training task (`mllm.families.TASKS`) has a
`Workload` here, registered under the task's name, that lists its `Block`s in data-flow order.

**FLOPs a sample** (`flops`). A block of N matmul parameters (`nn.Embedding` lookups excluded, a tied
output head included) on T tokens: forward 2*N*T, plus attention 4*L*H*Q*T^2 a sequence (QK^T and AV,
L layers, H heads of Q dims; the full square is counted, as PaLM's MFU does, though causal kernels skip
half); backward to its inputs 2*N*T + 8*L*H*Q*T^2, run when it or anything feeding it trains; weight
gradients 2*N_trainable*T. So a trained block costs 6*N*T plus 12*L*H*Q*T^2 (the 6ND + attention of
Kaplan et al. 2020 and PaLM, Chowdhery et al. 2022, app. B), a frozen block that gradients cross (the
LM in `align`, under LoRA) 4*N*T plus the same attention, and a frozen block ahead of everything that
trains (the tower in `align`) 2*N*T plus its forward attention. Convolutional blocks (the GeoGLIP
encoder) have FLOPs that 2*N*T does not describe; theirs are counted by `torch.utils.flop_counter` on a
forward pass on the meta device, the backward as the same again (inputs) plus the trainable share
(weights). The result is the *model* FLOPs MFU is defined on: gradient checkpointing recomputes the
forward of checkpointed blocks on top, reported apart as hardware work.

**Activations a sample**: Hugging Face transformers by `memory.transformer_activation_bytes` at the
stage's longest sequence; small MLPs (projector, router, heads) at 2 bytes x tokens x the in + out
features of their Linear layers; convolutional blocks as measured on the meta device (the tensors
autograd saves, bf16). Blocks that no gradient crosses keep none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from encoders.geo import GeoDetector
from encoders.registry import Registry
from encoders.supervised import PatchSupervision, PatchTargets
from mllm.config import StageConfig
from mllm.data.geoworld.vocab import COLOR_NAMES, SHAPES
from mllm.planning.lengths import SeqStats
from mllm.planning.memory import BF16, TransformerShape, transformer_activation_bytes, transformer_shape

__all__ = [
    "WORKLOADS",
    "Block",
    "Flops",
    "Workload",
    "activation_bytes",
    "flops",
    "gradient_blocks",
    "register_workload",
]


@dataclass
class Block:
    """One module's work per sample of a stage."""

    name: str  # the module's name in the model ("lm", "tower", "distill.teacher")
    params: int  # parameters whose matmuls run on every token
    trainable: int  # of those, the ones with weight gradients
    trains: bool  # any parameter of the block has a gradient (so backward runs through it)
    tokens: float  # tokens through it per sample, all its sequences together
    attn_sq: float = 0.0  # sum over its sequences of length^2, per sample
    attn_width: int = 0  # layers x heads x head dim (0: no attention)
    inputs: tuple[str, ...] = ()  # the blocks that feed it (gradients flow back along these)
    shape: TransformerShape | None = None  # for its activations
    seqs: tuple[tuple[float, float], ...] = ()  # (sequences per sample, longest length) for activations
    fwd_measured: float | None = None  # forward FLOPs a sample counted on the meta device
    act_measured: float | None = None  # activation bytes a sample counted on the meta device
    linear_io: int = 0  # in + out features of its Linear layers (small-MLP activation estimate)
    extra_act: float = 0.0  # bytes a sample that checkpointing does not remove (the LM's logits)
    forward_only: bool = False  # runs without gradients whatever trains (an EMA teacher)
    checkpointable: bool = False  # Hugging Face gradient checkpointing covers it
    unit: str = "tokens"  # what `tokens` counts (a convolutional block: images)


@dataclass(frozen=True)
class Workload:
    """How a task is planned. `lengths`: how its sequence statistics are taken ("conversation": a LLaVA
    file with images, "text": the same file's text alone, "none": the task's own fixed shapes).
    `module`: the module the task trains when it is not the model (the tower warm-up's heads). `note`: what
    the estimate leaves out, printed with the stage."""

    blocks: Callable[[nn.Module, StageConfig, SeqStats], list[Block]]
    lengths: str = "conversation"
    module: Callable[[nn.Module, StageConfig], nn.Module] | None = None
    note: str = ""  # what the plan leaves out for this task


WORKLOADS: Registry[Workload] = Registry("dry-run workload")


def register_workload(*tasks: str) -> Callable[[Workload], Workload]:
    def deco(w: Workload) -> Workload:
        for t in tasks:
            WORKLOADS.register(t, w, stacklevel=2)
        return w

    return deco


# ---------------------------------------------------------------------------------------------- counting
def matmul_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Parameters that multiply every token: all but `nn.Embedding` tables, plus an output head tied to
    its input embedding (the lookup is free, the head's matmul is not)."""
    emb = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters(False)}
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += 0 if id(p) in emb else p.numel()
    head = getattr(module, "get_output_embeddings", lambda: None)()
    if (
        isinstance(head, nn.Linear)
        and id(head.weight) in emb
        and (head.weight.requires_grad or not trainable_only)
    ):
        total += head.weight.numel()
    return total


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _linear_io(module: nn.Module) -> int:
    return sum(m.in_features + m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _mlp_block(name: str, module: nn.Module, tokens: float, inputs: tuple[str, ...] = ()) -> Block:
    return Block(
        name,
        matmul_params(module),
        matmul_params(module, True),
        _trains(module),
        tokens,
        inputs=inputs,
        linear_io=_linear_io(module),
    )


def _transformer_block(
    name: str, module: nn.Module, hf: nn.Module, seqs: tuple[tuple[float, float, float], ...], **kw
) -> Block:
    """`seqs`: (sequences per sample, mean length, longest length) of each kind of sequence it reads."""
    shape = transformer_shape(hf)
    return Block(
        name,
        matmul_params(module),
        matmul_params(module, True),
        _trains(module),
        tokens=sum(n * mean for n, mean, _ in seqs),
        attn_sq=kw.pop("attn_sq", sum(n * mean * mean for n, mean, _ in seqs)),
        attn_width=shape.attn_width if shape else 0,
        shape=shape,
        seqs=tuple((n, peak) for n, _, peak in seqs),
        checkpointable=True,
        **kw,
    )


def _tower_tokens(tower: nn.Module, size: int | None = None) -> int:
    """Tokens a ViT tower's encoder reads for one image of `size` px (its own size by default): the patch
    grid plus CLS and register tokens."""
    size = size or tower.image_size
    return (size // tower.patch_size) ** 2 + tower.num_prefix_tokens


def _image_block(
    name: str, tower: nn.Module, views: tuple[tuple[float, int], ...], inputs: tuple[str, ...] = ()
) -> Block:
    """A tower on `views` ((images a sample, px), ...): a ViT by the formulas, a conv net (`ConvTower`:
    its FLOPs are not 2 x parameters a token) measured on the meta device."""
    views = tuple(v for v in views if v[0])
    if getattr(tower, "hidden_states_are_maps", False):
        fwd = act = 0.0
        for n, size in views:
            x = torch.empty(1, 3, size, size, device="meta")
            f, a = measure(lambda x=x: tower.model(pixel_values=x))
            fwd, act = fwd + n * f, act + n * a
        px = "/".join(str(size) for _, size in views)
        return Block(
            name,
            matmul_params(tower),
            matmul_params(tower, True),
            _trains(tower),
            sum(n for n, _ in views),
            inputs=inputs,
            fwd_measured=fwd,
            act_measured=act,
            unit=f"images of {px} px",
        )
    seqs = tuple((n, _tower_tokens(tower, size), _tower_tokens(tower, size)) for n, size in views)
    return _transformer_block(name, tower, tower.model, seqs, inputs=inputs)


def measure(run: Callable[[], object]) -> tuple[float, float]:
    """(forward FLOPs, bytes autograd saves at bf16) of `run()` on the meta device."""
    saved = [0.0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * (BF16 if t.is_floating_point() else t.element_size())
        return t

    with (
        FlopCounterMode(display=False) as counter,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        run()
    return float(counter.get_total_flops()), saved[0]


# ---------------------------------------------------------------------------------------------- results
def gradient_blocks(blocks: list[Block]) -> set[str]:
    """Names of the blocks backward runs through: those that train or that a training block feeds on."""
    by_name = {b.name: b for b in blocks}
    memo: dict[str, bool] = {}

    def grad(name: str) -> bool:
        if name not in memo:
            b = by_name.get(name)
            memo[name] = b is not None and not b.forward_only and (b.trains or any(grad(i) for i in b.inputs))
        return memo[name]

    return {b.name for b in blocks if grad(b.name)}


@dataclass(frozen=True)
class Flops:
    model: float  # per sample: forward + backward (inputs where gradients cross, weights where they train)
    recompute: float  # per sample, extra under gradient checkpointing (forward of checkpointed blocks again)
    by_block: dict[str, float]


def flops(blocks: list[Block]) -> Flops:
    """Training FLOPs a sample (see the module docstring)."""
    grad = gradient_blocks(blocks)
    by_block: dict[str, float] = {}
    recompute = 0.0
    for b in blocks:
        if b.fwd_measured is not None:
            fwd = bwd = b.fwd_measured
            wgrad = b.fwd_measured * (b.trainable / b.params if b.params else 0.0)
        else:
            fwd = 2 * b.params * b.tokens + 4 * b.attn_width * b.attn_sq
            bwd = 2 * b.params * b.tokens + 8 * b.attn_width * b.attn_sq
            wgrad = 2 * b.trainable * b.tokens
        total = fwd + (bwd + wgrad if b.name in grad else 0.0)
        by_block[b.name] = total
        if b.name in grad and b.checkpointable:
            recompute += fwd
    return Flops(sum(by_block.values()), recompute, by_block)


def activation_bytes(blocks: list[Block], checkpointed: bool) -> float:
    """Activation bytes a sample kept for backward (see the module docstring)."""
    grad = gradient_blocks(blocks)
    total = 0.0
    for b in blocks:
        if b.name not in grad:
            continue
        if b.shape is not None:
            total += sum(
                n * transformer_activation_bytes(b.shape, peak, checkpointed, b.trainable > 0)
                for n, peak in b.seqs
            )
        elif b.act_measured is not None:
            total += b.act_measured
        else:
            total += BF16 * b.tokens * b.linear_io
        total += b.extra_act
    return total


# ---------------------------------------------------------------------------------------------- MultimodalLM
def _lm_block(model: nn.Module, seq: SeqStats, inputs: tuple[str, ...]) -> Block:
    lm = model.lm
    hf = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    vocab = lm.get_output_embeddings().weight.shape[0]
    # The head runs at labelled positions only (mllm.model): bf16 logits + their fp32 copy for the loss.
    logits = seq.labelled * (seq.peak / seq.mean if seq.mean else 1.0) * vocab * (BF16 + 4)
    return _transformer_block(
        "lm", lm, hf, ((1, seq.mean, seq.peak),), attn_sq=seq.mean_sq, inputs=inputs, extra_act=logits
    )


def _vision_blocks(model: nn.Module, images: float) -> list[Block]:
    """Tower(s), geometric encoder, router and projector of a MultimodalLM, for `images` images a sample."""
    blocks: list[Block] = []
    towers = [n for n in ("tower", "tower2") if hasattr(model, n)]
    for name in towers:
        tower = getattr(model, name)
        blocks.append(_image_block(name, tower, ((images, tower.image_size),)))
    feeds = tuple(towers)
    if hasattr(model, "geo"):
        geo = model.geo
        size = geo.config.image_size
        x = torch.empty(1, 3, size, size, device="meta")
        fwd, act = measure(lambda: geo.router_levels(x))
        blocks.append(_conv_block(geo, images, fwd, act))
        blocks.append(_mlp_block("router", model.router, images * model.tower.num_tokens, ("tower", "geo")))
        feeds = ("router",)
    blocks.append(_mlp_block("projector", model.projector, images * model.tower.num_tokens, feeds))
    return blocks


def _conversation(model: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    blocks = _vision_blocks(model, seq.images) if seq.images else []
    return [*blocks, _lm_block(model, seq, ("projector",) if blocks else ())]


def _text_only(model: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    return [_lm_block(model, seq, ())]


def _conv_block(geo: nn.Module, images: float, fwd: float, act: float) -> Block:
    size = geo.config.image_size
    return Block(
        "geo",
        matmul_params(geo),
        matmul_params(geo, True),
        _trains(geo),
        images,
        fwd_measured=images * fwd,
        act_measured=images * act,
        unit=f"images of {size} px",
    )


def _geoglip(module: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    """`module` is the task's GeoDetector: the encoder with its detection heads, on one figure a sample."""
    geo = module.geo
    size = geo.config.image_size
    x = torch.empty(1, 3, size, size, device="meta")
    fwd, act = measure(lambda: geo(x))
    return [_conv_block(geo, 1, fwd, act)]


def _geoglip_module(model: nn.Module, stage: StageConfig) -> nn.Module:
    return GeoDetector(model.geo)  # what mllm.families.mllm.geoglip_task trains


def _warmup_module(model: nn.Module, stage: StageConfig) -> nn.Module:
    # Built as the task builds it (mllm.families.mllm.scene_labels_task), on the CPU: the heads are small
    # and PatchSupervision computes its row offsets with real tensors.
    targets = PatchTargets(
        colours=COLOR_NAMES, shapes=SHAPES, density="density" in getattr(model.projector, "words", {})
    )
    readout = None
    if stage.readout_heads:
        first = model.projector[0] if isinstance(model.projector, nn.Sequential) else model.projector
        readout = getattr(first, "heads", first)
    return PatchSupervision(model.tower, targets, readout)


def _warmup(module: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    tower = module.tower
    heads = [n for n, _ in module.named_children() if n != "tower"]
    return [
        _image_block("tower", tower, ((1, tower.image_size),)),
        *(_mlp_block(n, getattr(module, n), tower.num_tokens, ("tower",)) for n in heads),
    ]


# ---------------------------------------------------------------------------------------------- encoders
def _pair(model: nn.Module, text_seqs: float, views: tuple[tuple[float, int], ...]) -> list[Block]:
    """Image tower, text tower (`text_seqs` captions at its max_length) and heads of a ContrastiveModel."""
    text = model.text_tower
    length = text.config.max_length
    return [
        _image_block("image_tower", model.image_tower, views),
        _transformer_block("text_tower", text, text.model, ((text_seqs, length, length),)),
        _mlp_block("heads", model.heads, 1 + text_seqs, ("image_tower", "text_tower")),
    ]


def _contrastive(model: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    return _pair(model, 1, ((1, model.image_tower.image_size),))


def _cloc(model: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    t = _tower_tokens(model.image_tower)
    # Each region is pooled twice (its box prompt, its phrase's grounding), one prompt token + the patches.
    regions = 2 * model.cloc_cfg.regions_per_image
    width = model.prompter.norm.normalized_shape[0]
    prompter = _mlp_block("prompter", model.prompter, regions * (t + 1), ("image_tower", "text_tower"))
    prompter.attn_sq, prompter.attn_width = regions * (t + 1) ** 2, width  # one single-head layer
    return [*_pair(model, 1, ((1, model.image_tower.image_size),)), prompter]


def _tips(model: nn.Module, stage: StageConfig, seq: SeqStats) -> list[Block]:
    tower = model.image_tower
    aug = model.tips_cfg.augment
    glob = _tower_tokens(tower)  # the clean image and the two global views, at the tower's size
    views = ((3, tower.image_size), (aug.local_crops, aug.local_size))
    distill = model.distill
    patches = glob - tower.num_prefix_tokens
    teacher_params = (
        matmul_params(tower) + matmul_params(distill.cls_head) + matmul_params(distill.patch_head)
    )
    return [
        *_pair(model, 2, views),  # the short and the long caption
        _mlp_block("cls2_proj", model.cls2_proj, 1, ("image_tower",)),
        _mlp_block("distill.cls_head", distill.cls_head, 2 + aug.local_crops, ("image_tower",)),
        _mlp_block("distill.patch_head", distill.patch_head, 2 * patches, ("image_tower",)),
        # The EMA teacher (fp32 buffers) runs tower + heads on the two global views, without gradients.
        Block(
            "distill.teacher",
            teacher_params,
            0,
            False,
            2 * glob + 2 + 2 * patches,
            attn_sq=2 * glob * glob,
            attn_width=transformer_shape(tower.model).attn_width,
            forward_only=True,
        ),
    ]


register_workload("conversation")(Workload(_conversation))
register_workload("prior")(
    Workload(
        _conversation,
        note="not counted: PRIOR's one-off reference-LM pass over the captions before training "
        "(forward only, ~2 x its parameters x the caption tokens; cached)",
    )
)
register_workload("prior_ref")(Workload(_text_only, lengths="text"))
register_workload("geoglip")(Workload(_geoglip, lengths="none", module=_geoglip_module))
register_workload("scene_labels")(Workload(_warmup, lengths="none", module=_warmup_module))
register_workload("contrastive")(Workload(_contrastive, lengths="none"))
register_workload("refine")(  # CLIP-Refine (mllm.families.refine): the pair's own workload, plus its teacher
    Workload(
        _contrastive,
        lengths="none",
        note="not counted: the frozen teacher's forward pass (both towers, no gradient; about 1/3 more "
        "FLOPs than the pair's forward + backward)",
    )
)
register_workload("cloc")(Workload(_cloc, lengths="none"))
register_workload("tips")(Workload(_tips, lengths="none"))
register_workload("albef")(  # ALBEF (encoders.albef): the pair on the caption and its masked copy
    Workload(
        lambda m, st, sq: _pair(m, 2, ((1, m.image_tower.image_size),)),
        lengths="none",
        note="not counted: the fusion encoder (4 passes a sample: ITM positive, 2 ITM negatives, MLM) and "
        "the momentum model's forward (both towers + fusion, no gradient)",
    )
)
register_workload("degla")(  # DeGLA (encoders.degla): the pair on the caption and its K negatives
    Workload(
        lambda m, st, sq: _pair(m, 1 + m.degla_cfg.n_negatives, ((1, m.image_tower.image_size),)),
        lengths="none",
        note="not counted: the EMA teacher's forward (both towers on the image, caption and negatives; "
        "no gradient)",
    )
)
