"""Augmentations of image-caption pairs for contrastive training (CLIP++'s switches, Fini et al. 2023).

"Improved baselines for vision-language pre-training" finds that most of what extra losses add to CLIP
comes from augmenting both sides: stronger image augmentation and text augmentation, with label
smoothing in the contrastive cross entropy (`encoders.objectives_text.ClipPlusPlusObjective`). The two
data-side switches live here, so the data set and collator stay short:

- `mask_tokens` (`data.text_mask: p`): random token masking of the tokenised captions. Each caption
  token (BOS and EOS kept) is dropped with probability p, at least one kept; the rest closes up, so the
  text tower's EOS pooling still finds the EOS. Dropping, not a [MASK] id, because the byte-level BPE
  trained on the captions has no mask token (FLIP/CLIPA's text masking also removes tokens).
- `augment_image` (`data.image_augment: photometric`): the image side. The paper uses SimCLR-like
  augmentation (random resized crop, flips, colour jitter, grayscale, blur); on GeoWorld crops, flips and
  colour changes make the caption false ("on the left", "red", the count), so only the transforms that
  keep every caption word true are applied: brightness and contrast jitter (±15 %, hue untouched), a
  Gaussian blur (p 0.5) and a JPEG re-encode (p 0.5). The named mode leaves room for others.

Both draw from Python's `random` (seeded and restored by the engine, like `data.caption: random`).
"""

from __future__ import annotations

import io
import random

import torch
from PIL import Image, ImageEnhance, ImageFilter

__all__ = ["IMAGE_AUGMENTS", "augment_image", "mask_tokens"]

#: Values of `data.image_augment` (None: no augmentation).
IMAGE_AUGMENTS = ("photometric",)


def augment_image(image: Image.Image, mode: str, rng: random.Random | None = None) -> Image.Image:
    """A randomly augmented copy of `image` under `mode` (IMAGE_AUGMENTS); truth-preserving on GeoWorld."""
    if mode not in IMAGE_AUGMENTS:
        raise ValueError(f"data.image_augment must be one of {IMAGE_AUGMENTS} or null, got {mode!r}")
    rng = rng or random
    img = image.convert("RGB")
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.85, 1.15))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 1.0)))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(60, 95))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, rate: float, rng: random.Random | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each caption token (not the first, BOS, nor the last real one, EOS) with probability `rate`,
    keeping at least one caption token per row; rows close up and are right-padded with the rows' pad id
    (the id at a padded position, else the input's last id). Returns new (input_ids, attention_mask)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"data.text_mask must be in [0, 1), got {rate!r}")
    if rate == 0.0:
        return input_ids, attention_mask
    rng = rng or random
    lengths = attention_mask.long().sum(1).tolist()
    padded = input_ids[attention_mask == 0]
    pad = int(padded[0]) if padded.numel() else int(input_ids[0, -1])
    rows = []
    for i, n in enumerate(lengths):
        ids = input_ids[i, :n].tolist()
        if n <= 3:  # BOS + at most one token + EOS: nothing to drop
            rows.append(ids)
            continue
        body = ids[1:-1]
        kept = [t for t in body if rng.random() >= rate]
        if not kept:
            kept = [body[rng.randrange(len(body))]]
        rows.append([ids[0], *kept, ids[-1]])
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        mask[i, : len(r)] = 1
    return out, mask
