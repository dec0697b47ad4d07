"""SVE-Math's feature router (encoders.router): shapes, weights in (0, 1) conditioned on the input, the
constant-weights ablation, and that the weights act on the routed tokens."""

from __future__ import annotations

import pytest
import torch

from encoders.geo import GeoConfig, GeoEncoder
from encoders.router import FeatureRouter
from encoders.towers import VisionFeatures


def _inputs(seed: int, b: int = 3, grid=(8, 8), d: int = 32, c: int = 16):
    g = torch.Generator().manual_seed(seed)
    clip = VisionFeatures(tokens=torch.randn(b, grid[0] * grid[1], d, generator=g), grid=grid)
    levels = [
        torch.randn(b, c, s, s, generator=g) for s in (1, 2, 4, 16)
    ]  # coarse ... fine (finer than CLIP)
    return clip, levels


def test_output_keeps_the_clip_token_count_and_concatenates_channels():
    router = FeatureRouter(clip_dim=32, level_dim=16, num_levels=4)
    clip, levels = _inputs(0)
    out = router(clip, levels)
    assert out.tokens.shape == (3, 64, 5 * 32) and router.out_dim == 160
    assert torch.equal(out.tokens[..., :32], clip.tokens)  # CLIP tokens pass through first, unchanged
    assert out.weights.shape == (3, 4)


def test_soft_weights_are_in_open_unit_interval_and_depend_on_the_input():
    torch.manual_seed(0)
    router = FeatureRouter(clip_dim=32, level_dim=16, num_levels=4)
    clip, levels = _inputs(0)
    w = router(clip, levels).weights
    assert bool(((w > 0) & (w < 1)).all())
    assert not torch.allclose(w[0], w[1])  # per image
    assert not torch.allclose(w[:, 0], w[:, 1])  # per level
    clip2, _ = _inputs(1)
    assert not torch.allclose(router(clip2, levels).weights, w)  # conditioned on the pooled CLIP feature
    _, levels2 = _inputs(2)
    assert not torch.allclose(router(clip, levels2).weights, w)  # and on each level's context


def test_weights_scale_the_routed_levels():
    torch.manual_seed(0)
    router = FeatureRouter(clip_dim=32, level_dim=16, num_levels=4)
    clip, levels = _inputs(0)
    out = router(clip, levels)
    with torch.no_grad():  # routed_l / w_l is the same unweighted MLP output for every w_l
        router.gate[-1].bias.add_(3.0)
    out2 = router(clip, levels)
    r1 = out.tokens[..., 32:].reshape(3, 64, 4, 32) / out.weights[:, None, :, None]
    r2 = out2.tokens[..., 32:].reshape(3, 64, 4, 32) / out2.weights[:, None, :, None]
    assert torch.allclose(r1, r2, atol=1e-5) and bool((out2.weights > out.weights).all())


def test_constant_mode_uses_fixed_equal_weights_and_has_no_gate():
    router = FeatureRouter(clip_dim=32, level_dim=16, num_levels=4, mode="constant")
    assert not hasattr(router, "gate")
    for seed in (0, 1):
        w = router(*_inputs(seed)).weights
        assert torch.equal(w, torch.full((3, 4), 0.5))


def test_bad_inputs_are_clear_errors():
    router = FeatureRouter(clip_dim=32, level_dim=16, num_levels=4)
    clip, levels = _inputs(0)
    with pytest.raises(ValueError, match="4 levels"):
        router(clip, levels[:3])
    with pytest.raises(ValueError, match="channels"):
        router(clip, [torch.randn(3, 8, 2, 2)] * 4)
    with pytest.raises(ValueError, match="mode"):
        FeatureRouter(32, 16, 4, mode="softmax")
    with pytest.raises(ValueError, match="merge"):
        FeatureRouter(32, 16, 4, merge="sum")


@pytest.mark.parametrize("mode", ["soft", "constant"])
def test_the_residual_router_starts_silent_on_the_towers_width_and_then_learns(mode):
    """Residual merge (a graft onto a trained model): CLIP's width, CLIP's tokens exactly at the start,
    and one optimiser step makes the routed levels reach the output (and, soft, moves the gate too)."""
    torch.manual_seed(0)
    router = FeatureRouter(clip_dim=32, level_dim=16, num_levels=4, mode=mode, merge="residual")
    clip, levels = _inputs(0)
    out = router(clip, levels)
    assert router.out_dim == 32 and out.tokens.shape == (3, 64, 32)
    assert torch.equal(out.tokens, clip.tokens)
    opt = torch.optim.SGD(router.parameters(), lr=0.1)
    target = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(5))
    for _ in range(2):  # the first step opens the branch, the second reaches the gate through it
        opt.zero_grad()
        ((router(clip, levels).tokens - target) ** 2).mean().backward()
        opt.step()
    moved = router(clip, levels).tokens - clip.tokens
    assert moved.abs().mean() > 1e-4
    if mode == "soft":
        assert router.gate[-1].weight.grad.abs().sum() > 0
    # the routed part still depends on the levels (not a learned constant)
    _, other = _inputs(3)
    assert not torch.allclose(router(clip, other).tokens, router(clip, levels).tokens)


def test_router_reads_the_geometric_encoder_pyramid():
    geo = GeoEncoder(GeoConfig(image_size=64, channels=[8, 16, 16, 24], fpn_dim=16, attn_heads=2))
    levels = geo.router_levels(torch.randn(2, 3, 64, 64))
    assert [tuple(x.shape[-2:]) for x in levels] == [
        (2, 2),
        (4, 4),
        (8, 8),
        (16, 16),
    ]  # coarse -> enhanced fine
    clip = VisionFeatures(tokens=torch.randn(2, 64, 32), grid=(8, 8))
    out = FeatureRouter(32, geo.level_dim, geo.num_levels)(clip, levels)
    assert out.tokens.shape == (2, 64, 160)
