"""Model loading, for everything that loads a saved model (evaluation, chat, export, `mllm.load_model`):
which family a folder holds and how to load it, by the family registry (`mllm.families`), without
importing training.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mllm.families import get_family, saved_family

# A family (mllm.families.Family) is what loads and recognises a saved model of its kind: these names
# say so where a caller only loads.
get_loader = get_family
saved_loader = saved_family


def resolve_model_dir(path: str | Path, kind: str = "mllm") -> Path:
    """A model folder of `kind`, or a run folder (its last finished stage's final model)."""
    path = Path(path)
    saved = get_loader(kind).is_saved
    if saved(path):
        return path
    run = path / "run.json"
    if run.is_file():
        final = json.loads(run.read_text()).get("final")
        if final and saved(Path(final)):
            return Path(final)
    what = "mllm.json" if kind == "mllm" else f"a saved {kind!r} model"
    raise FileNotFoundError(f"{path}: neither a model folder ({what}) nor a finished run folder (run.json)")


def load_model(path: str | Path, kind: str = "mllm") -> nn.Module:
    """The model of `kind` saved in `path`, a model folder or a finished run folder."""
    return get_loader(kind).load(resolve_model_dir(path, kind))
