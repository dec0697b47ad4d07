"""CoCa and SyCoCa: a contrastive pair that also captions (and, for SyCoCa, rebuilds masked patches from text).

CoCa (Yu et al. 2022, "CoCa: Contrastive Captioners are Image-Text Foundation Models"):
  - attentional pooling: learned queries cross-attend to the image encoder's output tokens; one query
    gives the image embedding of the contrastive loss, `n_queries` give the tokens the decoder reads;
  - the text decoder's first half is unimodal (causal self-attention, no image): its last-token output is
    the text embedding. Here that half is the pair's own text tower, a causal `CLIPTextModel` pooled at
    the EOS appended to every caption (CoCa's [CLS] appended at the end), so nothing about the contrastive
    side changes but the image pooling;
  - the second half, `multimodal_layers` torch `nn.TransformerDecoderLayer`s (causal self-attention +
    cross-attention to the pooled image tokens), predicts the caption token by token;
  - L = λ_con · L_con + λ_cap · L_cap, L_con = the recipe's objective (CLIP's InfoNCE by default) on the
    pooled embeddings, L_cap = −mean over caption tokens t of log P(y_t | y_<t, image) (λ 1 and 2).

SyCoCa (Ma et al. 2024, "SyCoCa: Symmetrizing Contrastive Captioners with Attentive Masking for
Multimodal Alignment") adds the text→image direction at the local level, text-guided masked image
modelling (TG-MIM) with attentive masking. The form implemented (from the abstract and the paper's
description; where the paper's exact choice was not at hand it is a named option):
  - attentive masking: score each patch token by the cosine, in the shared space, between the caption's
    unimodal embedding and the patch's projection (no gradient); mask the k = round(mask_ratio · N)
    patches the text attends to most (`select: most`, default; `least` and `random` as controls);
  - the image encoder runs again on the image with those patches blanked (pixels set to 0, the
    normalised mean), so no masked pixel leaks into the visible tokens;
  - an image decoder (`mim.layers` decoder layers: self-attention over the tokens, masked ones replaced
    by a learned mask token plus a fixed 2-D sin-cos position, and cross-attention to the text tokens)
    predicts the masked patches' pixels; L_mim = mean over masked patches of ‖pred − target‖² / P
    (target: per-patch normalised pixels, MAE's norm_pix, by default);
  - L = λ_con · L_con + λ_cap · L_cap + λ_mim · L_mim. ITC and captioning see the whole image.

`CocaModel` is a `ContrastiveModel` (model.kind `contrastive` with `model.encoder.coca`): the same towers,
heads, objective registry and saved layout plus `coca.safetensors`, so `image_tower/` loads into a
MultimodalLM and `mllm eval retrieval` / `mmvp_vlm` score it through `encode_image` (the contrastive
pooler) and `encode_text` (the unimodal text embedding). Its parts live under the `coca` child module,
which the `contrastive` stage kind trains when present.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.coca_config import CocaConfig, MimConfig
from encoders.common import read_meta
from encoders.contrastive import (
    META_FILE,
    PAIR_KINDS,
    ContrastiveHeads,
    ContrastiveModel,
    ContrastiveOutput,
    EncoderConfig,
)
from encoders.gather import all_reduce_sum, dist_info
from encoders.text_tower import TextTower
from encoders.towers import Tower

COCA_WEIGHTS = "coca.safetensors"

__all__ = [
    "AttentionalPooler",
    "CocaModel",
    "MultimodalDecoder",
    "TextGuidedMIM",
    "attentive_mask",
    "caption_loss",
    "is_coca_dir",
    "mask_patches",
    "mim_loss",
    "patchify",
    "sincos_2d",
]


# --------------------------------------------------------------------------------------------------------
# Pure functions (tested against naive transcriptions in tests/test_coca.py)
# --------------------------------------------------------------------------------------------------------


def caption_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Next-token cross entropy: logits [B, T, V] at position t predict input_ids[:, t + 1]; the mean over
    every real target token of the batch (a padded position is neither predicted nor a target).

    Distributed, the global batch's mean: this rank's sum over the mean count per rank, so the mean over
    ranks (what data-parallel training averages) is the one-process loss whatever each rank's lengths."""
    target = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool()
    nll = F.cross_entropy(
        logits[:, :-1][valid].float(), target[valid], label_smoothing=label_smoothing, reduction="sum"
    )
    count = valid.sum().float()
    _, world = dist_info()
    if world > 1:
        count = all_reduce_sum(count) / world
    return nll / count.clamp(min=1.0)


def attentive_mask(
    scores: torch.Tensor, n_mask: int, select: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """bool [B, N]: True on the `n_mask` patches of each row to mask, by text-patch `scores` [B, N]
    (`most`: the highest, `least`: the lowest, `random`: a uniform draw, scores unused)."""
    if not 0 < n_mask < scores.shape[1]:
        raise ValueError(f"n_mask must be in [1, {scores.shape[1] - 1}], got {n_mask}")
    if select == "random":
        scores = torch.rand(scores.shape, generator=generator).to(scores.device)
    elif select not in ("most", "least"):
        raise ValueError(f"select must be most, least or random, got {select!r}")
    idx = scores.topk(n_mask, dim=1, largest=select != "least").indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, idx, True)


def patchify(pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, grid², p·p·C]: patches in row-major order (token y·grid + x, as a ViT's), each
    flattened (row, column, channel), MAE's layout."""
    b, c, h, w = pixels.shape
    p = h // grid
    if p * grid != h or p * grid != w:
        raise ValueError(f"a {h}x{w} image is not a {grid}x{grid} grid of square patches")
    x = pixels.reshape(b, c, grid, p, grid, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, grid * grid, p * p * c)


def mask_patches(pixels: torch.Tensor, mask: torch.Tensor, grid: int, value: float = 0.0) -> torch.Tensor:
    """The image with the patches where `mask` [B, grid²] is True set to `value`."""
    b, _, h, w = pixels.shape
    p = h // grid
    m = mask.reshape(b, 1, grid, 1, grid, 1).expand(b, 1, grid, p, grid, p).reshape(b, 1, h, w)
    return pixels.masked_fill(m, value)


def mim_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean over masked patches of the per-pixel squared error; `norm_pix`: each target patch normalised
    by its own mean and (unbiased) variance first, as MAE."""
    target = target.float()
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    err = (pred.float() - target).pow(2).mean(-1)
    m = mask.float()
    return (err * m).sum() / m.sum().clamp(min=1.0)


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [grid², dim] (MAE's decoder positions): half the channels code the
    row, half the column, each as sin and cos at dim/4 frequencies."""
    if dim % 4:
        raise ValueError(f"the image decoder width must be a multiple of 4, got {dim}")
    k = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4)
    omega = 1.0 / 10000**k
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        a = pos.reshape(-1, 1).double() * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([code(ys), code(xs)], dim=1).float()


# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------


def _decoder(width: int, heads: int, layers: int) -> nn.TransformerDecoder:
    layer = nn.TransformerDecoderLayer(
        width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(width))


class AttentionalPooler(nn.Module):
    """`n_queries` learned queries attending to the image tokens (one multi-head cross-attention, CoCa's
    attentional pooling): [B, N, context_dim] -> [B, n_queries, width]."""

    def __init__(self, width: int, context_dim: int, n_queries: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, width) * width**-0.5)
        self.ln_k = nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(width, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.query.to(kv.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return self.ln_q(out)


class MultimodalDecoder(nn.Module):
    """CoCa's multimodal half: causal self-attention over the unimodal text states, cross-attention to the
    pooled image tokens, then the vocabulary head. Right padding needs no key mask: under the causal mask
    a real position never sees a later pad, and pad positions are not scored."""

    def __init__(self, width: int, heads: int, layers: int, vocab: int):
        super().__init__()
        self.layers = _decoder(width, heads, layers)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, text_states: torch.Tensor, image_queries: torch.Tensor) -> torch.Tensor:
        t = text_states.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=text_states.device).triu(1)
        x = self.layers(text_states, image_queries.to(text_states.dtype), tgt_mask=causal, tgt_is_causal=True)
        return self.lm_head(x)


class TextGuidedMIM(nn.Module):
    """SyCoCa's image decoder: masked tokens -> mask token + position; self-attention over the image tokens,
    cross-attention to the (projected) text tokens; a linear head to each patch's pixels."""

    def __init__(self, image_dim: int, text_dim: int, patch_pixels: int, cfg: MimConfig):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(image_dim) * 0.02)
        self.text_in = nn.Linear(text_dim, image_dim)
        self.decoder = _decoder(image_dim, cfg.heads, cfg.layers)
        self.pixel_head = nn.Linear(image_dim, patch_pixels)

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """tokens [B, N, D] of the masked image, mask [B, N] -> predicted pixels [B, N, patch_pixels]."""
        grid = math.isqrt(tokens.shape[1])
        pos = sincos_2d(grid, tokens.shape[-1]).to(tokens.device, tokens.dtype)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens) + pos
        memory = self.text_in(text_states.to(self.text_in.weight.dtype))
        x = self.decoder(x, memory, memory_key_padding_mask=~text_mask.bool())
        return self.pixel_head(x)


def _check_heads(key: str, heads: int, *widths: int) -> None:
    """Attention heads must divide the widths they split (known only once the towers are built)."""
    if any(w % heads for w in widths):
        raise ValueError(f"model.encoder.coca.{key} ({heads}) must divide the widths {widths}")


class CocaParts(nn.Module):
    """Everything CoCa adds to the pair, under one child (`coca`) so a stage trains it by one prefix."""

    def __init__(self, tower: Tower, text: TextTower, cfg: CocaConfig):
        super().__init__()
        dv, dt = tower.output_size, text.hidden_size
        _check_heads("heads", cfg.heads, dv, dt)
        if cfg.mim is not None:
            _check_heads("mim.heads", cfg.mim.heads, dv)
        layers = cfg.multimodal_layers or int(text.model.config.num_hidden_layers)
        vocab = text.model.get_input_embeddings().num_embeddings
        self.con_pool = AttentionalPooler(dv, dv, 1, cfg.heads)
        self.cap_pool = AttentionalPooler(dt, dv, cfg.n_queries, cfg.heads)
        self.decoder = MultimodalDecoder(dt, cfg.heads, layers, vocab)
        self.mim: TextGuidedMIM | None = None
        if cfg.mim is not None:
            channels = int(getattr(tower.model.config, "num_channels", 3))
            self.mim = TextGuidedMIM(dv, dt, channels * tower.patch_size**2, cfg.mim)


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------


def is_coca_dir(path: str | Path) -> bool:
    """Whether `path` is a saved CocaModel (a contrastive folder whose encoder has a coca section)."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / COCA_WEIGHTS).is_file():
        return False
    try:
        meta = read_meta(path / META_FILE, PAIR_KINDS)
    except (OSError, ValueError):
        return False
    return bool((meta.get("encoder") or {}).get("coca"))


class CocaModel(ContrastiveModel):
    """A ContrastiveModel with CoCa's poolers and captioning decoder (+ SyCoCa's TG-MIM with `coca.mim`)."""

    def __init__(
        self,
        image_tower: Tower,
        text_tower: TextTower,
        cfg: EncoderConfig,
        heads: ContrastiveHeads | None = None,
    ):
        super().__init__(image_tower, text_tower, cfg, heads)
        if cfg.coca is None:
            raise ValueError("CocaModel needs model.encoder.coca")
        cfg.coca.check_objective(self.objective)
        self.coca = CocaParts(image_tower, text_tower, cfg.coca)

    @property
    def coca_cfg(self) -> CocaConfig:
        assert self.cfg.coca is not None
        return self.cfg.coca

    # ------------------------------------------------------------------ encoding
    def _image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(normalised embedding [B, E] from the one-query pooler, the tower's final tokens, its pooler
        output, which CoCa does not use)."""
        hidden, pooled = self.image_tower.final_outputs(pixel_values)
        emb = self.coca.con_pool(hidden)[:, 0]
        return F.normalize(self.heads.image_proj(emb), dim=-1), hidden, pooled

    def encode_image(self, pixel_values: torch.Tensor, tokens: bool = False):
        """CoCa's image embedding: the contrastive pooler's one query, projected and normalised; with
        `tokens`, also the projected, normalised patch tokens."""
        emb, hidden, _ = self._image(pixel_values)
        if not tokens:
            return emb
        patches = hidden[:, self.image_tower.num_prefix_tokens :]
        return emb, F.normalize(self.heads.image_proj(patches), dim=-1)

    # ------------------------------------------------------------------ training
    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any
    ) -> ContrastiveOutput:
        cc = self.coca_cfg
        img, hidden, tower_pooled = self._image(pixel_values)
        txt_pooled, txt_states = self.text_tower(input_ids, attention_mask)
        txt = F.normalize(self.heads.text_proj(txt_pooled), dim=-1)
        l_con, stats = self.objective(img, txt, self.logit_scale(), self.logit_bias())
        logits = self.coca.decoder(txt_states, self.coca.cap_pool(hidden))
        l_cap = caption_loss(logits, input_ids, attention_mask, cc.label_smoothing)
        loss = cc.contrastive_weight * l_con + cc.caption_weight * l_cap
        stats = dict(stats, loss_con=l_con.detach(), loss_cap=l_cap.detach())
        if cc.mim is not None:
            l_mim, mim_stats = self._mim(pixel_values, hidden, txt, txt_states, attention_mask)
            loss = loss + cc.mim.weight * l_mim
            stats.update(mim_stats, loss_mim=l_mim.detach())
        if tower_pooled is not None:  # unused by CoCa; kept in the graph so data-parallel wrappers see it
            loss = loss + 0.0 * tower_pooled.sum().to(loss.dtype)
        return ContrastiveOutput(loss, stats)

    def _mim(
        self,
        pixel_values: torch.Tensor,
        hidden: torch.Tensor,
        txt: torch.Tensor,
        txt_states: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SyCoCa's TG-MIM: attentive mask from the text-patch scores, the tower on the masked image, the
        image decoder guided by the text tokens, the loss on the masked patches."""
        mcfg = self.coca_cfg.mim
        assert mcfg is not None and self.coca.mim is not None
        prefix = self.image_tower.num_prefix_tokens
        patches = hidden[:, prefix:]
        n = patches.shape[1]
        grid = math.isqrt(n)
        p = self.image_tower.patch_size
        if grid * grid != n or pixel_values.shape[-1] != grid * p or pixel_values.shape[-2] != grid * p:
            raise ValueError(
                f"SyCoCa's TG-MIM needs a square grid of patch_size ({p}) patches as the tower's final "
                f"tokens; got {n} tokens for a {tuple(pixel_values.shape[-2:])} image"
            )
        with torch.no_grad():
            scores = torch.einsum(
                "bne,be->bn", F.normalize(self.heads.image_proj(patches), dim=-1).float(), txt.float()
            )
        n_mask = min(max(round(mcfg.mask_ratio * n), 1), n - 1)
        mask = attentive_mask(scores, n_mask, mcfg.select)
        masked, _ = self.image_tower.final_outputs(mask_patches(pixel_values, mask, grid))
        pred = self.coca.mim(masked[:, prefix:], mask, txt_states, text_mask)
        loss = mim_loss(pred, patchify(pixel_values.to(pred.dtype), grid), mask, mcfg.norm_pix)
        # how much more text-similar the masked patches are than the image's average (0 for random)
        gap = (scores * mask).sum(1) / n_mask - scores.mean(1)
        return loss, {"mim_score_gap": gap.mean().detach()}

    # ------------------------------------------------------------------ captioning
    @torch.no_grad()
    def generate_captions(self, pixel_values: torch.Tensor, max_new_tokens: int = 32) -> list[str]:
        """Greedy captions from BOS (no cache: the decoder is re-run on the growing prefix)."""
        tok = self.tokenizer
        _, hidden, _ = self._image(pixel_values)
        queries = self.coca.cap_pool(hidden)
        b = pixel_values.shape[0]
        ids = torch.full((b, 1), tok.bos_token_id, dtype=torch.long, device=hidden.device)
        done = torch.zeros(b, dtype=torch.bool, device=hidden.device)
        limit = min(max_new_tokens + 1, self.text_tower.config.max_length)
        while ids.shape[1] < limit and not bool(done.all()):
            _, states = self.text_tower(ids, torch.ones_like(ids))
            nxt = self.coca.decoder(states, queries)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == tok.eos_token_id
        return tok.batch_decode(ids[:, 1:], skip_special_tokens=True)

    # ------------------------------------------------------------------ persistence
    def write_parts(self, folder: Path) -> None:
        super().write_parts(folder)
        state = {k: v.detach().contiguous().cpu().float() for k, v in self.coca.state_dict().items()}
        save_file(state, str(folder / COCA_WEIGHTS))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> CocaModel:
        """A saved CocaModel: the pair (ContrastiveModel's loader, built as this class) + coca.safetensors."""
        model = super().from_pretrained(model_dir)
        assert isinstance(model, CocaModel)
        model.coca.load_state_dict(load_file(str(Path(model_dir) / COCA_WEIGHTS)))
        return model.eval()
