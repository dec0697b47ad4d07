"""Read a transformers LLaVA directory (`LlavaForConditionalGeneration`) as the parts of a `MultimodalLM`.

`read_llava` returns the parts; `mllm.model.load_llava` (and `MultimodalLM.from_pretrained`, which
dispatches on `is_llava_dir`) assembles them, so this module sits below mllm.model and imports it not.

A user with an `llava-hf/*` checkpoint (or one exported by `mllm export --format hf`) should be able to
fine-tune, chat and evaluate it here without converting anything by hand. transformers itself reads
the weights (so every key layout it knows, including the pre-5.0 `language_model.model.*` one, works);
this module then hands the very same modules to a `Tower`, a projector and a causal LM, without a
second copy of the weights.

The mapping is the inverse of `mllm.hf_export`: `vision_feature_layer` -> `select_layer`,
`vision_feature_select_strategy` (+ whether the tower has a CLS token) -> `select_feature`, the image
processor's `do_pad` -> `pad_to_square`, `projector_hidden_act` gelu -> `mlp2x_gelu` and linear ->
`linear` (the two Linear layers folded into one, exact up to float rounding). A model it cannot
represent faithfully is refused with the reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from encoders.common import read_meta
from encoders.towers import IMAGE_PROCESSOR_BACKEND, TOWERS, Tower, TowerConfig
from mllm.projectors import build_projector
from mllm.tokenizer import load_tokenizer

__all__ = ["ImportError_", "LlavaParts", "is_llava_dir", "read_llava", "resolve_model_path"]

EXPORT_META = "mllm_export.json"  # written by mllm.hf_export: the export's meta file (kind, format_version)
EXPORT_KIND = "llava_export"
EXPORT_VERSION = 1
# LLaVA-1.5's conversation format, which the llava-hf processors' chat templates reproduce.
DEFAULT_TEMPLATE = "vicuna_v1"


class ImportError_(ValueError):  # noqa: N801 - not the builtin ImportError: a model that cannot be represented
    """A LLaVA directory whose configuration has no MultimodalLM equivalent; the message says which field."""


def is_llava_dir(path: str | Path) -> bool:
    """A directory whose config.json says `model_type: llava` (what `from_pretrained` dispatches on)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "llava"
    except (json.JSONDecodeError, OSError):
        return False


def resolve_model_path(path: str, allow_network: bool, what: str) -> str:
    """A local directory for `path`: itself if it is one, else (only with `allow_network`) a hub snapshot.

    Offline is the default so that a typo in a path is an error here, not a silent multi-GB download.
    """
    if os.path.isdir(path):
        return path
    if not allow_network:
        raise FileNotFoundError(
            f"{what} {path!r} is not a local directory; hub names are used only when the recipe allows the "
            "network (model.allow_network: true, and HF_HUB_OFFLINE=0 in the environment)"
        )
    from huggingface_hub import snapshot_download  # lazy: the network path, taken only when allowed

    return snapshot_download(path)


def _tower_type(model_type: str) -> str:
    for name, cls in TOWERS.items():
        if cls.config_cls.model_type == model_type:
            return name
    known = sorted(cls.config_cls.model_type for cls in TOWERS.values())
    raise ImportError_(f"vision_config.model_type {model_type!r} has no tower here; known: {known}")


def _select_feature(strategy: str, has_cls: bool, prefix: int, where: str) -> str:
    if prefix > 1:
        raise ImportError_(
            f"{where}: the vision tower has {prefix} prefix tokens (registers); LLaVA's "
            f"{strategy!r} strategy keeps some of them, which no tower selection here reproduces"
        )
    if strategy == "full":
        return "cls_patch" if has_cls else "patch"
    if strategy == "default" and has_cls:
        return "patch"
    raise ImportError_(
        f"{where}: vision_feature_select_strategy={strategy!r} on a tower without a CLS token "
        "drops the first patch, which no tower selection here reproduces"
    )


def _processor_settings(model_dir: Path, tower_cls: type[Tower], where: str) -> tuple[Any, bool]:
    """The tower family's processor with the checkpoint's settings, and whether LLaVA pads to square."""
    proc = AutoImageProcessor.from_pretrained(
        str(model_dir), backend=IMAGE_PROCESSOR_BACKEND, local_files_only=True
    )
    settings = proc.to_dict()
    pad = bool(settings.pop("do_pad", False))
    if isinstance(proc, tower_cls.processor_cls):
        return proc, pad
    keys = (
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )
    return tower_cls.processor_cls(**{k: v for k, v in settings.items() if k in keys and v is not None}), pad


def _projector(
    config: LlavaConfig, llava: LlavaForConditionalGeneration, d_in: int, d_llm: int, where: str
) -> tuple[str, nn.Module]:
    src = llava.model.multi_modal_projector
    sd = {k: v.detach() for k, v in src.state_dict().items()}
    if not config.multimodal_projector_bias:  # no bias is a zero bias
        sd["linear_1.bias"] = torch.zeros(d_llm, dtype=sd["linear_1.weight"].dtype)
        sd["linear_2.bias"] = torch.zeros(d_llm, dtype=sd["linear_1.weight"].dtype)
    act = config.projector_hidden_act
    if act == "gelu":
        proj = build_projector("mlp2x_gelu", d_in, d_llm)
        proj.load_state_dict(
            {
                "0.weight": sd["linear_1.weight"],
                "0.bias": sd["linear_1.bias"],
                "2.weight": sd["linear_2.weight"],
                "2.bias": sd["linear_2.bias"],
            }
        )
        return "mlp2x_gelu", proj
    if act == "linear":  # Linear(Linear(x)) is one Linear: W = W2 W1, b = W2 b1 + b2
        w1, b1 = sd["linear_1.weight"].double(), sd["linear_1.bias"].double()
        w2, b2 = sd["linear_2.weight"].double(), sd["linear_2.bias"].double()
        proj = build_projector("linear", d_in, d_llm)
        dtype = sd["linear_1.weight"].dtype
        proj.load_state_dict({"weight": (w2 @ w1).to(dtype), "bias": (w2 @ b1 + b2).to(dtype)})
        return "linear", proj
    raise ImportError_(
        f"{where}: projector_hidden_act={act!r}; only 'gelu' (mlp2x_gelu) and 'linear' map onto "
        "this project's projectors"
    )


def _causal_lm(llava: LlavaForConditionalGeneration, attn: str) -> nn.Module:
    """The LLaVA's language model and head inside their own `*ForCausalLM` (modules moved, not copied)."""
    text_config = llava.config.text_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config, attn_implementation=attn)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.set_output_embeddings(llava.lm_head)
    if getattr(text_config, "tie_word_embeddings", False) or llava.config.tie_word_embeddings:
        lm.tie_weights()
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise ImportError_(f"{type(lm).__name__} has parts LLaVA does not carry: {left[:5]}")
    return lm


def _stored_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / EXPORT_META
    return read_meta(path, EXPORT_KIND, EXPORT_VERSION).get("meta", {}) if path.is_file() else {}


class LlavaParts(NamedTuple):
    """What `MultimodalLM(tower, projector, lm, MultimodalMeta(**meta), tokenizer)` is built from."""

    tower: Tower
    projector: nn.Module
    lm: nn.Module
    meta: dict[str, Any]  # MultimodalMeta's fields
    tokenizer: Any


def read_llava(
    model_dir: str | Path,
    torch_dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    template: str | None = None,
) -> LlavaParts:
    """The parts of a `MultimodalLM` holding the weights of the transformers LLaVA directory `model_dir`
    (`mllm.model.load_llava` assembles them).

    The conversation template comes from `template`, else from the export's `mllm_export.json`, else
    LLaVA-1.5's `vicuna_v1`.
    """
    model_dir = Path(model_dir)
    where = str(model_dir)
    config = LlavaConfig.from_pretrained(str(model_dir), local_files_only=True)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ImportError_(
            f"{where}: vision_feature_layer={layer!r} concatenates several layers; a tower here "
            "reads one (select_layer)"
        )
    tower_type = _tower_type(config.vision_config.model_type)
    tower_cls = TOWERS[tower_type]
    if tower_cls.hidden_states_are_maps:
        raise ImportError_(
            f"{where}: vision tower {tower_type!r} is convolutional; transformers' LLaVA reads its "
            "hidden states as token sequences, so this folder cannot be a working LLaVA model"
        )
    llava = LlavaForConditionalGeneration.from_pretrained(
        str(model_dir),
        local_files_only=True,
        use_safetensors=True,
        attn_implementation=attn_implementation,
        dtype=torch_dtype or torch.float32,
    )
    vision = llava.model.vision_tower
    if type(vision) is not tower_cls.model_cls:
        raise ImportError_(
            f"{where}: vision tower {type(vision).__name__}, expected {tower_cls.model_cls.__name__}"
        )
    prefix = int(tower_cls.has_cls) + int(getattr(vision.config, "num_register_tokens", 0) or 0)
    feature = _select_feature(config.vision_feature_select_strategy, tower_cls.has_cls, prefix, where)
    processor, pad = _processor_settings(model_dir, tower_cls, where)
    tower_cfg = TowerConfig(type=tower_type, select_layer=layer, select_feature=feature, pad_to_square=pad)
    tower = tower_cls(tower_cfg, vision, processor)
    tower_cfg.config = tower.hf_config_dict()

    lm = _causal_lm(llava, attn_implementation)
    d_llm = lm.get_input_embeddings().embedding_dim
    proj_name, projector = _projector(config, llava, tower.hidden_size, d_llm, where)

    tokenizer = load_tokenizer(model_dir)
    stored = _stored_meta(model_dir)
    image_token = tokenizer.convert_ids_to_tokens(int(config.image_token_index))
    max_len = tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else 2048
    meta = dict(
        tower=dict(vars(tower_cfg)),
        projector=proj_name,
        image_token=image_token,
        image_token_id=int(config.image_token_index),
        template=template or stored.get("template", DEFAULT_TEMPLATE),
        max_length=int(stored.get("max_length", max_len)),
        box_format=stored.get("box_format", "norm1"),
    )
    return LlavaParts(tower, projector, lm, meta, tokenizer)
