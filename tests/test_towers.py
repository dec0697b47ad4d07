"""Vision towers on tiny configs of the real HF classes (offline, CPU, seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)

from encoders import TINY_CONFIGS, TOWERS, Tower, TowerConfig, VisionFeatures, build_tower
from encoders.towers import expand2square

TYPES = sorted(TOWERS)
WITH_CLS = [t for t in TYPES if TOWERS[t].has_cls]
TINY_TEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


def tiny(type_: str, **overrides) -> Tower:
    torch.manual_seed(0)
    return build_tower(TowerConfig(type=type_, config=TINY_CONFIGS[type_], **overrides))


def with_config(tower: Tower, **changes) -> Tower:
    """The same weights read with different TowerConfig settings."""
    return type(tower)(dataclasses.replace(tower.config, **changes), tower.model, tower.processor)


def clip_processor(size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def images(n: int = 2, size: tuple[int, int] = (96, 64), seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=TYPES)
def tower(request) -> Tower:
    return tiny(request.param).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def hf_hidden(tower: Tower, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]


# -- forward ------------------------------------------------------------------------------------------------


def test_forward_patch_shapes(tower: Tower, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = tower(pixels)
    assert isinstance(out, VisionFeatures)
    assert tower.grid == out.grid == (8, 8)
    assert tower.image_size == 64 and tower.hidden_size == 128
    assert out.tokens.shape == (2, 64, 128) and tower.num_tokens == 64
    assert out.levels is None


def test_cls_present_or_absent(tower: Tower, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = tower(pixels)
    if tower.has_cls:
        assert out.cls is not None and out.cls.shape == (2, 128)
        assert torch.equal(out.cls, hf_hidden(tower, pixels, -2)[:, 0])
    else:
        assert out.cls is None


@pytest.mark.parametrize("type_", WITH_CLS)
def test_cls_patch_keeps_cls_first(type_: str, pixels: torch.Tensor) -> None:
    patch = tiny(type_).eval()
    both = with_config(patch, select_feature="cls_patch")
    with torch.no_grad():
        p, b = patch(pixels), both(pixels)
    assert both.num_tokens == patch.num_tokens + 1 == 65
    assert b.tokens.shape == (2, 65, 128)
    assert torch.equal(b.tokens[:, 0], b.cls) and torch.equal(b.tokens[:, 1:], p.tokens)


def test_siglip_rejects_cls_patch() -> None:
    with pytest.raises(ValueError, match="no CLS token"):
        tiny("siglip", select_feature="cls_patch")


def test_select_layer_really_selects(tower: Tower, pixels: torch.Tensor) -> None:
    last = with_config(tower, select_layer=-1)
    with torch.no_grad():
        penultimate, final = tower(pixels).tokens, last(pixels).tokens
    prefix = tower.num_prefix_tokens
    assert not torch.allclose(penultimate, final)
    assert torch.equal(penultimate, hf_hidden(tower, pixels, -2)[:, prefix:])
    assert torch.equal(final, hf_hidden(tower, pixels, -1)[:, prefix:])


def test_register_tokens_are_dropped(pixels: torch.Tensor) -> None:
    tower = tiny("dinov2_registers").eval()
    assert tower.num_prefix_tokens == 1 + TINY_CONFIGS["dinov2_registers"]["num_register_tokens"]
    with torch.no_grad():
        out = tower(pixels)
    assert out.tokens.shape == (2, 64, 128)
    assert torch.equal(out.tokens, hf_hidden(tower, pixels, -2)[:, 5:])


def test_batch_matches_single_samples(tower: Tower, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        batched = tower(pixels).tokens
        single = torch.cat([tower(pixels[i : i + 1]).tokens for i in range(2)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"select_layer": 4}, "out of range"),
        ({"select_layer": -5}, "out of range"),
        ({"select_feature": "x"}, "must be in"),
    ],
)
def test_bad_selection_is_rejected(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny("clip", **changes)


def test_unknown_type_lists_registered() -> None:
    with pytest.raises(ValueError, match="registered: .*clip.*dinov2.*siglip"):
        build_tower(TowerConfig(type="eva"))


# -- preprocessing --------------------------------------------------------------------------------


def test_preprocess_shape_dtype_and_rgb(tower: Tower) -> None:
    batch = images(2) + [images(1, size=(50, 70))[0].convert("L"), images(1)[0].convert("RGBA")]
    pixels = tower.preprocess(batch)
    assert pixels.shape == (4, 3, 64, 64) and pixels.dtype == torch.float32
    with torch.no_grad():
        assert tower(pixels).tokens.shape == (4, tower.num_tokens, 128)


def test_pad_to_square_changes_only_non_square(tower: Tower) -> None:
    padded = with_config(tower, pad_to_square=True)
    wide, square = images(1, size=(128, 48))[0], images(1, size=(80, 80))[0]
    assert not torch.allclose(tower.preprocess([wide]), padded.preprocess([wide]))
    assert torch.equal(tower.preprocess([square]), padded.preprocess([square]))
    # The padding is the processor's mean colour, which normalises to ~0 (up to 8-bit rounding).
    top_rows = padded.preprocess([wide])[0, :, :8]
    assert top_rows.abs().max() < 0.02


def test_expand2square_centres_image() -> None:
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    square = expand2square(image, (1, 2, 3))
    assert square.size == (6, 6)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((0, 2)) == (255, 0, 0)
    assert square.getpixel((0, 4)) == (1, 2, 3)


# -- loading and saving ---------------------------------------------------------------------------


def test_save_pretrained_round_trip(tower: Tower, pixels: torch.Tensor, tmp_path: Path) -> None:
    tower.save_pretrained(tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= written
    reloaded = build_tower(TowerConfig(type=tower.config.type, path=str(tmp_path))).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).tokens, tower(pixels).tokens)
    image = images(1)
    assert torch.equal(reloaded.preprocess(image), tower.preprocess(image))


def test_load_weights_false_same_architecture(tower: Tower, tmp_path: Path) -> None:
    tower.save_pretrained(tmp_path)
    torch.manual_seed(123)
    fresh = build_tower(TowerConfig(type=tower.config.type, path=str(tmp_path)), load_weights=False)
    ours, theirs = tower.state_dict(), fresh.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert not all(torch.equal(ours[k], theirs[k]) for k in ours)  # randomly initialised, not loaded
    assert (fresh.grid, fresh.num_tokens) == (tower.grid, tower.num_tokens)


def test_hf_config_dict_rebuilds_architecture(tower: Tower) -> None:
    rebuilt = build_tower(TowerConfig(type=tower.config.type, config=tower.hf_config_dict()))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in tower.state_dict().items()
    }
    assert rebuilt.processor.to_dict() == tower.processor.to_dict()
    assert "image_processor" not in tower.hf_config_dict(with_processor=False)


def test_real_format_clip_vision_checkpoint(pixels: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(**TINY_CONFIGS["clip"])).eval()
    hf.save_pretrained(tmp_path)
    clip_processor(64).save_pretrained(tmp_path)
    tower = build_tower(TowerConfig(type="clip", path=str(tmp_path))).eval()
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(tower(pixels).tokens, expected)
    assert tower.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("type_", "model_cls", "config_cls", "processor"),
    [
        ("clip", CLIPModel, CLIPConfig, clip_processor(64)),
        ("siglip", SiglipModel, SiglipConfig, SiglipImageProcessorPil(size={"height": 64, "width": 64})),
    ],
)
def test_full_two_tower_checkpoint(type_, model_cls, config_cls, processor, pixels, tmp_path: Path) -> None:
    """LLaVA points at openai/clip-vit-large-patch14-336, a full CLIPModel: the vision half must load."""
    torch.manual_seed(0)
    full = model_cls(config_cls(vision_config=TINY_CONFIGS[type_], text_config=TINY_TEXT)).eval()
    full.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    tower = build_tower(TowerConfig(type=type_, path=str(tmp_path))).eval()
    prefix = tower.num_prefix_tokens
    with torch.no_grad():
        hidden = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert torch.equal(tower(pixels).tokens, hidden[-2][:, prefix:])
    fresh = build_tower(TowerConfig(type=type_, path=str(tmp_path)), load_weights=False)
    assert fresh.state_dict().keys() == tower.state_dict().keys()


def test_checkpoint_without_processor_gets_family_default(tmp_path: Path) -> None:
    CLIPVisionModel(CLIPVisionConfig(**TINY_CONFIGS["clip"])).save_pretrained(tmp_path)
    tower = build_tower(TowerConfig(type="clip", path=str(tmp_path)))
    assert tower.preprocess(images(1)).shape == (1, 3, 64, 64)


def test_dinov2_grid_follows_processor_crop(tmp_path: Path) -> None:
    """facebook/dinov2-* say 518 px in config.json but their processor crops 224: the crop sets the grid."""
    tiny("dinov2").save_pretrained(tmp_path)
    processor = BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 48, "width": 48})
    processor.save_pretrained(tmp_path)
    tower = build_tower(TowerConfig(type="dinov2", path=str(tmp_path))).eval()
    assert (tower.image_size, tower.grid, tower.num_tokens) == (48, (6, 6), 36)
    pixels = tower.preprocess(images(2))
    assert pixels.shape == (2, 3, 48, 48)
    with torch.no_grad():
        out = tower(pixels)
    assert out.grid == (6, 6) and out.tokens.shape == (2, 36, 128)


def test_clip_processor_size_mismatch_is_an_error(tmp_path: Path) -> None:
    tiny("clip").save_pretrained(tmp_path)
    clip_processor(48).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="emits 48x48 px but the model was built for 64 px"):
        build_tower(TowerConfig(type="clip", path=str(tmp_path)))
