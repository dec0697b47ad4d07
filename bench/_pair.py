"""The model pair every comparison bench uses: a `MultimodalLM` and transformers'
`LlavaForConditionalGeneration` built from the same configs, with the same weights.

The reference gets our weights by key renaming (transformers 5 names: `model.vision_tower.*` is the
CLIP vision transformer without the `vision_model.` level, `model.multi_modal_projector.linear_1/2`,
`model.language_model.*`, `lm_head.weight`), and `check_same_model` asserts equal logits before any
timing, so a speed difference can never be a difference of model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from encoders.towers import TowerConfig, build_tower
from mllm.chat import IGNORE_INDEX
from mllm.model import MultimodalLM, MultimodalMeta, build_lm
from mllm.projectors import build_projector


@dataclass
class PairConfig:
    """Default: ~107M parameters, LM-dominated (CLIP 6x384 at 192 px / 16 -> 144 tokens; Llama 10x768)."""

    vision: dict[str, Any] = field(
        default_factory=lambda: dict(
            image_size=192,
            patch_size=16,
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
        )
    )
    text: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=10,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=16000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    )
    select_layer: int = -2

    @classmethod
    def quick(cls) -> PairConfig:
        return cls(
            vision=dict(
                image_size=96,
                patch_size=8,
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=2,
                num_attention_heads=4,
            ),
            text=dict(
                hidden_size=256,
                intermediate_size=688,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                vocab_size=4000,
                max_position_embeddings=2048,
                tie_word_embeddings=False,
            ),
        )

    @classmethod
    def large(cls) -> PairConfig:
        """~1.2B parameters for a GPU (CLIP-L-like 24x1024 at 168 px / 14 -> 144 tokens; Llama 16x2048)."""
        return cls(
            vision=dict(
                image_size=168,
                patch_size=14,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
            ),
            text=dict(
                hidden_size=2048,
                intermediate_size=5504,
                num_hidden_layers=16,
                num_attention_heads=16,
                num_key_value_heads=16,
                vocab_size=32000,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            ),
        )

    @classmethod
    def named(cls, name: str) -> PairConfig:
        presets = {"default": cls, "quick": cls.quick, "large": cls.large}
        if name not in presets:
            raise ValueError(f"unknown config {name!r}; known: {sorted(presets)}")
        return presets[name]()

    @property
    def image_token_id(self) -> int:
        return int(self.text["vocab_size"]) - 1

    @property
    def num_image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2


def build_ours(cfg: PairConfig, attn: str = "sdpa", seed: int = 0) -> MultimodalLM:
    torch.manual_seed(seed)
    tower = build_tower(TowerConfig(type="clip", config=dict(cfg.vision), select_layer=cfg.select_layer))
    lm_cfg = dict(cfg.text, model_type="llama")
    vocab = lm_cfg.pop("vocab_size")
    lm = build_lm(None, lm_cfg, vocab, attn=attn)
    proj = build_projector("mlp2x_gelu", tower.hidden_size, cfg.text["hidden_size"])
    meta = MultimodalMeta(
        tower={}, projector="mlp2x_gelu", image_token_id=cfg.image_token_id, max_length=4096
    )
    return MultimodalLM(tower, proj, lm, meta, tokenizer=None)


def llava_keys(ours: MultimodalLM) -> dict[str, torch.Tensor]:
    """Our state dict under LlavaForConditionalGeneration's names (transformers 5)."""
    out = {}
    for k, v in ours.state_dict().items():
        if k.startswith("tower.model."):  # CLIPVisionModel; older transformers nest it under vision_model.
            rest = k[len("tower.model.") :]
            out["model.vision_tower." + rest.removeprefix("vision_model.")] = v
        elif k.startswith("projector."):
            idx, rest = k[len("projector.") :].split(".", 1)
            out[f"model.multi_modal_projector.linear_{ {'0': 1, '2': 2}[idx] }.{rest}"] = v
        elif k.startswith("lm.model."):
            out["model.language_model." + k[len("lm.model.") :]] = v
        elif k == "lm.lm_head.weight":
            out["lm_head.weight"] = v
        else:
            raise KeyError(f"no LLaVA name for {k}")
    return out


def build_reference(cfg: PairConfig, ours: MultimodalLM, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    lcfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**cfg.vision).to_dict(),
        text_config=LlamaConfig(**cfg.text).to_dict(),
        image_token_id=cfg.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.select_layer,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        image_seq_length=cfg.num_image_tokens,
        tie_word_embeddings=False,
    )
    ref = LlavaForConditionalGeneration._from_config(lcfg, attn_implementation=attn, dtype=torch.float32)
    missing, unexpected = ref.load_state_dict(llava_keys(ours), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"key mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return ref


# LLaVA-like mix of text lengths (tokens besides the 144 image tokens): (share, low, high). A stated
# assumption shaped after LLaVA-665k (short VQA answers, conversations, detailed descriptions, a tail
# of long multi-turn samples), not measured from that data (this machine has no copy of it).
LENGTH_MIX = ((0.30, 16, 64), (0.40, 64, 256), (0.20, 256, 512), (0.10, 512, 900))
QUICK_MIX = ((0.30, 8, 16), (0.40, 16, 64), (0.20, 64, 128), (0.10, 128, 225))  # --quick: the same shape, /4


def draw_samples(cfg: PairConfig, n: int, seed: int = 0, mix=LENGTH_MIX) -> list[dict[str, torch.Tensor]]:
    """n samples: a few prompt tokens, the image placeholders, text; the last ~40% of text is the answer."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    vocab = int(cfg.text["vocab_size"]) - 1
    out = []
    for _ in range(n):
        u, acc, bounds = rng.random(), 0.0, mix[-1][1:]
        for share, *rng_bounds in mix:
            acc += share
            if u <= acc:
                bounds = tuple(rng_bounds)
                break
        n_text = rng.randint(*bounds)
        pre = rng.randint(4, 12)
        text = torch.randint(3, vocab, (n_text,), generator=g)
        ids = torch.cat(
            [
                torch.randint(3, vocab, (pre,), generator=g),
                torch.full((cfg.num_image_tokens,), cfg.image_token_id),
                text,
            ]
        )
        labels = torch.full_like(ids, IGNORE_INDEX)
        n_ans = max(1, int(0.4 * n_text))
        labels[-n_ans:] = ids[-n_ans:]
        pix = torch.randn(1, 3, cfg.vision["image_size"], cfg.vision["image_size"], generator=g)
        out.append({"input_ids": ids, "labels": labels, "pixel_values": pix})
    return out


def check_same_model(
    ours: MultimodalLM, ref: LlavaForConditionalGeneration, batch: dict[str, torch.Tensor], atol: float
) -> float:
    """Assert equal logits (and loss) on `batch`; returns the max logit difference."""
    was = ours.training, ref.training
    ours.eval()
    ref.eval()
    with torch.no_grad():
        a = ours(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits.float()
        b = ref(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits.float()
        la = ours(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss
        lb = ref(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}).loss
    ours.train(was[0])
    ref.train(was[1])
    m = batch["attention_mask"].bool()
    diff = float((a - b).abs()[m].max())
    assert diff <= atol, f"logits differ by {diff} > {atol}: the two models are not the same model"
    assert abs(float(la) - float(lb)) <= atol, f"losses differ: ours {float(la)}, reference {float(lb)}"
    return diff
