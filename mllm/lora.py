"""LoRA on the language model via peft: apply, restrict training to the adapters, save, merge.

A stage with `lora: {r, alpha, dropout, targets}` wraps `model.lm` in a peft model before the engine
sees it. The stage's other trainables (the projector, with its own learning rate) train as declared;
under the wrapped LM only the LoRA matrices train (`restrict_to_adapters`, called by the engine after
it applies the stage's prefixes, so `lm: 2e-4` means "the LM's adapters at 2e-4").

Why resume works where LLaVA's often did not: the wrapping happens in the same place, with the same
names, before the engine builds its optimiser or reads a checkpoint, and a checkpoint holds exactly
the parameters that require grad (adapters + non-LoRA trainables) under those names; the torch backend
checks that none is missing. The stage's `final/` is the merged model (the next stage, `mllm chat` and
`mllm eval` load a plain model); `final/adapter/` holds the adapter in peft's own format plus the
non-LoRA trainables, which `mllm merge-lora` folds into a base model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.common import read_meta, write_meta
from mllm.config import LoraConfig
from mllm.model import MultimodalLM

__all__ = [
    "ADAPTER_DIR",
    "NON_LORA_FILE",
    "apply_lora",
    "check_quantize",
    "has_lora",
    "merge_lora",
    "merge_lora_dir",
    "restrict_to_adapters",
    "save_lora_final",
]

ADAPTER_DIR = "adapter"
NON_LORA_FILE = "non_lora_trainables.safetensors"  # LLaVA's name for the same idea (it used a .bin)
ADAPTER_META = "mllm_adapter.json"  # the adapter folder's meta file (kind `lora_adapter`, format_version)
ADAPTER_KIND = "lora_adapter"
ADAPTER_VERSION = 1
LORA_MARK = ".lora_"  # peft's LoRA parameters are named `...lora_A.<adapter>.weight`, `lora_B`, ...


def check_quantize(cfg: LoraConfig) -> None:
    """Refuse a quantised base (QLoRA) where it cannot run, naming what is missing.

    4-bit weights need bitsandbytes' CUDA kernels; on a machine without them the run would fail deep
    inside the first forward, so the recipe is refused before any model is built.
    """
    if cfg.quantize is None:
        return
    if cfg.quantize != "4bit":
        raise ValueError(f"lora.quantize must be '4bit' or unset, got {cfg.quantize!r}")
    problems = []
    try:
        import bitsandbytes  # noqa: F401  - optional (QLoRA only): probed, not required
    except ImportError:
        problems.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU is visible (4-bit kernels run only on CUDA)")
    if problems:
        raise ValueError("lora.quantize: 4bit (QLoRA) cannot run here: " + "; ".join(problems))
    raise ValueError(
        "lora.quantize: 4bit: loading the LM in 4 bits is not implemented yet in this version; "
        "train LoRA on the bf16 model (remove `quantize`)"
    )


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig  # peft: lazy, ~3 s to import and only LoRA stages use it

    targets: str | list[str] = cfg.targets
    if list(targets) == ["all-linear"]:
        targets = "all-linear"  # peft: every Linear except the output head, as LLaVA's find_all_linear_names
    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap `model.lm` in peft LoRA layers (in place); returns the model."""
    check_quantize(cfg)
    from peft import get_peft_model  # lazy: see _peft_config

    if has_lora(model):
        raise ValueError("the model already carries LoRA adapters; merge them first (mllm merge-lora)")
    model.lm = get_peft_model(model.lm, _peft_config(cfg))
    return model


def has_lora(model: nn.Module) -> bool:
    return any(LORA_MARK in n for n, _ in model.named_parameters())


def _peft_roots(model: nn.Module) -> list[str]:
    from peft import PeftModel  # lazy: see _peft_config

    return [name for name, m in model.named_modules() if isinstance(m, PeftModel)]


def restrict_to_adapters(model: nn.Module) -> list[str]:
    """Under each peft-wrapped module, keep only the LoRA parameters trainable; return those frozen again.

    A no-op (returns []) for a model without LoRA, so the engine calls it unconditionally.
    """
    if not has_lora(model):
        return []
    roots = [r + "." for r in _peft_roots(model)]
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and any(name.startswith(r) for r in roots) and LORA_MARK not in name:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the LM's weights and drop the peft wrapper (in place)."""
    model.lm = model.lm.merge_and_unload()
    return model


def save_lora_final(model: nn.Module, cfg: LoraConfig, final: Path, base: str | None = None) -> Path:
    """Write `final/adapter/` (peft adapter + non-LoRA trainables), then `final/` merged.

    The adapter is written first to a side folder and moved in after the model folder is complete, so
    `final/mllm.json` (which marks the stage done) never exists without its adapter for long.
    """
    final = Path(final)
    side = final.with_name(f".adapter-{final.name}-{os.getpid()}")
    shutil.rmtree(side, ignore_errors=True)
    roots = [r + "." for r in _peft_roots(model)]
    non_lora = {
        n: p.detach().contiguous().cpu()
        for n, p in model.named_parameters()
        if p.requires_grad and not any(n.startswith(r) for r in roots)
    }
    model.lm.save_pretrained(str(side), safe_serialization=True)
    save_file(non_lora, str(side / NON_LORA_FILE))
    write_meta(
        side / ADAPTER_META, ADAPTER_KIND, ADAPTER_VERSION, {"base": base, "lora": vars(cfg), "target": "lm"}
    )
    merge_lora(model)
    model.save_pretrained(final)
    shutil.rmtree(final / ADAPTER_DIR, ignore_errors=True)
    os.replace(side, final / ADAPTER_DIR)
    return final


def merge_lora_dir(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """`mllm merge-lora`: base model folder + adapter folder -> a merged model folder."""
    from peft import PeftModel  # lazy: see _peft_config

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a peft adapter folder (no adapter_config.json)")
    if (adapter_dir / ADAPTER_META).is_file():  # absent from an adapter peft wrote without this project
        read_meta(adapter_dir / ADAPTER_META, ADAPTER_KIND, ADAPTER_VERSION)
    model = MultimodalLM.from_pretrained(base_dir)
    model.lm = PeftModel.from_pretrained(model.lm, str(adapter_dir))
    extra = adapter_dir / NON_LORA_FILE
    if extra.is_file():
        weights = load_file(str(extra))
        names = dict(model.named_parameters())
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(
                f"{extra}: weights {unknown[:5]} do not exist in the base model {base_dir}; "
                "is this the base the adapter was trained on?"
            )
        with torch.no_grad():
            for n, w in weights.items():
                if names[n].shape != w.shape:
                    raise ValueError(
                        f"{extra}: {n} has shape {tuple(w.shape)}, the base {tuple(names[n].shape)}"
                    )
                names[n].copy_(w)
    merge_lora(model)
    return model.save_pretrained(out_dir)
