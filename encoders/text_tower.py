"""Text towers for contrastive training: a registry of adapters over real Hugging Face text encoders.

A text tower turns strings into token ids with the project's tokenizer (BOS + text + EOS, right
padding, truncated so the EOS is always kept) and ids into a pooled embedding plus per-token states.
Pooling is done here, at the last real token (the EOS we append), rather than by the HF model: CLIP's
own pooler picks `input_ids.argmax()` when `eos_token_id == 2`, which is the EOS only for OpenAI's
vocabulary, not for a tokenizer trained on GeoWorld.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedModel, PreTrainedTokenizerBase

from encoders.registry import Registry

# A tiny CLIP text transformer: 128 wide, 3 layers, 4 heads, 64 positions (GeoWorld captions are short).
TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
}


@dataclass
class TextTowerConfig:
    """How to build a text tower. `path`: a local HF directory; else `config` over the class defaults."""

    type: str = "clip"  # registry key, see TEXT_TOWERS
    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    max_length: int = 64  # tokens including BOS and EOS; longer texts are cut (EOS kept)


class TextTower(nn.Module):
    """An HF text encoder + the tokenizer that feeds it."""

    model_cls: ClassVar[type[PreTrainedModel]]

    def __init__(self, config: TextTowerConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.hidden_size)
        limit = int(getattr(model.config, "max_position_embeddings", config.max_length))
        if config.max_length > limit:
            raise ValueError(f"text max_length {config.max_length} exceeds the model's {limit} positions")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(
                    f"the text tokenizer has no {name[:-3]}; the text tower needs BOS, EOS and pad"
                )

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each [B, T]: BOS + tokens + EOS, right-padded to the longest."""
        tok = self.tokenizer
        body = tok(list(texts), add_special_tokens=False)["input_ids"]
        room = self.config.max_length - 2
        rows = [[tok.bos_token_id, *ids[:room], tok.eos_token_id] for ids in body]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D] at the EOS, tokens [B, T, D]) from the final layer (after the final norm)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        last = attention_mask.long().sum(1).clamp(min=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return pooled, hidden

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """An ordinary HF directory (config.json + model.safetensors), loadable by plain transformers."""
        self.model.save_pretrained(directory, safe_serialization=True)


TEXT_TOWERS: Registry[type[TextTower]] = Registry("text tower type")


def register_text_tower(name: str) -> Callable[[type[TextTower]], type[TextTower]]:
    """Class decorator: add a text tower class to `TEXT_TOWERS` under `name` (`TextTowerConfig.type`)."""
    return TEXT_TOWERS.register(name)


@register_text_tower("clip")
class ClipTextTower(TextTower):
    """OpenAI CLIP's causal text transformer (`CLIPTextModel`); also loads from a full CLIPModel folder."""

    model_cls = CLIPTextModel

    @staticmethod
    def build_config(config: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> CLIPTextConfig:
        kwargs = dict(config.get("text_config", config))
        kwargs.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextConfig(**kwargs)


def build_text_tower(cfg: TextTowerConfig, tokenizer: PreTrainedTokenizerBase) -> TextTower:
    """The text tower `cfg` describes, fed by `tokenizer` (whose vocabulary must fit the embeddings)."""
    cls = TEXT_TOWERS[cfg.type]
    if cfg.path is not None:
        if not os.path.isdir(cfg.path):
            raise FileNotFoundError(f"text tower path {cfg.path!r} is not a local directory")
        model = cls.model_cls.from_pretrained(
            cfg.path, local_files_only=True, use_safetensors=True, dtype=torch.float32
        )
    else:
        model = cls.model_cls._from_config(cls.build_config(cfg.config, tokenizer), dtype=torch.float32)
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < len(tokenizer):
        raise ValueError(
            f"text tower has {vocab} token embeddings but the tokenizer has {len(tokenizer)} tokens"
        )
    return cls(cfg, model, tokenizer)
