"""Export a single-tower `MultimodalLM` as a transformers `LlavaForConditionalGeneration` directory.

Users arrive from transformers and expect `LlavaForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` to work on what this project trains. Because the model already
follows LLaVA's conventions (expanded `<image>` placeholders, a `Linear-GELU-Linear` projector, the
tower's hidden state at `select_layer`), the export is a key rename plus a config: no weight is
recomputed, except that a `linear` projector is written as `linear_1` followed by an identity
`linear_2` (LLaVA's projector always has two layers; `projector_hidden_act: linear` makes the
composition exact).

What cannot be expressed is refused with the reason, never approximated: a fused vision side (MoF,
router), a projector other than `linear`/`mlp2x_gelu`, a token selection LLaVA's
`vision_feature_select_strategy` cannot reproduce (DINOv2 register tokens), or a tower class that
transformers' `AutoModel` would not rebuild. Such models stay in the native format (`--format mllm`).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from encoders.common import write_meta
from encoders.registry import Registry
from encoders.towers import Tower
from mllm.hf_import import EXPORT_KIND, EXPORT_META, EXPORT_VERSION
from mllm.model import MultimodalLM

__all__ = [
    "EXPORT_META",
    "PROJECTOR_EXPORTS",
    "ExportError",
    "export_hf",
    "llava_feature_selection",
    "processor_chat_template",
]

# Written beside the transformers files: what transformers has no field for (the conversation
# template, max_length, box format, the projector's name), so `MultimodalLM.from_pretrained` on the
# export restores the model exactly rather than guessing.
# The export's own meta file, `mllm_export.json` (kind `llava_export`, format_version): EXPORT_META,
# EXPORT_KIND and EXPORT_VERSION live in mllm.hf_import, which reads it back.


class ExportError(ValueError):
    """A model that the requested format cannot express; the message says why and what to use instead."""


# ----------------------------------------------------------------------------------------- projector
ProjectorExport = Callable[[dict[str, torch.Tensor], int], tuple[dict[str, torch.Tensor], str]]
# projector name -> f(projector state_dict, d_llm) -> (LlavaMultiModalProjector state_dict, projector_hidden_act)
PROJECTOR_EXPORTS: Registry[ProjectorExport] = Registry("exportable projector")


@PROJECTOR_EXPORTS.register("mlp2x_gelu")
def _mlp2x_gelu(sd: dict[str, torch.Tensor], d_llm: int) -> tuple[dict[str, torch.Tensor], str]:
    """LLaVA-1.5's projector: the same two Linear layers, renamed (`0.` -> `linear_1.`, `2.` -> `linear_2.`)."""
    return {
        "linear_1.weight": sd["0.weight"],
        "linear_1.bias": sd["0.bias"],
        "linear_2.weight": sd["2.weight"],
        "linear_2.bias": sd["2.bias"],
    }, "gelu"


@PROJECTOR_EXPORTS.register("linear")
def _linear(sd: dict[str, torch.Tensor], d_llm: int) -> tuple[dict[str, torch.Tensor], str]:
    """LLaVA-1's single Linear: `linear_1` = it, activation `linear` (identity), `linear_2` = identity."""
    w = sd["weight"]
    eye = torch.eye(d_llm, dtype=w.dtype)
    return {
        "linear_1.weight": w,
        "linear_1.bias": sd["bias"],
        "linear_2.weight": eye,
        "linear_2.bias": torch.zeros(d_llm, dtype=w.dtype),
    }, "linear"


# ----------------------------------------------------------------------------------------- vision side
def llava_feature_selection(tower: Tower) -> tuple[str, int]:
    """(vision_feature_select_strategy, num_additional_image_tokens) reproducing the tower's selection.

    LLaVA's "default" drops exactly one leading token, "full" keeps all; the processor counts
    `grid + num_additional_image_tokens - (1 if default)` placeholders. So a tower with no prefix token
    (SigLIP) is "full"/0, one with a CLS token is "default"/1 for `patch` and "full"/1 for `cls_patch`,
    and one with register tokens (which `patch` also drops) has no LLaVA equivalent.
    """
    prefix, feature = tower.num_prefix_tokens, tower.config.select_feature
    if feature == "patch" and prefix == 0:
        return "full", 0
    if feature == "patch" and prefix == 1:
        return "default", 1
    if feature == "cls_patch" and prefix == 1:
        return "full", 1
    raise ExportError(
        f"tower {tower.config.type!r} with select_feature={feature!r} has {prefix} prefix token(s) before the "
        "patches; LLaVA's vision_feature_select_strategy can only drop one leading token ('default') or none "
        "('full'), so this selection cannot be exported to LlavaForConditionalGeneration; use --format mllm"
    )


def _check_exportable(model: MultimodalLM) -> Tower:
    tower = model.tower
    meta_fusion = getattr(model.meta, "fusion", None)  # {"type": "mof_interleaved", ...} on a fused model
    live_fusion = getattr(model, "fusion", None)
    if meta_fusion or live_fusion is not None or not isinstance(tower, Tower):
        kind = (meta_fusion.get("type") if isinstance(meta_fusion, dict) else meta_fusion) or type(
            live_fusion if live_fusion is not None else tower
        ).__name__
        raise ExportError(
            f"this model's vision side is fused ({kind}): LlavaForConditionalGeneration has exactly one vision "
            "tower read at one layer and one two-layer projector, so it cannot express several towers mixed or "
            "routed. Export it with --format mllm (the native folder, loadable by MultimodalLM.from_pretrained)"
        )
    if getattr(model, "readout", None) is not None:
        raise ExportError(
            f"this model has a {model.meta.readout.get('type')!r} readout (look tokens filled from the image "
            "after every question, mllm.readout): LlavaForConditionalGeneration only places image features at "
            "<image> tokens, so the export would drop it. Export it with --format mllm"
        )
    if getattr(tower, "hidden_states_are_maps", False):
        raise ExportError(
            f"tower {tower.config.type!r} is convolutional: its hidden states are [B, C, H, W] maps, and "
            "LlavaModel takes vision_feature_layer from them as [B, N, D] token sequences (it never flattens a "
            "map), so LlavaForConditionalGeneration cannot run it. Export it with --format mllm"
        )
    if model.meta.projector not in PROJECTOR_EXPORTS:
        raise ExportError(
            f"projector {model.meta.projector!r} has no LlavaMultiModalProjector equivalent (Linear-act-Linear); "
            f"exportable: {sorted(PROJECTOR_EXPORTS)}. Use --format mllm for this model"
        )
    hf_cls = type(tower.model)
    auto_cls = AutoModel._model_mapping.get(type(tower.model.config), None)
    if auto_cls is not hf_cls:
        raise ExportError(
            f"tower class {hf_cls.__name__} is not what transformers' AutoModel builds for "
            f"{type(tower.model.config).__name__} ({getattr(auto_cls, '__name__', None)}), so LlavaModel could "
            "not rebuild it; use --format mllm"
        )
    llava_feature_selection(tower)
    return tower


def _image_processor(tower: Tower) -> BaseImageProcessor:
    """The tower's own processor; LLaVA's when the tower pads to square (only it has `do_pad`).

    LlavaImageProcessor pads with `int(mean * 255)` centred, exactly like `encoders.towers.expand2square`,
    then resizes/crops as the CLIP processor does, so the pixels are the same.
    """
    proc = tower.processor
    if not tower.config.pad_to_square:
        return proc
    keys = (
        "do_resize",
        "size",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )
    settings = {k: v for k, v in proc.to_dict().items() if k in keys and v is not None}
    crop = getattr(proc, "crop_size", None)
    settings["do_center_crop"] = bool(getattr(proc, "do_center_crop", False))
    if crop is not None and settings["do_center_crop"]:
        settings["crop_size"] = proc.to_dict()["crop_size"]
    return LlavaImageProcessorPil(**settings, do_pad=True)


# ----------------------------------------------------------------------------------------- chat template
# Jinja per conversation template, rendering transformers' message format (content: a string, or a list of
# {"type": "image"} / {"type": "text", "text": ...} items) into the same text `mllm.chat` trains on.
NL = "{{ '\\n' }}"  # an explicit newline: whitespace control (`-%}`) would eat a literal one
_CONTENT = (
    "{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
    "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}<image>{%- if not loop.last -%}"
    + NL
    + "{%- endif -%}{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
CHAT_TEMPLATES: Registry[str] = Registry("exportable chat template")
CHAT_TEMPLATES.register(
    "chatml",
    _CONTENT
    + (
        "{%- for m in messages -%}<|im_start|>{{ m['role'] }}"
        + NL
        + "{{ content(m) }}<|im_end|>"
        + NL
        + "{%- endfor -%}{%- if add_generation_prompt -%}<|im_start|>assistant"
        + NL
        + "{%- endif -%}"
    ),
)
CHAT_TEMPLATES.register(
    "vicuna_v1",
    _CONTENT
    + (
        "{%- set sys = namespace(text='A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human\\'s questions.') -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set sys.text = content(m) -%}{%- endfor -%}"
        "{{ sys.text ~ ' ' }}"
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ 'USER: ' ~ content(m) ~ ' ASSISTANT:' }}"
        "{%- elif m['role'] == 'assistant' -%}{{ ' ' ~ content(m) ~ eos_token }}{%- endif -%}{%- endfor -%}"
    ),
)
CHAT_TEMPLATES.register(
    "plain",
    _CONTENT
    + (
        "{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
        "{%- if m['content'] is string -%}{{ '<image>' * (m['content'].count('<image>')) }}{%- else -%}"
        "{%- for c in m['content'] if c['type'] == 'image' -%}<image>{%- endfor -%}{%- endif -%}"
        + NL
        + "{%- elif m['role'] == 'assistant' -%}{{ content(m) ~ eos_token }}{%- endif -%}{%- endfor -%}"
    ),
)


def processor_chat_template(model: MultimodalLM) -> str | None:
    """The chat template matching the model's training template (the tokenizer's own for `tokenizer`)."""
    name = model.meta.template
    if name == "tokenizer":
        return getattr(model.tokenizer, "chat_template", None)
    if name not in CHAT_TEMPLATES:
        raise ExportError(f"no chat template to export for conversation template {name!r}")
    return CHAT_TEMPLATES[name]


# ----------------------------------------------------------------------------------------- export
def _lm_state(model: MultimodalLM) -> dict[str, torch.Tensor]:
    """The causal LM's weights under LlavaForConditionalGeneration's names (transformers 5 layout)."""
    prefix = model.lm.base_model_prefix + "."
    out = {}
    for k, v in model.lm.state_dict().items():
        out[("model.language_model." + k[len(prefix) :]) if k.startswith(prefix) else k] = v
    return out


def llava_config(model: MultimodalLM) -> LlavaConfig:
    tower = _check_exportable(model)
    strategy, _ = llava_feature_selection(tower)
    _, act = PROJECTOR_EXPORTS[model.meta.projector](model.projector.state_dict(), _d_llm(model))
    text = model.lm.config
    return LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=text.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=tower.config.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def _d_llm(model: MultimodalLM) -> int:
    return model.lm.get_input_embeddings().embedding_dim


def llava_state_dict(model: MultimodalLM) -> dict[str, torch.Tensor]:
    tower = _check_exportable(model)
    proj, _ = PROJECTOR_EXPORTS[model.meta.projector](model.projector.state_dict(), _d_llm(model))
    sd = {f"model.vision_tower.{k}": v for k, v in tower.model.state_dict().items()}
    sd.update({f"model.multi_modal_projector.{k}": v for k, v in proj.items()})
    sd.update(_lm_state(model))
    return sd


def export_hf(model: MultimodalLM, out_dir: str | Path) -> Path:
    """Write `out_dir` as a transformers LLaVA directory (config, safetensors, processor, tokenizer).

    Written to a temporary folder beside `out_dir` and renamed, so a failed export leaves nothing half done.
    """
    if model.tokenizer is None:
        raise ExportError("the model has no tokenizer; an HF export needs one for the processor")
    tower = _check_exportable(model)
    strategy, n_extra = llava_feature_selection(tower)
    config = llava_config(model)
    state = {k: v.detach().contiguous().cpu() for k, v in llava_state_dict(model).items()}
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration._from_config(config, dtype=_dtype(model))
    # assign=True puts our tensors in place of the meta ones: no second copy of a 7B model in memory.
    missing, unexpected = llava.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"key mapping mismatch: missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if tied:
        llava.tie_weights()

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        llava.save_pretrained(tmp, safe_serialization=True)
        tokenizer = copy.deepcopy(model.tokenizer)  # the chat template below must not change the live model's
        template = processor_chat_template(model)
        if template is not None:  # the tokenizer alone (AutoTokenizer) formats chats the same way
            tokenizer.chat_template = template
        processor = LlavaProcessor(
            image_processor=_image_processor(tower),
            tokenizer=tokenizer,
            patch_size=tower.patch_size,
            vision_feature_select_strategy=strategy,
            chat_template=template,
            image_token=model.meta.image_token,
            num_additional_image_tokens=n_extra,
        )
        processor.save_pretrained(str(tmp))
        meta = asdict(model.meta)
        meta.pop("tower", None)
        write_meta(
            tmp / EXPORT_META,
            EXPORT_KIND,
            EXPORT_VERSION,
            {"meta": meta, "tower": {"type": tower.config.type, "pad_to_square": tower.config.pad_to_square}},
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _dtype(model: MultimodalLM) -> torch.dtype:
    return next(model.lm.parameters()).dtype
