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
    ConvNextConfig,
    ConvNextImageProcessorPil,
    ConvNextModel,
    ResNetConfig,
    ResNetModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from encoders import TINY_CONFIGS, TOWERS, Tower, TowerConfig, VisionFeatures, build_tower
from encoders.towers import IMAGE_PROCESSOR_BACKEND, ConvTower, expand2square, sincos_2d

TYPES = sorted(TOWERS)
WITH_CLS = [t for t in TYPES if TOWERS[t].has_cls]
CONV = [t for t in TYPES if TOWERS[t].hidden_states_are_maps]
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


def hf_tokens(tower: Tower, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """The HF model's own hidden state `layer` as the tower's tokens: prefix dropped, or a map flattened."""
    hidden = hf_hidden(tower, pixels, layer)
    if tower.hidden_states_are_maps:  # conv towers add their fixed 2-D position code (TowerConfig.positions)
        tokens = hidden.flatten(2).transpose(1, 2)
        return tokens + sincos_2d(tuple(hidden.shape[-2:]), tokens.shape[-1])
    return hidden[:, tower.num_prefix_tokens :]


# -- forward ------------------------------------------------------------------------------------------------


def test_forward_patch_shapes(tower: Tower, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = tower(pixels)
    assert isinstance(out, VisionFeatures)
    assert tower.grid == out.grid == (8, 8)
    assert tower.image_size == 64 and tower.hidden_size == 128
    assert out.tokens.shape == (2, 64, 128) and tower.num_tokens == 64
    assert (out.levels is not None) == tower.hidden_states_are_maps


def test_cls_present_or_absent(tower: Tower, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        out = tower(pixels)
    if tower.has_cls:
        assert out.cls is not None and out.cls.shape == (2, 128)
        assert torch.equal(out.cls, hf_hidden(tower, pixels, -2)[:, 0])
    elif tower.hidden_states_are_maps:  # no CLS token: the selected map's global average instead
        torch.testing.assert_close(out.cls, hf_hidden(tower, pixels, -1).mean(dim=(-2, -1)))
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


@pytest.mark.parametrize("type_", [t for t in TYPES if t not in WITH_CLS])
def test_towers_without_cls_reject_cls_patch(type_: str) -> None:
    with pytest.raises(ValueError, match="no CLS token"):
        tiny(type_, select_feature="cls_patch")


def test_select_layer_really_selects(tower: Tower, pixels: torch.Tensor) -> None:
    penultimate_tower, last = with_config(tower, select_layer=-2), with_config(tower, select_layer=-1)
    with torch.no_grad():
        penultimate, final = penultimate_tower(pixels).tokens, last(pixels).tokens
    if penultimate.shape == final.shape:  # conv stages may differ in size: then the shapes already differ
        assert not torch.allclose(penultimate, final)
    assert torch.equal(penultimate, hf_tokens(tower, pixels, -2))
    assert torch.equal(final, hf_tokens(tower, pixels, -1))


def test_default_select_layer_per_family(tower: Tower) -> None:
    """select_layer=None: ViTs read LLaVA's penultimate layer, conv towers their last stage."""
    assert TowerConfig().select_layer is None
    assert tower.config.select_layer == (-1 if tower.hidden_states_are_maps else -2)


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


@pytest.mark.parametrize(("type_", "states"), [("resnet", 3), ("convnext", 4)])
def test_conv_select_layer_range(type_: str, states: int) -> None:
    for layer in (states, -states - 1):
        with pytest.raises(ValueError, match=f"out of range for {states} hidden states .*stages"):
            tiny(type_, select_layer=layer)


def test_unknown_type_lists_registered() -> None:
    with pytest.raises(ValueError, match="unknown tower type .*known: .*clip.*dinov2.*siglip"):
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


# -- convolutional towers (ResNet, ConvNeXt) --------------------------------------------------------------


@pytest.mark.parametrize("type_", CONV)
def test_conv_every_stage_geometry_matches_the_model(type_: str, pixels: torch.Tensor) -> None:
    """Channels, stride, grid and tokens of every hidden state, as the HF model itself produces them."""
    base = tiny(type_).eval()
    with torch.no_grad():
        maps = base.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert base.num_hidden_states() == len(maps)
    for layer in range(-len(maps), len(maps)):
        tower = with_config(base, select_layer=layer)
        channels, h, w = maps[layer].shape[1:]
        assert (tower.hidden_size, tower.grid, tower.patch_size) == (channels, (h, w), 64 // h)
        assert tower.num_tokens == h * w and tower.output_size == 128
        with torch.no_grad():
            out = tower(pixels)
        assert out.tokens.shape == (2, h * w, channels) and out.grid == (h, w)
        assert len(out.levels) == len(maps) and torch.equal(out.levels[layer], maps[layer])


@pytest.mark.parametrize("type_", CONV)
def test_conv_tokens_are_the_map_row_major(type_: str, pixels: torch.Tensor) -> None:
    tower = tiny(type_).eval()
    with torch.no_grad():
        tokens, fmap = tower(pixels).tokens, hf_hidden(tower, pixels, -1)
    gh, gw = tower.grid
    code = sincos_2d(tower.grid, tower.hidden_size)
    for y, x in [(0, 0), (0, gw - 1), (1, 0), (gh - 1, 2)]:
        assert torch.equal(tokens[:, y * gw + x], fmap[:, :, y, x] + code[y * gw + x])


def test_tiny_conv_configs() -> None:
    """The tiny configs are what they say: basic-block ResNet; ConvNeXt without layer scale or drop path."""
    resnet, convnext = tiny("resnet"), tiny("convnext")
    assert isinstance(resnet, ConvTower) and isinstance(convnext, ConvTower)
    assert isinstance(resnet.model, ResNetModel) and isinstance(convnext.model, ConvNextModel)
    assert resnet.model.config.layer_type == "basic"
    assert [
        h.shape[1:] for h in resnet.model(torch.zeros(1, 3, 64, 64), output_hidden_states=True).hidden_states
    ] == [(32, 16, 16), (64, 16, 16), (128, 8, 8)]
    # layer_scale_init_value 0 leaves out HF's per-channel scale (1e-6 by default, every block ~identity).
    assert not [n for n, _ in convnext.named_parameters() if "layer_scale" in n]
    default = ConvNextModel(ConvNextConfig(**{**TINY_CONFIGS["convnext"], "layer_scale_init_value": 1e-6}))
    assert [n for n, _ in default.named_parameters() if "layer_scale" in n]
    assert not any(
        isinstance(m, torch.nn.Dropout) or "DropPath" in type(m).__name__ for m in convnext.modules()
    )
    assert sum(p.numel() for p in resnet.parameters()) == 292_640
    assert sum(p.numel() for p in convnext.parameters()) == 365_248


@pytest.mark.parametrize("type_", CONV)
def test_conv_processor_keeps_a_64px_image_unresized(type_: str) -> None:
    tower = tiny(type_)
    assert isinstance(tower.processor, ConvNextImageProcessorPil) and IMAGE_PROCESSOR_BACKEND == "pil"
    assert tower.processor.crop_pct == 1.0
    image = images(1, size=(64, 64))[0]
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    torch.testing.assert_close(tower.preprocess([image])[0], (raw - mean) / std)
    # A wide image: shortest edge to 64, the centre 64x64 kept (as CLIP's processor; pad_to_square keeps all).
    assert tower.preprocess(images(1, size=(96, 64))).shape == (1, 3, 64, 64)


def test_conv_default_processor_follows_image_size() -> None:
    tower = build_tower(TowerConfig(type="convnext", config={**TINY_CONFIGS["convnext"], "image_size": 96}))
    assert (tower.image_size, tower.grid, tower.num_tokens) == (96, (12, 12), 144)
    assert tower.preprocess(images(1)).shape == (1, 3, 96, 96)
    with pytest.raises(ValueError, match="not a multiple of the selected stage's stride 8"):
        build_tower(TowerConfig(type="resnet", config={**TINY_CONFIGS["resnet"], "image_size": 60}))


def test_resnet_checkpoint_without_image_size_or_processor_gets_224(tmp_path: Path) -> None:
    """A plain HF ResNet folder (no image_size, no preprocessor_config.json): ImageNet's 224 px."""
    config = {k: v for k, v in TINY_CONFIGS["resnet"].items() if k != "image_size"}
    ResNetModel(ResNetConfig(**config)).save_pretrained(tmp_path)
    tower = build_tower(TowerConfig(type="resnet", path=str(tmp_path)))
    assert (tower.image_size, tower.grid) == (224, (28, 28))


@pytest.mark.parametrize("type_", CONV)
def test_conv_real_format_checkpoint_with_its_processor(
    type_: str, pixels: torch.Tensor, tmp_path: Path
) -> None:
    """An HF folder as published (model + ConvNextImageProcessor at HF's crop_pct) loads and reads as HF does."""
    torch.manual_seed(0)
    model_cls, config_cls = (
        (ResNetModel, ResNetConfig) if type_ == "resnet" else (ConvNextModel, ConvNextConfig)
    )
    hf = model_cls(config_cls(**TINY_CONFIGS[type_])).eval()
    hf.save_pretrained(tmp_path)
    ConvNextImageProcessorPil(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(tmp_path)
    tower = build_tower(TowerConfig(type=type_, path=str(tmp_path))).eval()
    assert isinstance(tower.processor, ConvNextImageProcessorPil) and tower.processor.crop_pct == 0.875
    assert tower.grid == (8, 8) and tower.preprocess(images(1)).shape == (1, 3, 64, 64)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state.flatten(2).transpose(1, 2)
        assert torch.equal(tower(pixels).tokens, expected + sincos_2d((8, 8), expected.shape[-1]))


def test_frozen_resnet_keeps_its_batchnorm_statistics(pixels: torch.Tensor) -> None:
    tower = tiny("resnet")
    stats = {k: v.clone() for k, v in tower.state_dict().items() if "running" in k}
    tower.requires_grad_(False).train()
    assert tower.training and not tower.model.training
    with torch.no_grad():
        frozen = tower(pixels).tokens
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in stats.items())
    with torch.no_grad():
        assert torch.equal(frozen, tower.eval()(pixels).tokens)  # the same features as inference
    tower.requires_grad_(True).train()  # a trained tower: ordinary BatchNorm training
    assert tower.model.training
    tower(pixels)
    assert not all(torch.equal(v, tower.state_dict()[k]) for k, v in stats.items())


def test_conv_final_outputs_are_tokens_and_pooled(pixels: torch.Tensor) -> None:
    for type_ in CONV:
        tower = tiny(type_, select_layer=-2).eval()  # final_outputs ignores select_layer
        hidden, pooled = tower.final_outputs(pixels)
        assert hidden.shape == (2, 64, 128) and pooled.shape == (2, 128) and tower.num_prefix_tokens == 0
        assert tower.hidden_size == 64 and tower.output_size == 128
        if type_ == "resnet":  # ResNet pools by plain averaging; ConvNeXt adds a LayerNorm
            torch.testing.assert_close(pooled, hidden.mean(1))


# -- conv towers downstream: MultimodalLM, feature cache, LLaVA export ---------------------------------------


def conv_mllm(tokenizer, type_: str = "resnet"):
    from conftest import TINY_LM

    from mllm.model import MultimodalLM, build_lm

    torch.manual_seed(0)
    lm = build_lm(None, TINY_LM, len(tokenizer))
    return MultimodalLM.build(
        TowerConfig(type=type_, config=TINY_CONFIGS[type_]),
        "mlp2x_gelu",
        lm,
        tokenizer,
        template="chatml",
        max_length=160,
    )


def conv_batch(model, n: int = 2) -> dict[str, torch.Tensor]:
    from mllm.chat import encode_conversation

    rows = [
        encode_conversation(
            [("user", "<image>\nWhat color is the circle?"), ("assistant", "red")],
            model.tokenizer,
            "chatml",
            model.image_token_id,
            model.num_image_tokens,
            1,
        )
        for _ in range(n)
    ]
    ids = torch.stack([r["input_ids"] for r in rows])
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.stack([r["labels"] for r in rows]),
        "pixel_values": model.preprocess(images(n)),
    }


@pytest.mark.parametrize("type_", CONV)
def test_mllm_with_conv_tower_trains_saves_and_reloads(type_: str, tokenizer, tmp_path: Path) -> None:
    from mllm.model import MultimodalLM

    model = conv_mllm(tokenizer, type_)
    assert model.num_image_tokens == 64 and model.projector[0].in_features == 128
    assert model.meta.tower["select_layer"] is None and model.tower.config.select_layer == -1
    batch = conv_batch(model)
    out = model.train()(**batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    first_conv = next(p for n, p in model.tower.named_parameters() if p.dim() == 4)
    assert first_conv.grad is not None and model.projector[0].weight.grad is not None
    model.eval().save_pretrained(tmp_path / "m")
    back = MultimodalLM.from_pretrained(tmp_path / "m")
    assert not back.tower.model.training
    with torch.no_grad():
        assert torch.equal(back(**batch).loss, model(**batch).loss)
    assert back.tower.state_dict().keys() == model.tower.state_dict().keys()
    for k, v in model.tower.state_dict().items():  # BatchNorm running statistics included
        assert torch.equal(v, back.tower.state_dict()[k]), k


def test_feature_cache_with_a_frozen_conv_tower(tokenizer, tmp_path: Path) -> None:
    from mllm.feature_cache import build_cache, tower_fingerprint

    model = conv_mllm(tokenizer)
    paths = []
    for i, image in enumerate(images(3, size=(64, 64))):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    model.requires_grad_(False).train()  # a stage that freezes everything: the tower stays in eval mode
    cache = build_cache(model, paths, tmp_path / "cache", dtype="float16", log=lambda *_: None)
    assert tower_fingerprint(model)["select_layer"] == -1
    with torch.no_grad():
        live = model.tower_features(model.preprocess([Image.open(p) for p in paths]))
    torch.testing.assert_close(cache(paths).float(), live, rtol=1e-3, atol=1e-2)


def test_llava_export_refuses_conv_towers(tokenizer, tmp_path: Path) -> None:
    from mllm.hf_export import ExportError, export_hf

    with pytest.raises(ExportError, match="'resnet' is convolutional.*--format mllm"):
        export_hf(conv_mllm(tokenizer).eval(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_llava_import_refuses_conv_towers(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlavaConfig

    from mllm.hf_import import ImportError_
    from mllm.model import load_llava

    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlavaConfig(vision_config=ResNetConfig(**TINY_CONFIGS["resnet"]), text_config=text).save_pretrained(
        tmp_path
    )
    with pytest.raises(ImportError_, match="'resnet' is convolutional"):
        load_llava(tmp_path)


def test_align_stage_leaves_a_frozen_resnet_exactly_as_it_was(tmp_path: Path) -> None:
    """The engine's model.train() must not wake BatchNorm in a tower the stage does not train."""
    from helpers import tiny_recipe, write_tiny_world

    from mllm.config import recipe_from_dict
    from mllm.model import MultimodalLM
    from mllm.training.runner import build_model, train_recipe

    world = write_tiny_world(tmp_path / "world", n=16)
    raw = tiny_recipe(world, backend="torch", zero=None, steps=(2, 1))
    raw["model"]["tower"] = {"type": "resnet", "config": {**TINY_CONFIGS["resnet"], "image_size": 32}}
    raw["stages"] = raw["stages"][:1]  # align: projector only
    recipe = recipe_from_dict(raw)
    start = build_model(recipe.model, tmp_path / "run", [world["align"]], seed=0).state_dict()
    summary = train_recipe(recipe, tmp_path / "run", log=lambda *a: None)
    final = MultimodalLM.from_pretrained(summary["final"])
    assert final.num_image_tokens == 16  # 32 px / stride 8
    tower_state = {k: v for k, v in final.state_dict().items() if k.startswith("tower.")}
    assert any("running_mean" in k for k in tower_state)
    for k, v in tower_state.items():
        assert torch.equal(v, start[k]), k
    assert not torch.equal(final.state_dict()["projector.0.weight"], start["projector.0.weight"])


def test_sincos_2d_codes_row_and_column() -> None:
    code = sincos_2d((4, 3), 16)
    assert code.shape == (12, 16) and code.abs().max() <= 1.0
    grid = code.reshape(4, 3, 16)
    assert torch.equal(grid[0, 0, :8], grid[0, 2, :8]) and not torch.equal(grid[0, 0, 8:], grid[0, 2, 8:])
    assert torch.equal(grid[0, 1, 8:], grid[3, 1, 8:]) and not torch.equal(grid[0, 1, :8], grid[3, 1, :8])
    assert len({tuple(r.tolist()) for r in code}) == 12  # every cell distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


def test_conv_tower_positions_switch() -> None:
    pixels = torch.rand(2, 3, 64, 64)
    on = build_tower(TowerConfig(type="resnet", config=TINY_CONFIGS["resnet"])).eval()
    off = build_tower(TowerConfig(type="resnet", config=TINY_CONFIGS["resnet"], positions="none")).eval()
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        diff = on(pixels).tokens - off(pixels).tokens
    assert torch.allclose(diff[0], sincos_2d(on.grid, on.hidden_size), atol=1e-5)
    assert torch.allclose(diff[0], diff[1], atol=1e-5)
    bad = build_tower(TowerConfig(type="resnet", config=TINY_CONFIGS["resnet"], positions="learned"))
    with pytest.raises(ValueError, match="positions"):
        bad(pixels)
