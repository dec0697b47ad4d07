"""mllm: a training stack for multimodal LLMs whose vision side is built for fine-grained seeing.

The public API:

    import mllm
    recipe = mllm.load_recipe("clip-tiny", ["extra.world=runs/w"])  # a packaged recipe's name, or a path
    summary = mllm.train(recipe, "runs/clip-tiny")                  # runs its stages; returns the summary
    model = mllm.load_model("runs/demo/run")                        # any saved model or finished run folder
    lm = mllm.MultimodalLM.from_pretrained("runs/demo/run/instruct/final")

The command line (`mllm demo | train | eval | ...`) is a thin layer over the same functions.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from mllm.config import load_recipe
    from mllm.model import MultimodalLM
    from mllm.training.runner import train_recipe as train

# name -> (module, attribute). Resolved on first access by `__getattr__` below (PEP 562), not imported
# here: `import mllm` (which every `mllm.x` submodule import and the CLI's start-up run first) stays
# cheap, without torch or transformers, until a caller touches one of these names.
_LAZY: dict[str, tuple[str, str]] = {
    "load_recipe": ("mllm.config", "load_recipe"),
    "train": ("mllm.training.runner", "train_recipe"),
    "MultimodalLM": ("mllm.model", "MultimodalLM"),
}

__all__ = ["MultimodalLM", "load_model", "load_recipe", "train"]


def load_model(path: str | Path, kind: str | None = None) -> nn.Module:
    """A saved model: a model folder of any registered kind (a MultimodalLM, a contrastive encoder, ...) or a
    finished run folder (its last stage's final model). `kind` ("mllm", "contrastive", ...) insists on one."""
    # Lazy for the same reason as `_LAZY`: the loaders pull in torch and every model family.
    from mllm.loading import get_loader, resolve_model_dir, saved_loader

    if kind is not None:
        return get_loader(kind).load(resolve_model_dir(path, kind))
    path = Path(path)
    loader = saved_loader(path)
    if loader is None:  # a run folder: its final model, whatever its kind
        run = path / "run.json"
        final = json.loads(run.read_text()).get("final") if run.is_file() else None
        loader = saved_loader(final) if final else None
        if loader is None:
            raise FileNotFoundError(
                f"{path}: neither a saved model folder nor a finished run folder (run.json)"
            )
        path = Path(final)
    return loader.load(path)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module 'mllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
