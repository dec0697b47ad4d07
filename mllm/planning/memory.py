"""Memory per GPU: model states under each ZeRO stage (DeepSpeed's estimators) and activations.

**Model states.** DeepSpeed's own estimators, `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs` (the functions behind its `..._all_cold` printers), are given the
stage's *trainable* parameters, since those are what carry gradients and Adam states. Per trainable
parameter, ZeRO-2: 2 bytes of bf16 weights on every GPU + 18 (bf16 and fp32 gradients, fp32 master
weights, two fp32 Adam moments) divided over the GPUs; ZeRO-3: 18 bytes divided over the GPUs + the
largest layer gathered (4 bytes a parameter of it); ZeRO-3 with optimizer and parameter offload: only
that layer on the GPU, the rest in CPU memory. Frozen parameters carry only their bf16 weights: 2 bytes each, on every GPU under
ZeRO-0/2, divided over the GPUs under ZeRO-3, in CPU memory with parameter offload. Buffers (an EMA
teacher) stay whole on every GPU, 2 bytes an element under bf16.

**ZeRO-0** has no estimator in DeepSpeed: nothing is partitioned, so every GPU holds all of it, which
is exactly DeepSpeed's ZeRO-2 estimate for a world of one GPU (2 + 18 bytes a trainable parameter).

**Activations** (`transformer_activation_bytes`): see its docstring. Both estimates leave out the CUDA
context, the allocator's fragmentation and communication buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = [
    "ZERO_STAGES",
    "StateMemory",
    "TransformerShape",
    "largest_layer_params",
    "model_states",
    "transformer_activation_bytes",
    "transformer_shape",
]

ZERO_STAGES = ("0", "2", "3", "3+offload")
BF16 = 2  # bytes an element of weights and activations under bf16


@dataclass(frozen=True)
class StateMemory:
    zero: str  # one of ZERO_STAGES
    gpu_bytes: float  # per GPU
    cpu_bytes: float  # per node, for what is offloaded (0 where nothing is)


def largest_layer_params(module: nn.Module) -> int:
    """DeepSpeed's rule (`stage3.model_to_params`): the most parameters any one module holds directly."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def _topology(gpus: int) -> tuple[int, int]:
    """(GPUs per node, nodes): up to 8 GPUs is one node, more in nodes of 8 when they divide evenly."""
    if gpus <= 8 or gpus % 8:
        return gpus, 1
    return 8, gpus // 8


def model_states(
    trainable: int, frozen: int, buffer_bytes: float, largest_layer: int, gpus: int
) -> list[StateMemory]:
    """Model-state memory per GPU under ZeRO-0, 2, 3 and 3 with CPU offload (see the module docstring)."""
    # deepspeed: lazy, it takes seconds to import and prints its accelerator choice; only a plan needs it.
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node, nodes = _topology(gpus)
    world = per_node * nodes
    _, zero0 = estimate_zero2_model_states_mem_needs(trainable, 1, 1, cpu_offload=False)
    _, zero2 = estimate_zero2_model_states_mem_needs(trainable, per_node, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        trainable, largest_layer, per_node, nodes, cpu_offload=False
    )
    cpu3o, zero3o, _ = estimate_zero3_model_states_mem_needs(
        trainable, largest_layer, per_node, nodes, cpu_offload=True, cpu_offload_params=True
    )
    weights = BF16 * frozen
    return [
        StateMemory("0", zero0 + weights + buffer_bytes, 0.0),
        StateMemory("2", zero2 + weights + buffer_bytes, 0.0),
        StateMemory("3", zero3 + weights / world + buffer_bytes, 0.0),
        StateMemory("3+offload", zero3o + buffer_bytes, cpu3o + weights / nodes),
    ]


@dataclass(frozen=True)
class TransformerShape:
    """What the activation and attention estimates need of a Hugging Face transformer."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool  # SwiGLU-style MLP (gate and up projections) rather than one GELU projection
    eager: bool  # attention materialises the [heads, s, s] scores (eager), rather than SDPA/flash kernels

    @property
    def attn_width(self) -> int:
        """layers x query heads x head dim: the attention FLOPs factor (forward 4 x this x s^2)."""
        return self.layers * self.heads * self.head_dim


def transformer_shape(model: nn.Module) -> TransformerShape | None:
    """The shape of an HF model (`.config` with num_hidden_layers ...), or None for anything else."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not (isinstance(layers, int) and isinstance(hidden, int) and isinstance(heads, int)):
        return None
    inter = getattr(cfg, "intermediate_size", None) or int(getattr(cfg, "mlp_ratio", 4) * hidden)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    gated = bool(getattr(cfg, "use_swiglu_ffn", False)) or any(
        n.endswith("gate_proj") for n, _ in model.named_modules()
    )
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    return TransformerShape(
        layers=layers,
        hidden=hidden,
        intermediate=int(inter),
        heads=heads,
        kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        gated=gated,
        eager=attn == "eager",
    )


def _layer_bytes(s: float, shape: TransformerShape, weights_train: bool) -> float:
    h, i, a = shape.hidden, shape.intermediate, shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    norms = 4 * s * h  # the inputs of the two norms
    attn = 2 * s * (2 * a + 2 * kv)  # Q, K, V and the attention output (the output projection's input)
    mlp = (6 if shape.gated else 2) * s * i  # gate, up, act(gate) | fc1 output (the activation's input)
    if (
        weights_train
    ):  # what only the weight gradients read: the inputs of QKV, of the MLP, of its last Linear
        attn += 2 * s * h
        mlp += 2 * s * h + 2 * s * i
    scores = 2 * shape.heads * s * s if shape.eager else 0.0  # softmax output, kept by eager attention only
    return norms + attn + mlp + scores


def transformer_activation_bytes(
    shape: TransformerShape, seq: float, checkpointed: bool, weights_train: bool = True
) -> float:
    """Bytes of activations one sequence of `seq` tokens keeps for the backward pass, bf16.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1)
    count s*b*h*(34 + 5*a*s/h) bytes a layer for a GPT block with dropout and materialised attention:
    34 = 11 (attention) + 19 (MLP with a 4h GELU) + 4 (two layer norms), 5*a*s/h the scores, softmax
    and its dropout mask. The same derivation here, generalised to the models in the recipes:
    no dropout (the recipes' LMs and towers train without it, so the 2*s*b*h of masks goes); grouped K/V
    (`kv_heads`); the MLP's own width `i` (4*s*b*i bytes for fc1 output + GELU output, 8*s*b*i for
    SwiGLU's gate, up, activation and product); the scores term 2*a*s^2*b only for eager attention
    (SDPA and FlashAttention keep O(s) statistics instead). With MHA, a 4h GELU MLP and eager attention
    this is their 32*s*b*h + 2*a*s^2*b: eq. 1 less the dropout terms.

    `weights_train` False (a frozen block that gradients pass through, the LM in `align`): autograd does
    not keep a Linear's input when its weight needs no gradient, so the inputs of QKV, of the MLP and of
    its last Linear (2*s*b*h + 2*s*b*h + 2*s*b*i) are not kept.

    `checkpointed`: Hugging Face gradient checkpointing keeps each layer's input (2*s*b*h a layer:
    Korthikanti's "full recomputation") plus one layer's full activations while it is recomputed.
    """
    layer = _layer_bytes(seq, shape, weights_train)
    if checkpointed:
        return shape.layers * 2 * seq * shape.hidden + layer
    return shape.layers * layer
