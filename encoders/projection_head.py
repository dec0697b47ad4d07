"""The projection-head study ("Investigating the Benefits of Projection Head for Representation Learning",
Xue et al. 2024): a contrastive pair is trained through `image_proj`, then the head is usually discarded and
the pre-projection features are what gets used downstream. The paper argues those are better (less
specialised to the loss). Here, both sides of a trained `ContrastiveModel`'s head, read the same way:

    space "pre":  what the head's input is and what the rest of this stack reads
                  pooled  [B, D]: the tower's pooled output that `image_proj` takes (model.encoder.image_pool)
                  tokens  [B, N, D]: the tower's tokens at its `select_layer` (`Tower.forward`): exactly what a
                          MultimodalLM given the saved `image_tower/` and `mllm probe dense` read
    space "post": the projected, L2-normalised embedding the contrastive loss saw
                  pooled  [B, E]: `encode_image`
                  tokens  [B, N, E]: `encode_image(tokens=True)`'s patch embeddings (FILIP's)

`mllm.evaluation.projection_probe` fits the same per-patch linear probe on both (scripts/probe_projection.py
prints the two rows).
"""

from __future__ import annotations

import torch

from encoders.contrastive import ContrastiveModel

__all__ = ["SPACES", "image_features"]

SPACES = ("pre", "post")


def image_features(
    model: ContrastiveModel, pixel_values: torch.Tensor, space: str = "pre", tokens: bool = False
) -> torch.Tensor:
    """The image features of `space` ("pre": before the projection head, "post": the projected, normalised
    embedding), pooled [B, *] or, with `tokens`, per patch [B, N, *] (see the module docstring)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    tower = model.image_tower
    if space == "post":
        out = model.encode_image(pixel_values, tokens=tokens)
        return out[1] if tokens else out
    if tokens:
        return tower(pixel_values).tokens
    hidden, pooled = tower.final_outputs(pixel_values)
    if model.cfg.image_pool == "mean" or pooled is None:
        pooled = hidden[:, tower.num_prefix_tokens :].mean(1)
    return pooled
