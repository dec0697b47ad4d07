"""Where a dry run takes each part's architecture from, since it reads no weights.

A recipe names its Hugging Face parts by path (`model.tower.path`, `model.lm.path`, a fusion's `tower2`,
a contrastive text tower) or gives their config inline (`...config: {...}`). For a plan only the config
matters, taken in this order:

1. **local**: the path is a folder here with a `config.json` (and, for a tower, `preprocessor_config.json`,
   which decides the token grid: DINOv2's config says 518 px, its processor crops 224 px);
2. **inline**: the recipe's own `config` mapping for that part (also when the path is set but not here,
   so `model.lm.config={...}` on the command line plans a model whose folder is elsewhere);
3. **shipped**: one of `mllm/model_configs/*.json` (package data), found by the path's last component
   or the hub id (`/models/vicuna-7b-v1.5` and `lmsys/vicuna-7b-v1.5` both find `vicuna-7b-v1.5.json`).
   Each file holds the published `config.json` values, the processor settings of a vision model, the
   size of the model's tokenizer, and where the values come from (`source`).

A part named by a path with none of the three is a one-line `MissingConfigError` saying which to provide.
The rewritten `ModelConfig` has every path replaced by its config, so the family's own build runs
unchanged and reads nothing from the network or the disk.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.common import ConfigError
from encoders.geo import GeoEncoder
from encoders.registry import Registry
from encoders.towers import PROCESSOR_KEY
from mllm.config import ModelConfig

__all__ = [
    "MODEL_CONFIGS_DIR",
    "SHIPPED",
    "MissingConfigError",
    "PartConfig",
    "ShippedConfig",
    "TokenizerPlan",
    "find_shipped",
    "plan_model_config",
    "resolve_part",
]

# Package data beside the recipes (pyproject's package-data takes every *.json), so an installed wheel
# plans without a checkout.
MODEL_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "model_configs"


class MissingConfigError(ConfigError):
    """A part whose config is neither local, inline nor shipped."""


@dataclass(frozen=True)
class ShippedConfig:
    """One `mllm/model_configs/*.json`: a public model's published config, without weights."""

    id: str  # the hub id, e.g. "lmsys/vicuna-7b-v1.5"
    kind: str  # "lm" | "vision"
    config: dict[str, Any]  # config.json's values (a vision model's vision_config)
    source: str  # where the values come from
    image_processor: dict[str, Any] | None = None  # preprocessor_config.json's settings (vision)
    tokenizer_size: int | None = None  # len(tokenizer) of an LM's own tokenizer, before `<image>` is added
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The lower-case names a recipe's path or hub id finds it by."""
        return tuple(dict.fromkeys(n.lower() for n in (self.id, self.id.split("/")[-1], *self.aliases)))


def _load_shipped() -> Registry[ShippedConfig]:
    reg: Registry[ShippedConfig] = Registry("shipped model config")
    for path in sorted(MODEL_CONFIGS_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        entry = ShippedConfig(
            id=raw["id"],
            kind=raw["kind"],
            config=raw["config"],
            source=raw["source"],
            image_processor=raw.get("image_processor"),
            tokenizer_size=raw.get("tokenizer_size"),
            aliases=tuple(raw.get("aliases", ())),
        )
        for name in entry.names:
            reg.register(name, entry)
    return reg


SHIPPED: Registry[ShippedConfig] = _load_shipped()


def find_shipped(ref: str) -> ShippedConfig | None:
    """The shipped config a path or hub id names (its last component, case-insensitive), or None."""
    for name in (ref.lower().rstrip("/"), Path(ref).name.lower()):
        if name in SHIPPED:
            return SHIPPED[name]
    return None


def _shipped_ids(kind: str) -> str:
    return ", ".join(sorted({e.id.split("/")[-1] for e in SHIPPED.values() if e.kind == kind}))


@dataclass(frozen=True)
class PartConfig:
    """Where one part's architecture came from, for the plan's header."""

    what: str  # the recipe key: "model.lm", "model.tower", "model.fusion.tower2", "model.encoder.text"
    origin: str  # "local" | "inline" | "shipped" | "defaults"
    detail: str  # the config.json read, the shipped model's id, or what the inline config sets
    config: dict[str, Any]  # what the part is built from (with the processor settings of a tower)
    tokenizer_size: int | None = None
    tokenizer_dir: str | None = None  # a local folder with the part's own tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def resolve_part(what: str, path: str | None, inline: dict[str, Any], kind: str) -> PartConfig:
    """The config `what` is planned from: local folder, else inline, else shipped (`kind`: "lm" | "vision"
    | "text", the shipped configs it may take), else a one-line MissingConfigError."""
    if path is None:
        return PartConfig(what, "inline" if inline else "defaults", f"{what}.config", dict(inline))
    folder = Path(path)
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        if kind == "vision" and (folder / "preprocessor_config.json").is_file():
            config[PROCESSOR_KEY] = _read_json(folder / "preprocessor_config.json")
        tok = str(folder) if _has_tokenizer(folder) else None
        return PartConfig(what, "local", str(folder / "config.json"), config, tokenizer_dir=tok)
    if inline:
        return PartConfig(what, "inline", f"{what}.config (path {path} is not here)", dict(inline))
    shipped = find_shipped(path)
    if shipped is not None and shipped.kind == kind:
        config = dict(shipped.config)
        if shipped.image_processor is not None:
            config[PROCESSOR_KEY] = dict(shipped.image_processor)
        return PartConfig(what, "shipped", shipped.id, config, tokenizer_size=shipped.tokenizer_size)
    known = _shipped_ids(kind)
    raise MissingConfigError(
        f"{what}.path {path!r} is not here and no config is known for it: provide it locally (a folder "
        f"with config.json at that path), inline in the recipe ({what}.config: {{...}}), or use a shipped "
        f"one ({'mllm/model_configs: ' + known if known else 'none is shipped for this kind of part'})"
    )


@dataclass(frozen=True)
class TokenizerPlan:
    """The tokenizer the build uses: a real local one (`folder`), or a stand-in of `size` entries."""

    origin: str  # what the size or the folder comes from
    folder: str | None = None
    size: int | None = None
    has_image_token: bool = False  # a tokenizer trained here holds `<image>` within its vocab_size


def _without_path(cfg: Any, config: dict[str, Any]) -> Any:
    return dataclasses.replace(cfg, path=None, config=config)


def plan_model_config(cfg: ModelConfig) -> tuple[ModelConfig, list[PartConfig], TokenizerPlan]:
    """`cfg` with every part's path replaced by its config (see the module docstring), the parts' origins
    and the tokenizer to build with."""
    if cfg.init_from:
        raise ConfigError(
            f"model.init_from {cfg.init_from!r}: a dry run plans the recipe's own architecture; "
            "plan without it (model.init_from=null)"
        )
    parts: list[PartConfig] = []
    tower = resolve_part("model.tower", cfg.tower.path, cfg.tower.config, "vision")
    parts.append(tower)
    new = dataclasses.replace(cfg, tower=_without_path(cfg.tower, tower.config))
    if cfg.fusion is not None:
        fusion = cfg.fusion
        if fusion.tower2 is not None:
            t2 = resolve_part("model.fusion.tower2", fusion.tower2.path, fusion.tower2.config, "vision")
            parts.append(t2)
            fusion = dataclasses.replace(fusion, tower2=_without_path(fusion.tower2, t2.config))
        if fusion.geo_path:
            if not Path(fusion.geo_path).is_dir():
                raise MissingConfigError(
                    f"model.fusion.geo_path {fusion.geo_path!r} is not here: provide it locally (a trained "
                    "geometric-encoder folder) or inline in the recipe (model.fusion.geo: {...}); no "
                    "geometric encoder is shipped"
                )
            geo = GeoEncoder.read_config(fusion.geo_path)
            parts.append(PartConfig("model.fusion.geo", "local", fusion.geo_path, dataclasses.asdict(geo)))
            fusion = dataclasses.replace(fusion, geo=geo, geo_path=None)
        elif fusion.geo is not None:
            parts.append(
                PartConfig("model.fusion.geo", "inline", "model.fusion.geo", dataclasses.asdict(fusion.geo))
            )
        new = dataclasses.replace(new, fusion=fusion)
    text = getattr(cfg.encoder, "text", None)
    tt = None
    if text is not None:
        tt = resolve_part("model.encoder.text", text.path, text.config, "text")
        parts.append(tt)
        new = dataclasses.replace(
            new, encoder=dataclasses.replace(cfg.encoder, text=_without_path(text, tt.config))
        )
    lm = None
    if cfg.kind == "mllm":
        lm = resolve_part("model.lm", cfg.lm.path, cfg.lm.config, "lm")
        parts.append(lm)
        new = dataclasses.replace(new, lm=_without_path(cfg.lm, lm.config))
    return new, parts, _tokenizer_plan(cfg, lm or tt)


def _tokenizer_plan(cfg: ModelConfig, lm: PartConfig | None) -> TokenizerPlan:
    """The real tokenizer where one is here, else a stand-in the size the real one would have. `lm` is the
    part whose folder the family's build takes a tokenizer from (the LM; a contrastive model's text tower)."""
    if cfg.tokenizer.path:
        if _has_tokenizer(Path(cfg.tokenizer.path)):
            return TokenizerPlan(f"local: {cfg.tokenizer.path}", folder=cfg.tokenizer.path)
        shipped = find_shipped(cfg.tokenizer.path)
        if shipped is not None and shipped.tokenizer_size:
            return TokenizerPlan(f"stand-in, size of {shipped.id}'s", size=shipped.tokenizer_size)
    if lm is not None and lm.tokenizer_dir:
        return TokenizerPlan(f"local: {lm.tokenizer_dir}", folder=lm.tokenizer_dir)
    if lm is not None and lm.tokenizer_size:
        return TokenizerPlan(f"stand-in, size of {lm.detail}'s", size=lm.tokenizer_size)
    if lm is not None and lm.what == "model.lm" and cfg.lm.path:  # an LM whose tokenizer is not known
        vocab = int(lm.config.get("vocab_size", cfg.tokenizer.vocab_size))
        return TokenizerPlan(f"stand-in, the LM's vocab_size ({vocab})", size=vocab)
    return TokenizerPlan(
        f"stand-in, trained here (model.tokenizer.vocab_size {cfg.tokenizer.vocab_size})",
        size=cfg.tokenizer.vocab_size,
        has_image_token=True,
    )
