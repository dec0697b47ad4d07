"""The saved folder of an image-only encoder kind (`ssl`): `image_tower/` (an ordinary HF folder),
`<kind>.safetensors` (everything else) and `<kind>.json` (the folder's one meta file: kind, format_version,
tower reader, configs; encoders.common.write_meta), written atomically."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.common import atomic_dir, write_meta
from encoders.common import read_meta as read_meta_file
from encoders.towers import Tower


def tower_meta(tower: Tower) -> dict[str, Any]:
    """How to rebuild the tower's reader from its saved folder (type, layer, features), never the path."""
    cfg = asdict(tower.config)
    cfg.pop("path", None)
    cfg.pop("config", None)
    return cfg


def save_encoder(
    model: nn.Module,
    out_dir: str | Path,
    kind: str,
    meta: dict[str, Any],
    tower_state: dict[str, torch.Tensor] | None = None,
    version: int = 1,
) -> Path:
    """Write `image_tower/` (HF), `<kind>.safetensors` (everything else) and `<kind>.json` atomically.

    Written to a temporary sibling and renamed, so a crash never leaves a half-written model folder.
    `tower_state` replaces the tower's weights in `image_tower/` (an EMA teacher export).
    """
    with atomic_dir(out_dir) as tmp:
        tower: Tower = model.image_tower
        if tower_state is not None:
            backup = {k: v.detach().clone() for k, v in tower.model.state_dict().items()}
            tower.model.load_state_dict(
                {**backup, **{k: v.to(backup[k].dtype) for k, v in tower_state.items()}}
            )
            try:
                tower.save_pretrained(tmp / "image_tower")
            finally:
                tower.model.load_state_dict(backup)
        else:
            tower.save_pretrained(tmp / "image_tower")
        rest = {
            k: v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith("image_tower.")
        }
        save_file(rest, str(tmp / f"{kind}.safetensors"))
        write_meta(tmp / f"{kind}.json", kind, version, {"tower": tower_meta(tower), **meta})
    return Path(out_dir)


def read_meta(model_dir: Path, kind: str, version: int = 1) -> dict[str, Any]:
    """`<kind>.json`, checked (kind, format_version no newer than `version`; a folder saved before
    versions were written is version 0)."""
    return read_meta_file(Path(model_dir) / f"{kind}.json", kind, version)


def load_extra(model: nn.Module, model_dir: Path, kind: str) -> None:
    """Load `<kind>.safetensors` (all non-tower state); a missing or unexpected key is an error naming it."""
    path = model_dir / f"{kind}.safetensors"
    state = load_file(str(path))
    own = {k for k in model.state_dict() if not k.startswith("image_tower.")}
    missing, extra = own - set(state), set(state) - own
    if missing or extra:
        raise ValueError(f"{path}: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}")
    model.load_state_dict(state, strict=False)


def is_saved(model_dir: str | Path, kind: str) -> bool:
    d = Path(model_dir)
    return (d / f"{kind}.json").is_file() and (d / "image_tower" / "config.json").is_file()
