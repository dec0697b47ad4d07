"""Vision towers: thin adapters over Hugging Face vision models that all speak `VisionFeatures`.

Everything downstream (projectors, Mixture of Features, the feature router, the contrastive trainer) sees
only `Tower.forward(pixel_values) -> VisionFeatures` and `Tower.preprocess(images) -> pixel_values`, so a
new backbone is one registry entry here, not a change there. The adapters wrap the *real* HF classes
(never re-implementations) so that public checkpoints load unchanged and a tower trained here is an
ordinary HF checkpoint again after `save_pretrained`.

Two families: ViTs (`Tower`: hidden states are `[B, N, D]` token sequences, one per layer) and conv nets
(`ConvTower`: hidden states are `[B, C, H, W]` maps, one per stage, flattened row-major into tokens).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoImageProcessor,
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextImageProcessorPil,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from encoders.registry import Registry

__all__ = [
    "IMAGE_PROCESSOR_BACKEND",
    "TINY_CONFIGS",
    "TOWERS",
    "ClipTower",
    "ConvNextTower",
    "ConvTower",
    "Dinov2RegistersTower",
    "Dinov2Tower",
    "ResNetTower",
    "SiglipTower",
    "Tower",
    "TowerConfig",
    "VisionFeatures",
    "build_tower",
    "expand2square",
    "register_tower",
    "sincos_2d",
]

# The PIL backend of the HF image processors, always. The torchvision backend resamples with different
# kernels, so the same checkpoint would see slightly different pixels on a machine that happens to have
# torchvision; LLaVA's published numbers were produced by the PIL ("slow") path. ~0.3 ms per 64 px image.
IMAGE_PROCESSOR_BACKEND = "pil"

# Key of `TowerConfig.config` (and of `Tower.hf_config_dict()`) that carries the image processor's settings.
# It travels with the architecture because the processor fixes the token count: DINOv2's config says 518 px
# while its processor crops 224 px, so rebuilding from the model config alone would change the grid.
PROCESSOR_KEY = "image_processor"

SELECT_FEATURES = ("patch", "cls_patch")


@dataclass
class VisionFeatures:
    """What every tower returns; the one currency of the vision side."""

    tokens: torch.Tensor  # [B, N, D] selected tokens (patch tokens; CLS first only for "cls_patch")
    grid: tuple[int, int]  # (h, w) of the patch grid the tokens come from
    # [B, D] CLS token of the selected layer, where the model has one; conv towers: the selected map's
    # global average (a pooled summary of the same width as the tokens)
    cls: torch.Tensor | None = None
    # Multi-scale maps [B, C, h, w] (conv towers: every hidden state, indexed like select_layer); None for ViTs
    levels: list[torch.Tensor] | None = None


@dataclass
class TowerConfig:
    """How to build and read a tower. Plain data so that it round-trips through YAML recipes."""

    type: str = "clip"  # registry key, see TOWERS
    path: str | None = None  # local HF dir (vision-only or full CLIPModel/SiglipModel); None -> `config`
    config: dict = field(default_factory=dict)  # HF vision-config kwargs over the HF class defaults
    # Index into hidden_states; None: the family's default (ViTs -2, the penultimate layer LLaVA reads;
    # conv towers -1, the last stage, whose stride is the one their tiny configs are sized for)
    select_layer: int | None = None
    select_feature: str = "patch"  # "patch" (drop CLS/register tokens) | "cls_patch" (keep CLS first)
    pad_to_square: bool = False  # LLaVA's expand2square with the processor's mean colour before resizing
    trust_remote_code: bool = False
    # Fixed 2-D sin-cos position code added to the tokens: "sincos2d" | "none"; None: the family's default
    # (conv towers "sincos2d": a convolution is translation-equivariant, so without it a token does not say
    # where in the image it is, and "is the circle on the left?" becomes unlearnable for the LM after it;
    # ViTs "none": they carry their own position embeddings).
    positions: str | None = None


# Tiny configs of the real classes: 64 px, 8 px patches -> an 8x8 grid of 64 tokens, 128-wide, 3 layers.
# Small enough that tests and the CPU demo run in seconds, big enough to have a real penultimate layer.
_TINY_VIT: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
}
# The conv towers end in the same 8x8 grid of 128-wide tokens at 64 px (select_layer -1, their default).
# ResNet: 7x7/2 conv + 3x3/2 max-pool stem -> 16x16x32; stage 1 (stride 1) 16x16x64; stage 2 8x8x128.
# `image_size` is not a ResNetConfig field: it rides in config.json as an extra attribute and sizes the
# default processor (ConvNextConfig has the field, default 224, which its model ignores).
# ConvNeXt: 2x2/2 patchify -> 32x32x32; stages 32x32x32, 16x16x64, 8x8x128. layer_scale_init_value 0
# removes HF's layer scale (1e-6 by default, which starts every block as an identity and makes a
# from-scratch tower crawl); num_stages must equal len(hidden_sizes), HF's default is 4.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "clip": dict(_TINY_VIT),
    "siglip": dict(_TINY_VIT),
    "dinov2": dict(_TINY_VIT),
    "dinov2_registers": {**_TINY_VIT, "num_register_tokens": 4},
    "resnet": {
        "image_size": 64,
        "embedding_size": 32,
        "hidden_sizes": [64, 128],
        "depths": [1, 1],
        "layer_type": "basic",
        "hidden_act": "relu",
    },
    "convnext": {
        "image_size": 64,
        "patch_size": 2,
        "num_stages": 3,
        "hidden_sizes": [32, 64, 128],
        "depths": [1, 1, 2],
        "layer_scale_init_value": 0.0,
        "drop_path_rate": 0.0,
    },
}

TOWERS: Registry[type[Tower]] = Registry("tower type")


def register_tower(name: str) -> Callable[[type[Tower]], type[Tower]]:
    """Class decorator: add a tower class to `TOWERS` under `name` (the value of `TowerConfig.type`)."""
    return TOWERS.register(name)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's pad-to-square: centre the image on a square of `background` so resizing keeps all of it.

    Without it, a centre-crop processor (CLIP) silently cuts off the sides of wide images.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _size_field(size: Any, key: str) -> int | None:
    """Read one field of a processor size, which is a `SizeDict` in transformers 5 and a dict before."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _processor_output_size(processor: BaseImageProcessor) -> tuple[int, int]:
    """(H, W) of the pixels a processor emits; the grid must be derived from this, not the model config."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop:
        height, width = _size_field(crop, "height"), _size_field(crop, "width")
    elif (
        isinstance(processor, ConvNextImageProcessorPil)
        and getattr(processor, "do_resize", True)
        and _size_field(processor.size, "shortest_edge")
    ):
        # ConvNeXt's own rule: below 384 px resize to shortest_edge / crop_pct and centre-crop shortest_edge,
        # from 384 px squash to shortest_edge; either way a shortest_edge square.
        height = width = _size_field(processor.size, "shortest_edge")
    else:
        size = processor.size
        height, width = _size_field(size, "height"), _size_field(size, "width")
    if not height or not width:
        raise ValueError(
            f"{type(processor).__name__} does not produce a fixed image size (size={processor.size!r}); "
            "a tower needs fixed-size inputs to have a fixed number of tokens"
        )
    return int(height), int(width)


class Tower(nn.Module):
    """A vision backbone that turns pixels into `VisionFeatures`, plus the preprocessing it was trained with.

    Subclasses only declare which HF classes they wrap and how many prefix tokens precede the patches;
    the reading of hidden states, token selection, preprocessing and saving are shared. `ConvTower`
    overrides the geometry hooks and `forward` for models whose hidden states are maps.
    """

    model_cls: ClassVar[type[PreTrainedModel]]
    config_cls: ClassVar[type[PretrainedConfig]]
    processor_cls: ClassVar[type[BaseImageProcessor]]
    has_cls: ClassVar[bool] = True
    # CLIP and SigLIP have learned absolute position embeddings for exactly config.image_size, so their
    # processor must emit that size; DINOv2 interpolates and runs at whatever its processor crops to.
    fixed_resolution: ClassVar[bool] = True
    # What `TowerConfig.select_layer = None` means for this family.
    default_select_layer: ClassVar[int] = -2
    # True where hidden states are [B, C, H, W] maps (conv nets) rather than [B, N, D] token sequences.
    # Code that reads `self.model`'s outputs itself (the LLaVA export) must know which it gets.
    hidden_states_are_maps: ClassVar[bool] = False

    def __init__(self, config: TowerConfig, model: PreTrainedModel, processor: BaseImageProcessor) -> None:
        super().__init__()
        if config.select_layer is None:
            # A copy, so that this tower's config (saved, fingerprinted, exported) names the layer it reads.
            config = dataclasses.replace(config, select_layer=self.default_select_layer)
        self.config = config
        self.model = model
        self.processor = processor
        hf = model.config

        if config.select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be in {SELECT_FEATURES}, got {config.select_feature!r}")
        if config.select_feature == "cls_patch" and not self.has_cls:
            raise ValueError(
                f"{type(self).__name__} has no CLS token, so select_feature='cls_patch' is impossible; "
                "use 'patch'"
            )
        num_states = self.num_hidden_states()
        if not -num_states <= config.select_layer < num_states:
            raise ValueError(
                f"select_layer={config.select_layer} is out of range for {num_states} hidden states "
                f"(the embeddings + {num_states - 1} {'stages' if self.hidden_states_are_maps else 'layers'})"
            )
        hidden_size, patch_size = self.state_geometry(config.select_layer)
        self.hidden_size: int = hidden_size  # width of the tokens `forward` returns
        self.patch_size: int = patch_size  # pixels per token side: the patch size, or a conv stage's stride
        self.output_size: int = self.state_geometry(-1)[0]  # width of `final_outputs` (contrastive heads)
        self.num_prefix_tokens: int = int(self.has_cls) + int(getattr(hf, "num_register_tokens", 0) or 0)

        height, width = _processor_output_size(processor)
        if self.fixed_resolution and (height, width) != (hf.image_size, hf.image_size):
            raise ValueError(
                f"{type(self).__name__}: the image processor emits {height}x{width} px but the model was "
                f"built for {hf.image_size} px; fix preprocessor_config.json or the config's image_size"
            )
        if height % self.patch_size or width % self.patch_size:
            what = "the selected stage's stride" if self.hidden_states_are_maps else "patch size"
            raise ValueError(f"image size {height}x{width} is not a multiple of {what} {self.patch_size}")
        self.image_size: int = height
        self.grid: tuple[int, int] = (height // self.patch_size, width // self.patch_size)
        self.num_tokens: int = self.grid[0] * self.grid[1] + int(config.select_feature == "cls_patch")

    # -- geometry hooks (ConvTower overrides them) -----------------------------------------------------------

    def num_hidden_states(self) -> int:
        """How many entries `hidden_states` has: the embeddings + one per layer."""
        return int(self.model.config.num_hidden_layers) + 1

    def state_geometry(self, index: int) -> tuple[int, int]:
        """(width, pixels per token side) of `hidden_states[index]`; a ViT's are the same at every layer."""
        hf = self.model.config
        return int(hf.hidden_size), int(hf.patch_size)

    # -- construction hooks -------------------------------------------------------------------------------

    @classmethod
    def default_processor(cls, image_size: int) -> BaseImageProcessor:
        """The processor this family's checkpoints ship with, scaled to `image_size` (used without a path)."""
        crop = {"height": image_size, "width": image_size}
        return cls.processor_cls(size={"shortest_edge": image_size}, crop_size=crop)

    @classmethod
    def default_image_size(cls, hf_config: PretrainedConfig) -> int:
        """The size `default_processor` is built for when neither a checkpoint nor saved settings name one."""
        return int(hf_config.image_size)

    @classmethod
    def vision_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Accept a full two-tower config dict (CLIPConfig-style) by taking its `vision_config`."""
        return dict(config.get("vision_config", config))

    # -- the protocol ---------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        """Encode a batch and return the tokens of `select_layer` (pre-final-norm hidden states, as LLaVA)."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        hidden = outputs.hidden_states[self.config.select_layer]
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        patches = hidden[:, self.num_prefix_tokens :]
        if patches.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(
                f"{type(self).__name__}: {patches.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid; "
                "the prefix-token count does not match this model"
            )
        if self.config.positions == "sincos2d":  # explicit only: a ViT has position embeddings of its own
            patches = patches + sincos_2d(grid, patches.shape[-1], patches.device, patches.dtype)
        elif self.config.positions not in (None, "none"):
            raise ValueError(f"tower positions must be 'sincos2d' or 'none', got {self.config.positions!r}")
        cls = hidden[:, 0] if self.has_cls else None
        keep_cls = self.config.select_feature == "cls_patch"
        tokens = torch.cat([hidden[:, :1], patches], dim=1) if keep_cls else patches
        return VisionFeatures(tokens=tokens, grid=grid, cls=cls)

    def final_outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's own final outputs, whatever `select_layer` says: (last hidden state as tokens
        `[B, num_prefix_tokens + N, output_size]`, its pooled output `[B, output_size]` or None).

        What contrastive heads pool. It lives here, not in the callers, because only the tower knows
        whether its outputs are token sequences or maps.
        """
        out = self.model(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype))
        return out.last_hidden_state, getattr(out, "pooler_output", None)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> the `[B, 3, H, W]` float pixels this checkpoint expects, via its own processor."""
        rgb = [image.convert("RGB") for image in images]
        if self.config.pad_to_square:
            # int() truncates, exactly as LLaVA does, so padded pixels match its training data bit for bit.
            background = tuple(int(m * 255) for m in self.processor.image_mean)
            rgb = [expand2square(image, background) for image in rgb]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"].float()

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write the standard HF layout (config.json, model.safetensors, preprocessor_config.json).

        The result is reloadable alone with `TowerConfig(type=..., path=directory)` and by plain
        transformers, so a tower trained here can be published or used by other code unchanged.
        """
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def hf_config_dict(self, with_processor: bool = True) -> dict[str, Any]:
        """The HF vision config as a dict, to rebuild this architecture later via `TowerConfig(config=...)`.

        With `with_processor`, the processor settings ride along under `"image_processor"` because they,
        not the model config, decide the grid (see PROCESSOR_KEY); `build_tower` pops that key again.
        """
        config = self.model.config.to_dict()
        config.pop("_name_or_path", None)
        if with_processor:
            config[PROCESSOR_KEY] = self.processor.to_dict()
        return config


@register_tower("clip")
class ClipTower(Tower):
    """OpenAI CLIP ViT (LLaVA's default tower); also loads from a full `CLIPModel` checkpoint directory."""

    model_cls = CLIPVisionModel
    config_cls = CLIPVisionConfig
    processor_cls = CLIPImageProcessorPil


@register_tower("siglip")
class SiglipTower(Tower):
    """SigLIP ViT: no CLS token (it pools with an attention head), so every token is a patch."""

    model_cls = SiglipVisionModel
    config_cls = SiglipVisionConfig
    processor_cls = SiglipImageProcessorPil
    has_cls = False

    @classmethod
    def default_processor(cls, image_size: int) -> BaseImageProcessor:
        # SigLIP squashes to a square instead of resize + centre crop.
        return cls.processor_cls(size={"height": image_size, "width": image_size})


@register_tower("dinov2")
class Dinov2Tower(Tower):
    """DINOv2 ViT: CLS + patch tokens; hidden_states are taken before its final LayerNorm."""

    model_cls = Dinov2Model
    config_cls = Dinov2Config
    processor_cls = BitImageProcessorPil
    fixed_resolution = False

    @classmethod
    def default_processor(cls, image_size: int) -> BaseImageProcessor:
        # facebook/dinov2-* ship a BitImageProcessor with ImageNet statistics (not Bit's CLIP defaults).
        return cls.processor_cls(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
        )


@register_tower("dinov2_registers")
class Dinov2RegistersTower(Dinov2Tower):
    """DINOv2 with register tokens: [CLS, registers..., patches]; the registers are never returned."""

    model_cls = Dinov2WithRegistersModel
    config_cls = Dinov2WithRegistersConfig


class ConvTower(Tower):
    """A convolutional backbone (HF `hidden_states` = the stem's map + one map per stage, `[B, C, H, W]`).

    Tokens are the selected map flattened row-major (token `y * W + x`), `grid` its (H, W), `patch_size`
    the stage's total stride and `hidden_size` its channels. There is no CLS token: `cls` is the selected
    map's global average and `select_feature="cls_patch"` is refused. `levels` are all hidden maps, indexed
    like `select_layer`. `select_layer` defaults to -1, the last stage.

    Preprocessing is HF's `ConvNextImageProcessorPil` (what the ResNet and ConvNeXt checkpoints ship with)
    with crop_pct 1.0 and ImageNet mean/std: the shortest edge goes to `image_size` and the centre square
    is kept (from 384 px HF squashes instead), so a square image of `image_size` passes through unresized.
    Convolutions take any size, so the processor, not the config, decides the grid.

    BatchNorm: a tower with no trainable parameter stays in eval mode when its module is put in training
    mode (see `train`), so a frozen ResNet neither normalises with batch statistics nor drifts its running
    statistics while the projector and LM train.
    """

    has_cls = False
    fixed_resolution = False
    default_select_layer = -1
    hidden_states_are_maps = True
    processor_cls = ConvNextImageProcessorPil

    @classmethod
    def stage_geometry(cls, hf: PretrainedConfig) -> list[tuple[int, int]]:
        """(channels, total stride) of each hidden state, stem first, from the HF config alone."""
        raise NotImplementedError

    def num_hidden_states(self) -> int:
        return len(self.stage_geometry(self.model.config))

    def state_geometry(self, index: int) -> tuple[int, int]:
        return self.stage_geometry(self.model.config)[index]

    @classmethod
    def default_processor(cls, image_size: int) -> BaseImageProcessor:
        return cls.processor_cls(
            size={"shortest_edge": image_size},
            crop_pct=1.0,  # HF's 224/256 would resize 64 px up to 73 px and crop back: a needless resample
            image_mean=IMAGENET_DEFAULT_MEAN,
            image_std=IMAGENET_DEFAULT_STD,
        )

    @classmethod
    def default_image_size(cls, hf_config: PretrainedConfig) -> int:
        # ResNetConfig has no image_size (ours carry one as an extra attribute); ImageNet's 224 otherwise.
        return int(getattr(hf_config, "image_size", None) or 224)

    def forward(self, pixel_values: torch.Tensor) -> VisionFeatures:
        """Encode a batch and return the map of `select_layer` as row-major tokens `[B, H*W, C]`."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        maps = list(outputs.hidden_states)
        selected = maps[self.config.select_layer]
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        if tuple(selected.shape[1:]) != (self.hidden_size, *grid):
            raise RuntimeError(
                f"{type(self).__name__}: hidden state {self.config.select_layer} is {tuple(selected.shape[1:])}, "
                f"expected {(self.hidden_size, *grid)} (channels, stride {self.patch_size} grid); the stage "
                "geometry does not match this model, or the input size is not a multiple of the stride"
            )
        tokens = selected.flatten(2).transpose(1, 2)
        if (self.config.positions or "sincos2d") == "sincos2d":
            tokens = tokens + sincos_2d(grid, tokens.shape[-1], tokens.device, tokens.dtype)
        elif self.config.positions != "none":
            raise ValueError(f"tower positions must be 'sincos2d' or 'none', got {self.config.positions!r}")
        return VisionFeatures(tokens=tokens, grid=grid, cls=selected.mean(dim=(-2, -1)), levels=maps)

    def final_outputs(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(pixel_values=pixel_values.to(device=self.device, dtype=self.dtype))
        pooled = out.pooler_output  # ResNet: average pool [B, C, 1, 1]; ConvNeXt: LayerNorm(mean) [B, C]
        return out.last_hidden_state.flatten(2).transpose(1, 2), (
            None if pooled is None else pooled.flatten(1)
        )

    def train(self, mode: bool = True) -> ConvTower:
        """Training mode, except that a tower with nothing to train keeps its model in eval mode.

        Frozen means frozen: in training mode BatchNorm would normalise with the batch's statistics and
        overwrite its running ones every step, so a "frozen" ResNet would change under an `align` stage
        and differ between training, the feature cache (which runs in eval mode) and inference. The
        engine freezes parameters before it calls `.train()`, which is when this decides.
        """
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.parameters()):
            self.model.eval()
        return self


@register_tower("resnet")
class ResNetTower(ConvTower):
    """HF ResNet (`ResNetModel`, microsoft/resnet-*): 7x7/2 conv + max-pool stem, then residual stages."""

    model_cls = ResNetModel
    config_cls = ResNetConfig

    @classmethod
    def stage_geometry(cls, hf: PretrainedConfig) -> list[tuple[int, int]]:
        stride = 4  # the stem: 7x7 conv stride 2, 3x3 max-pool stride 2
        geometry = [(int(hf.embedding_size), stride)]
        for i, channels in enumerate(hf.hidden_sizes[: len(hf.depths)]):
            # ResNetEncoder: stage 0 downsamples only with downsample_in_first_stage, every later one does.
            stride *= 2 if (i > 0 or hf.downsample_in_first_stage) else 1
            geometry.append((int(channels), stride))
        return geometry


@register_tower("convnext")
class ConvNextTower(ConvTower):
    """HF ConvNeXt (`ConvNextModel`, facebook/convnext-*): patchify stem, then stages that halve the map."""

    model_cls = ConvNextModel
    config_cls = ConvNextConfig

    @classmethod
    def stage_geometry(cls, hf: PretrainedConfig) -> list[tuple[int, int]]:
        stride = int(hf.patch_size)  # the stem: patch_size x patch_size conv with that stride
        geometry = [(int(hf.hidden_sizes[0]), stride)]
        for i in range(int(hf.num_stages)):
            stride *= 2 if i > 0 else 1  # ConvNextEncoder: stage 0 has stride 1, the others 2
            geometry.append((int(hf.hidden_sizes[i]), stride))
        return geometry


def sincos_2d(
    grid: tuple[int, int], dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`[H*W, dim]` fixed sin-cos codes of each cell's (row, column), row-major (MAE's 2-D scheme).

    Half of the channels code the row and half the column, each as sines and cosines at geometrically
    spaced frequencies; values lie in [-1, 1], the scale of normalised conv activations. No parameters,
    so a saved HF tower stays a plain HF checkpoint.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2-D positions need a channel count divisible by 4, got {dim}")
    h, w = grid
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows = torch.arange(h, dtype=torch.float64)[:, None] * freq  # [H, dim/4]
    cols = torch.arange(w, dtype=torch.float64)[:, None] * freq  # [W, dim/4]
    row_code = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    col_code = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([row_code, col_code], dim=-1).reshape(h * w, dim).to(device=device, dtype=dtype)


def _attn_kwargs(model_cls: type[PreTrainedModel]) -> dict[str, str]:
    """SDPA wherever the class supports it: same numerics as eager attention, less memory, faster."""
    return {"attn_implementation": "sdpa"} if getattr(model_cls, "_supports_sdpa", False) else {}


def _build_processor(
    tower_cls: type[Tower], cfg: TowerConfig, hf_config: PretrainedConfig, settings: dict[str, Any] | None
) -> BaseImageProcessor:
    """The checkpoint's own processor if it has one, else the saved settings, else the family default."""
    if cfg.path and os.path.isfile(os.path.join(cfg.path, "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(
            cfg.path,
            backend=IMAGE_PROCESSOR_BACKEND,
            local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
        )
    if settings:
        return tower_cls.processor_cls.from_dict(dict(settings))
    return tower_cls.default_processor(tower_cls.default_image_size(hf_config))


def build_tower(cfg: TowerConfig, load_weights: bool = True) -> Tower:
    """Build the tower `cfg` describes.

    - `path` and `load_weights`: the checkpoint's weights (`from_pretrained`, local files only).
    - `path` and not `load_weights`: the checkpoint's architecture, randomly initialised, because the
      caller is about to load the tower's weights from a bigger (whole-model) checkpoint.
    - no `path`: the architecture from `cfg.config` over the HF class defaults (see TINY_CONFIGS).
    Models are float32; the training engine decides the working precision.
    """
    tower_cls = TOWERS[cfg.type]
    model_cls = tower_cls.model_cls
    common: dict[str, Any] = {**_attn_kwargs(model_cls), "dtype": torch.float32}
    settings: dict[str, Any] | None = None
    if cfg.path is not None:
        if not os.path.isdir(cfg.path):
            raise FileNotFoundError(f"tower path {cfg.path!r} is not a local directory")
        # trust_remote_code is not passed here: the registry fixes the concrete classes, which never run
        # remote code (transformers ignores the flag with a warning). It reaches the Auto processor below.
        if load_weights:
            model = model_cls.from_pretrained(cfg.path, local_files_only=True, use_safetensors=True, **common)
        else:
            hf_config = tower_cls.config_cls.from_pretrained(cfg.path, local_files_only=True)
            model = model_cls._from_config(hf_config, **common)
    else:
        kwargs = tower_cls.vision_config_dict(cfg.config)
        settings = kwargs.pop(PROCESSOR_KEY, None)
        hf_config = tower_cls.config_cls.from_dict(kwargs)
        model = model_cls._from_config(hf_config, **common)
    processor = _build_processor(tower_cls, cfg, model.config, settings)
    return tower_cls(cfg, model, processor)
