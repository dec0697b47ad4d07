"""AGLA decoding: assemble a global view with a local, prompt-focused one to curb hallucination.

Training-free. Besides the original image, the model looks at an *augmented* view that keeps only
the patches most relevant to the prompt (the rest are set to the processor's mean colour, i.e. zero
after normalisation). Decoding then scores each next token by

    ℓ(original) + α · ℓ(augmented),     restricted to tokens with p(original) ≥ β · max p(original)

so the augmented view can re-rank plausible tokens but never promote one the original view finds
implausible (the β cut-off). Defaults α = 2, β = 0.5 are AGLA's POPE setting.

Relevance, documented choice: the model's *own* patch-text similarity — cosine between each
projected image token (the embedding the LM receives) and the LM input embeddings of the prompt's
text tokens, max over text tokens. It needs no second model; a contrastive tower's patch-text
similarity can replace it through `relevance_fn` once such towers exist (encoders issue).
Keep ratio: a fixed share of patches (`keep_ratio`), a config value (AGLA derives it from an
image-text matching score, which a tiny from-scratch model does not have).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mllm.model import MultimodalLM


@dataclass
class AglaConfig:
    alpha: float = 2.0
    beta: float = 0.5
    keep_ratio: float = 0.5


def patch_relevance(
    model: MultimodalLM, pixel_values: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> torch.Tensor:
    """[n_img, N]: for image i (one per prompt row), each patch's max cosine with the row's text tokens."""
    img = F.normalize(model.encode_images(pixel_values).float(), dim=-1)  # [B, N, d]
    special = torch.tensor(
        sorted(set(model.tokenizer.all_special_ids) | {model.image_token_id}), device=prompt_ids.device
    )
    is_text = prompt_mask.bool() & ~torch.isin(prompt_ids, special)
    txt = F.normalize(model.lm.get_input_embeddings()(prompt_ids.masked_fill(~is_text, 0)).float(), dim=-1)
    sim = torch.einsum("bnd,btd->bnt", img, txt)  # [B, N, T]
    sim = sim.masked_fill(~is_text[:, None, :], float("-inf"))
    rel = sim.max(-1).values
    return torch.nan_to_num(rel, neginf=0.0)


def augmented_view(
    model: MultimodalLM, pixel_values: torch.Tensor, relevance: torch.Tensor, keep_ratio: float
) -> torch.Tensor:
    """Pixel values with every patch outside the top `keep_ratio` share set to 0 (the mean colour)."""
    gh, gw = model.tower.grid
    b, _, h, w = pixel_values.shape
    k = max(1, math.ceil(keep_ratio * gh * gw))
    keep = torch.zeros(b, gh * gw, dtype=torch.bool, device=relevance.device)
    keep.scatter_(1, relevance.topk(k, dim=-1).indices, True)
    mask = keep.view(b, 1, gh, gw).float()
    mask = F.interpolate(mask, size=(h, w), mode="nearest")
    return pixel_values * mask.to(pixel_values.dtype)


@torch.no_grad()
def calibrated_generate(
    model: MultimodalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor,
    augmented: torch.Tensor,
    cfg: AglaConfig,
    max_new_tokens: int,
    stop_token_ids: list[int],
) -> torch.Tensor:
    """Greedy decoding over ℓ(original) + α·ℓ(augmented) with the β cut-off; both views share one
    batched forward per step (rows [original; augmented]) with their own KV cache entries.

    Prompts are left-padded. Returns new token ids [B, T]; rows that stopped are padded.
    With α = 0 and β = 0 this is exactly greedy decoding of the original view.
    """
    b = input_ids.shape[0]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    embeds = torch.cat(
        [
            model.embed(input_ids, pixel_values, attention_mask=attention_mask),
            model.embed(input_ids, augmented, attention_mask=attention_mask),
        ]
    )
    mask = torch.cat([attention_mask, attention_mask])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()
    dev = input_ids.device
    stops = torch.tensor(stop_token_ids or [-1], device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    new: list[torch.Tensor] = []
    log_beta = math.log(cfg.beta) if cfg.beta > 0 else float("-inf")
    table = model.lm.get_input_embeddings()
    for _ in range(max_new_tokens):
        lo = F.log_softmax(logits[:b], dim=-1)
        la = F.log_softmax(logits[b:], dim=-1)
        score = lo + cfg.alpha * la if cfg.alpha else lo.clone()
        score = score.masked_fill(lo < lo.max(-1, keepdim=True).values + log_beta, float("-inf"))
        nxt = score.argmax(-1).masked_fill(done, pad)
        new.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        step = table(torch.cat([nxt, nxt]))[:, None, :]
        mask = torch.cat([mask, torch.ones(2 * b, 1, dtype=mask.dtype, device=dev)], dim=1)
        pos = pos[:, -1:] + 1
        out = model.lm(
            inputs_embeds=step, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True
        )
        past, logits = out.past_key_values, out.logits[:, -1].float()
    return torch.stack(new, dim=1) if new else torch.zeros(b, 0, dtype=torch.long, device=dev)


RelevanceFn = Callable[[MultimodalLM, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def agla_generate(
    model: MultimodalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: AglaConfig,
    max_new_tokens: int,
    stop_token_ids: list[int],
    relevance_fn: RelevanceFn = patch_relevance,
) -> torch.Tensor:
    """Relevance -> augmented view -> calibrated greedy decoding (one image per prompt row)."""
    rel = relevance_fn(model, pixel_values, input_ids, attention_mask)
    aug = augmented_view(model, pixel_values, rel, cfg.keep_ratio)
    return calibrated_generate(
        model, input_ids, pixel_values, attention_mask, aug, cfg, max_new_tokens, stop_token_ids
    )
