"""Projector registry: LLaVA's layouts, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mllm.projectors import PROJECTORS, build_projector, known_projectors, register_projector


@pytest.mark.parametrize("name", ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu"])
def test_shapes(name: str) -> None:
    projector = build_projector(name, 24, 40)
    assert projector(torch.randn(2, 5, 24)).shape == (2, 5, 40)


def test_identity_passes_through_and_checks_dims() -> None:
    x = torch.randn(2, 3, 16)
    assert torch.equal(build_projector("identity", 16, 16)(x), x)
    with pytest.raises(ValueError, match="in_dim == out_dim"):
        build_projector("identity", 16, 32)


def test_mlp2x_gelu_is_llavas_layout() -> None:
    projector = build_projector("mlp2x_gelu", 24, 40)
    assert isinstance(projector, nn.Sequential)
    assert [type(m) for m in projector] == [nn.Linear, nn.GELU, nn.Linear]
    assert (projector[0].in_features, projector[0].out_features) == (24, 40)
    assert (projector[2].in_features, projector[2].out_features) == (40, 40)
    # LLaVA checkpoints name these mm_projector.0.* and mm_projector.2.*
    assert list(projector.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_mlp_depth() -> None:
    projector = build_projector("mlp3x_gelu", 8, 12)
    assert [type(m) for m in projector] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert sum(isinstance(m, nn.Linear) for m in projector) == 3
    assert [type(m) for m in build_projector("mlp1x_gelu", 8, 12)] == [nn.Linear]
    with pytest.raises(ValueError, match="N >= 1"):
        build_projector("mlp0x_gelu", 8, 12)


def test_linear_is_a_plain_linear() -> None:
    projector = build_projector("linear", 8, 12)
    assert type(projector) is nn.Linear


@pytest.mark.parametrize("name", ["mlp", "mlp2x_relu", "mlp2x_gelu_extra", "resampler"])
def test_unknown_name_lists_known(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"known: identity, linear, anchored_mlp\{N\}x_gelu, bn_mlp\{N\}x_gelu, mlp\{N\}x_gelu",
    ):
        build_projector(name, 8, 8)


def test_bn_mlp_standardises_channels_then_projects() -> None:
    import torch

    projector = build_projector("bn_mlp2x_gelu", 8, 12)
    x = torch.randn(4, 5, 8) * torch.linspace(0.1, 50, 8) + 7.0  # channels of very different scales
    out = projector.train()(x)
    assert out.shape == (4, 5, 12)
    normed = projector.norm(x.flatten(0, 1))
    assert torch.allclose(normed.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(normed.std(0, unbiased=False), torch.ones(8), atol=1e-3)


def test_bad_dims() -> None:
    with pytest.raises(ValueError, match="positive"):
        build_projector("linear", 0, 8)


def test_register_projector() -> None:
    @register_projector("test_tanh_linear")
    def _tanh_linear(in_dim: int, out_dim: int) -> nn.Module:
        return nn.Sequential(nn.Tanh(), nn.Linear(in_dim, out_dim))

    try:
        assert "test_tanh_linear" in known_projectors()
        assert build_projector("test_tanh_linear", 4, 6)(torch.zeros(1, 4)).shape == (1, 6)
        with pytest.raises(ValueError, match="already registered"):
            register_projector("test_tanh_linear")(_tanh_linear)
    finally:
        PROJECTORS.unregister("test_tanh_linear")


def test_anchored_projector_mixes_word_embeddings() -> None:
    """Before anchoring, the output is the (gated) MLP path alone; after, a patch whose heads say "red" and
    "circle" with certainty gets exactly those words' embeddings, read live from the LM's table; a
    background patch is a zero vector; anchoring happens once and survives a state-dict round trip."""
    from transformers import PreTrainedTokenizerFast

    from mllm.projectors import AnchoredProjector
    from mllm.tokenizer import train_tokenizer

    torch.manual_seed(0)
    words = {"colour": (None, "red", "blue"), "shape": (None, "circle")}
    proj = AnchoredProjector(6, 8, 2, words)
    assert proj.heads.out_features == 5 and proj.sizes == [3, 2]
    x = torch.randn(1, 4, 6)
    assert torch.count_nonzero(proj(x)) == 0  # zero offsets, silent body: nothing before the words
    with torch.no_grad():
        proj.body[-1].weight.normal_()
    first = proj.heads(x)[..., :3].softmax(
        -1
    )  # gated by P(an object covers the patch), zero where background
    gate = (1 - first[..., :1]) * (first.argmax(-1, keepdim=True) != 0)
    assert torch.allclose(proj(x), gate * proj.body(x)) and torch.count_nonzero(proj(x)) > 0
    with torch.no_grad():
        proj.body[-1].weight.zero_()
    tok: PreTrainedTokenizerFast = train_tokenizer(["a red circle and a blue circle"] * 20, vocab_size=300)
    emb = torch.nn.Embedding(len(tok), 8)
    assert proj.anchor(emb, tok) == 3 and bool(proj.anchored)
    with pytest.raises(ValueError, match="reads the LM's input embeddings"):
        proj(x)

    def ids(w: str) -> list[int]:
        return [
            tok(w, add_special_tokens=False)["input_ids"][0],
            tok(" " + w, add_special_tokens=False)["input_ids"][0],
        ]

    with torch.no_grad():  # heads certain: colour = red (row 1), shape = circle (row 4)
        proj.heads.weight.zero_()
        proj.heads.bias.copy_(torch.tensor([-50.0, 50.0, -50.0, -50.0, 50.0]))
    red, blue, circle = (emb.weight[ids(w)].sum(0) for w in ("red", "blue", "circle"))
    want = red - (red + blue) / 2 + circle  # a word minus its group's mean; a one-word group is kept whole
    assert torch.allclose(proj(x, emb), want.expand(1, 4, 8), atol=1e-5)
    with torch.no_grad():  # tied, not copied: the LM's rows move, the patch moves with them
        emb.weight[ids("red")] += 1.0
    assert torch.allclose(proj(x, emb), (want + 1.0).expand(1, 4, 8), atol=1e-5)
    with torch.no_grad():  # background certain: a silent token, whatever the offsets hold
        proj.heads.bias.copy_(torch.tensor([50.0, -50.0, -50.0, 50.0, -50.0]))
        proj.anchors[0].fill_(3.0)
    assert torch.count_nonzero(proj(x, emb)) == 0
    before = proj.word_ids.clone()
    assert proj.anchor(torch.nn.Embedding(len(tok), 8), tok) == 0 and torch.equal(proj.word_ids, before)
    again = AnchoredProjector(6, 8, 2, words)
    again.load_state_dict(proj.state_dict())
    assert bool(again.anchored) and torch.equal(again.word_ids, proj.word_ids)


def test_anchored_registry_entry_uses_geoworld_words() -> None:
    proj = build_projector("anchored_mlp2x_gelu", 16, 12)
    assert list(proj.words) == ["colour", "shape", "size", "orientation", "density"]
    assert "circle" in proj.words["shape"] and proj.words["colour"][0] is None
    assert proj(torch.randn(2, 3, 16)).shape == (2, 3, 12)
    # what a counting readout sums: the density head's P and, per group, P(word) for its named words
    x = torch.randn(2, 3, 16)
    logits = proj.heads(x)
    density, (colours, shapes) = proj.count_maps(x)
    assert torch.allclose(density, logits[..., -2:].softmax(-1)[..., 1])
    nc, ns = len(proj.words["colour"]), len(proj.words["shape"])
    assert proj.count_words == (nc - 1, ns - 1) == (colours.shape[-1], shapes.shape[-1])
    assert proj.count_names == (proj.words["colour"][1:], proj.words["shape"][1:])
    assert torch.allclose(colours, logits[..., :nc].softmax(-1)[..., 1:])
    assert torch.allclose(shapes, logits[..., nc : nc + ns].softmax(-1)[..., 1:])
    from mllm.projectors import AnchoredProjector

    no_density = AnchoredProjector(16, 12, 2, {"colour": (None, "red")})
    assert no_density.count_words == () == no_density.count_names and no_density.count_maps(x) is None


def test_the_lm_does_not_retrain_the_density_head() -> None:
    """The anchored tokens read the density ("object") head but pass it no gradient: it is what a counting
    readout sums, trained by the tower warm-up alone. The other heads still learn from the LM."""
    proj = build_projector("anchored_mlp2x_gelu", 16, 12)
    with torch.no_grad():
        proj.anchors.normal_()  # make every word's row non-zero, so a gradient could reach every head
    proj(torch.randn(2, 3, 16)).square().sum().backward()
    g = proj.heads.weight.grad
    assert g[-2:].abs().sum() == 0 and g[:-2].abs().sum() > 0
