"""Fused vision front-ends for MultimodalLM: Mixture of Features and CLIP + geometric encoder + router.

A single-tower model needs none of this (`tower` -> `projector`). A fused model keeps `tower` (the
CLIP-style tower) and `projector` under the same names — so stage declarations (`align` trains
`projector`) and state-dict prefixes keep meaning the same thing — and adds its own parts beside them:

    MoF:     tower2 (HF dir `tower2/`); projector = one projector, or `StreamProjectors` (interleaved)
    router:  geo (`geo/`, frozen), router (`router.safetensors`); projector over [CLIP | routed levels]
             (or over CLIP + routed levels: `router_merge: residual`)

**One image, every part.** The parts may want different sizes and normalisations (CLIP 336 px with
OpenAI statistics, DINOv2 224 px with ImageNet ones, the geometric encoder its own). A fused model
therefore preprocesses each image ONCE to a canonical [0, 1] RGB tensor (shortest edge to the largest
input size among the parts, bicubic, centre crop; the first tower's pad-to-square applies) and each part
resizes (bicubic, antialiased) and normalises that tensor itself in `encode`. The collator and the
dataset stay unchanged (one `pixel_values` tensor per image), and every part provably sees the same
view of the image, which is what MoF's comparison assumes. The price: a tower sees torch-resized pixels
rather than its PIL processor's, a difference of interpolation kernels only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.fusion import MixtureOfFeatures, StreamProjectors, interleave
from encoders.geo import GeoEncoder, to_canonical
from encoders.registry import Registry
from encoders.router import FeatureRouter
from encoders.towers import Tower, TowerConfig, build_tower, expand2square
from mllm.config import FusionConfig, from_dict
from mllm.projectors import build_projector

if TYPE_CHECKING:
    from mllm.model import MultimodalLM

__all__ = [
    "FUSIONS",
    "Fusion",
    "MofFusion",
    "RouterFusion",
    "build_fusion",
    "fusion_from_meta",
    "tower_input",
]

FUSIONS: Registry[type[Fusion]] = Registry("fusion type")
#: what an interleaved MoF model's look pools (FusionConfig.look)
LOOKS = ("first", "both")


def register_fusion(*names: str) -> Callable[[type[Fusion]], type[Fusion]]:
    """Class decorator: add a fusion under each of `names` (`model.fusion.type`)."""

    def deco(cls: type[Fusion]) -> type[Fusion]:
        for name in names:
            FUSIONS.check_free(name, stacklevel=2)
        for name in names:
            FUSIONS.register(name, cls, stacklevel=2)
        return cls

    return deco


def tower_input(tower: Tower, pixels01: torch.Tensor) -> torch.Tensor:
    """Canonical [0, 1] pixels -> what `tower` expects: its input size, its processor's normalisation."""
    size = tower.image_size
    x = pixels01
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
    proc = tower.processor
    if getattr(proc, "do_normalize", True):
        mean = torch.tensor(proc.image_mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(proc.image_std, dtype=x.dtype, device=x.device)[:, None, None]
        x = (x - mean) / std
    return x


def _dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


class Fusion:
    """How a fused model builds, names, feeds, saves and reloads its extra vision parts."""

    kind: ClassVar[str]

    def __init__(self, cfg: FusionConfig) -> None:
        self.cfg = cfg

    # -- building -------------------------------------------------------------------------------------
    def build_parts(
        self,
        tower: Tower,
        projector: str,
        d_llm: int,
        model_dir: Path | None = None,
        load_weights: bool = True,
    ) -> dict[str, nn.Module]:
        """The extra modules and the projector, by attribute name. `model_dir`: reload a saved model."""
        raise NotImplementedError

    def input_sizes(self, model: MultimodalLM) -> list[int]:
        return [model.tower.image_size]

    def num_tokens(self, model: MultimodalLM) -> int:
        raise NotImplementedError

    def encode(self, model: MultimodalLM, pixel_values: torch.Tensor) -> torch.Tensor:
        """Canonical pixels [B, 3, S, S] -> image embeddings [B, N', d_llm]."""
        raise NotImplementedError

    # -- the grid a readout reads ---------------------------------------------------------------------
    #: whether the fused pre-projector tokens form one grid on the first tower's patches; where they do,
    #: the model projects them itself (`MultimodalLM.grid_features`), so an anchored projector and a
    #: question-conditioned readout work on a fused model as on a single tower. A multi-stream fusion
    #: (interleaved MoF) projects its streams itself and a readout reads its first stream (`features`).
    single_grid: ClassVar[bool] = False

    def features(self, model: MultimodalLM, pixel_values: torch.Tensor) -> torch.Tensor:
        """Canonical pixels -> the pre-projector tokens [B, N, feature_dim] a readout reads: the fused grid
        (single-grid fusions) or the first stream (multi-stream fusions)."""
        raise NotImplementedError(f"{self.cfg.type} fusion has no grid of features for a readout")

    def feature_dim(self, tower: Tower, parts: dict[str, nn.Module]) -> int:
        """The width of `features` (the grid projector's and a readout's input)."""
        return tower.hidden_size

    def grid_projector(self, projector: nn.Module) -> nn.Module:
        """Of the model's `projector`, the one that projects the grid `features` gives (what a readout's
        `tokens` and counts come from): all of it, or a multi-stream fusion's first stream's."""
        return projector

    def encode_with_grid(
        self, model: MultimodalLM, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Multi-stream fusions: (image embeddings for the LM [B, N', d_llm], the grid a readout reads
        [B, N, D], that grid's projected tokens [B, N, d_llm]) from one pass of every part. A single-grid
        fusion's are `features` and its projection (MultimodalLM.encode_with_grid)."""
        raise NotImplementedError(f"{self.cfg.type} fusion projects one grid; the model does that")

    # -- pixels ---------------------------------------------------------------------------------------
    def image_size(self, model: MultimodalLM) -> int:
        return int(self.cfg.image_size or max(self.input_sizes(model)))

    def preprocess(self, model: MultimodalLM, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> canonical [B, 3, S, S] in [0, 1] (see the module docstring)."""
        rgb = [im.convert("RGB") for im in images]
        if model.tower.config.pad_to_square:
            background = tuple(int(m * 255) for m in model.tower.processor.image_mean)
            rgb = [expand2square(im, background) for im in rgb]
        size = self.image_size(model)
        return torch.stack([to_canonical(im, size) for im in rgb])

    # -- persistence ----------------------------------------------------------------------------------
    def save_parts(self, model: MultimodalLM, out: Path) -> dict[str, Any]:
        """Write the extra parts under `out`; return the `fusion` entry of mllm.json (paths relative)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        return asdict(self.cfg)


@register_fusion("mof_additive", "mof_interleaved")
class MofFusion(Fusion):
    """Two towers on the same image, mixed by `encoders.MixtureOfFeatures`."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__(cfg)
        if cfg.tower2 is None:
            raise ValueError(f"fusion {cfg.type}: tower2 (the second tower's TowerConfig) is required")
        self.mof = MixtureOfFeatures(cfg.type.removeprefix("mof_"), cfg.alpha, cfg.resample)
        self.single_grid = self.mof.mode == "additive"  # interleaved hands the LM two streams
        if cfg.projector2 is not None and self.single_grid:
            raise ValueError("fusion mof_additive has one projector; projector2 is for mof_interleaved")
        if cfg.look not in LOOKS:
            raise ValueError(f"fusion {cfg.type}: look must be one of {LOOKS}, got {cfg.look!r}")
        if cfg.look != "first" and self.single_grid:
            raise ValueError(
                "fusion mof_additive has one grid, which its look reads; look is for mof_interleaved"
            )

    def features(self, model: MultimodalLM, pixel_values: torch.Tensor) -> torch.Tensor:
        # interleaved: a readout reads the first tower's stream; the second reaches the LM as its tokens
        first, second = self._towers(model, pixel_values, second=self.single_grid)
        return self.mof.mix(first, second) if self.single_grid else first.tokens

    def grid_projector(self, projector: nn.Module) -> nn.Module:
        return projector if self.single_grid else projector[0]

    def encode_with_grid(
        self, model: MultimodalLM, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The look attends over the first stream's grid; it pools that stream's projected tokens, or
        (`look: both`) those plus the second stream's at the same cells. Why both: a seeing model answers
        from its look, so a second stream the LM can reach only by its own attention over the image
        tokens barely moves the answers (docs/evidence.md, MoF); pooled into the look it reaches the
        answer position directly. The second stream's projector starts silent, so a grafted model's
        looks start as the original's."""
        first, second = self._towers(model, pixel_values)
        e1, e2, img = self._interleaved(model, first, second)
        return img, first.tokens, e1 + e2.to(e1.dtype) if self.cfg.look == "both" else e1

    def _towers(self, model: MultimodalLM, pixel_values: torch.Tensor, second: bool = True):
        px = pixel_values.float()
        first = model.tower(tower_input(model.tower, px).to(_dtype(model.tower)))
        if not second:
            return first, None
        other = model.tower2(tower_input(model.tower2, px).to(_dtype(model.tower2)))
        return first, other

    def _interleaved(
        self, model: MultimodalLM, first, second
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each stream's projected tokens, both interleaved). Each stream goes through
        `MultimodalLM.project_with`, so an anchored projector reads the LM's embeddings here too."""
        p1, p2 = model.projector
        e1 = model.project_with(p1, first.tokens)
        e2 = model.project_with(p2, self.mof.align(first, second))
        return e1, e2, interleave(e1, e2.to(e1.dtype))

    def build_parts(
        self,
        tower: Tower,
        projector: str,
        d_llm: int,
        model_dir: Path | None = None,
        load_weights: bool = True,
    ) -> dict[str, nn.Module]:
        t2_cfg = self.cfg.tower2
        if model_dir is not None:
            t2_cfg = TowerConfig(**dict(asdict(t2_cfg), path=str(model_dir / "tower2")))
        tower2 = build_tower(t2_cfg, load_weights=load_weights)
        for t in (tower, tower2):
            if t.config.select_feature != "patch":
                raise ValueError(
                    f"MoF mixes patch grids; {t.config.type} tower has select_feature="
                    f"{t.config.select_feature!r} (use 'patch')"
                )
        self.mof.check((tower.hidden_size, tower.grid), (tower2.hidden_size, tower2.grid))
        if self.mof.mode == "additive":
            proj: nn.Module = build_projector(projector, tower.hidden_size, d_llm)
        else:
            proj = StreamProjectors(
                [
                    build_projector(projector, tower.hidden_size, d_llm),
                    build_projector(self.cfg.projector2 or projector, tower2.hidden_size, d_llm),
                ]
            )
        return {"tower2": tower2, "projector": proj}

    def input_sizes(self, model: MultimodalLM) -> list[int]:
        return [model.tower.image_size, model.tower2.image_size]

    def num_tokens(self, model: MultimodalLM) -> int:
        return self.mof.num_tokens(model.tower.num_tokens)

    def encode(self, model: MultimodalLM, pixel_values: torch.Tensor) -> torch.Tensor:
        first, second = self._towers(model, pixel_values)
        if self.single_grid:
            return model.project_with(model.projector, self.mof.mix(first, second))
        return self._interleaved(model, first, second)[2]

    def save_parts(self, model: MultimodalLM, out: Path) -> dict[str, Any]:
        model.tower2.save_pretrained(out / "tower2")
        meta = self.meta()
        meta["tower2"] = dict(asdict(model.tower2.config), path="tower2")
        return meta


@register_fusion("router")
class RouterFusion(Fusion):
    """SVE-Math: CLIP tokens + the geometric encoder's routed pyramid, channel-concatenated (the paper) or
    added on the tower's width (`router_merge: residual`, what a graft onto a trained model needs)."""

    def build_parts(
        self,
        tower: Tower,
        projector: str,
        d_llm: int,
        model_dir: Path | None = None,
        load_weights: bool = True,
    ) -> dict[str, nn.Module]:
        if tower.config.select_feature != "patch":
            raise ValueError("the router resizes levels to the CLIP patch grid; use select_feature='patch'")
        if model_dir is not None:
            geo = GeoEncoder.from_pretrained(model_dir / "geo")
        elif self.cfg.geo_path:
            geo = (
                GeoEncoder.from_pretrained(self.cfg.geo_path)
                if load_weights
                else GeoEncoder(GeoEncoder.read_config(self.cfg.geo_path))
            )
        elif self.cfg.geo is not None:
            geo = GeoEncoder(self.cfg.geo)
        else:
            raise ValueError("fusion router: set geo (an architecture) or geo_path (a trained encoder)")
        router = FeatureRouter(
            tower.hidden_size,
            geo.level_dim,
            geo.num_levels,
            self.cfg.router_mode,
            merge=self.cfg.router_merge,
        )
        if model_dir is not None:
            router.load_state_dict(load_file(str(model_dir / "router.safetensors")))
        proj = build_projector(projector, router.out_dim, d_llm)
        return {"geo": geo, "router": router, "projector": proj}

    single_grid = True  # the routed pyramid is resized onto the CLIP patch grid

    def features(self, model: MultimodalLM, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.routed(model, pixel_values).tokens

    def feature_dim(self, tower: Tower, parts: dict[str, nn.Module]) -> int:
        return parts["router"].out_dim

    def input_sizes(self, model: MultimodalLM) -> list[int]:
        return [model.tower.image_size, model.geo.config.image_size]

    def num_tokens(self, model: MultimodalLM) -> int:
        return model.tower.num_tokens

    def routed(self, model: MultimodalLM, pixel_values: torch.Tensor):
        """The router's output (tokens before the projector, and the routing weights)."""
        px = pixel_values.float()
        clip = model.tower(tower_input(model.tower, px).to(_dtype(model.tower)))
        levels = model.geo.router_levels(model.geo.normalise(px).to(_dtype(model.geo)))
        return model.router(clip, levels)

    def encode(self, model: MultimodalLM, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.project_with(model.projector, self.routed(model, pixel_values).tokens)

    def save_parts(self, model: MultimodalLM, out: Path) -> dict[str, Any]:
        model.geo.save_pretrained(out / "geo")
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.router.state_dict().items()},
            str(out / "router.safetensors"),
        )
        meta = self.meta()
        meta.update(geo=asdict(model.geo.config), geo_path="geo")
        return meta


def build_fusion(cfg: FusionConfig) -> Fusion:
    if cfg.type not in FUSIONS:
        raise ValueError(f"unknown fusion type {cfg.type!r}; known: {sorted(FUSIONS)}")
    return FUSIONS[cfg.type](cfg)


def fusion_from_meta(raw: dict[str, Any]) -> Fusion:
    """The Fusion an mllm.json `fusion` entry describes (paths in it are relative to the model folder)."""
    return build_fusion(from_dict(FusionConfig, raw, "mllm.json fusion"))
