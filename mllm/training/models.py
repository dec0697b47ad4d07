"""Model kinds: what a recipe trains (a MultimodalLM, a contrastive encoder pair, ...), as a registry.

The runner and the engine never learn what a model is: a kind says how to build a fresh model from
the recipe's `ModelConfig`, how to load a saved one, and how to recognise a finished save. One new
kind of model is one `register_model_kind` entry below (imports inside the functions, so that loading
this registry never imports every model family).

Every model a kind returns has `save_pretrained(dir)`, which writes atomically (temp folder + rename),
and a `forward(**batch)` whose output has `.loss`, so the generic `Trainer` trains it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mllm.config import ModelConfig

BuildFn = Callable[[ModelConfig, Path, list[Path], int], nn.Module]


@dataclass(frozen=True)
class ModelKind:
    name: str
    # build(cfg, run_dir, corpus_files, seed): a fresh model (or cfg.init_from loaded); corpus_files are
    # the recipe's data files, from which a tokenizer is trained when the recipe names none.
    build: BuildFn
    load: Callable[[Path], nn.Module]  # load(dir): a model saved by this kind's save_pretrained
    is_saved: Callable[[Path], bool]  # is_saved(dir): dir holds a complete save of this kind
    doc: str = ""


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model_kind(kind: ModelKind, replace: bool = False) -> ModelKind:
    """Add a kind; a second kind under the same name is an error unless `replace`."""
    if kind.name in MODEL_KINDS and not replace:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    MODEL_KINDS[kind.name] = kind
    return kind


def get_model_kind(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {name!r}; known: {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[name]


def saved_kind(path: str | Path) -> ModelKind | None:
    """The kind whose complete save `path` holds, or None."""
    path = Path(path)
    return next((k for k in MODEL_KINDS.values() if k.is_saved(path)), None)


# ---------------------------------------------------------------------------------------------- mllm


def _build_mllm(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> nn.Module:
    from mllm.config import ConfigError
    from mllm.training.runner import build_model

    if cfg.encoder:  # a MultimodalLM has no use for it: refuse rather than ignore a misplaced section
        raise ConfigError(f"model.encoder {sorted(cfg.encoder)} is set but model.kind is 'mllm'; "
                          "did you mean model.kind: contrastive?")

    return build_model(cfg, run_dir, corpus_files, seed)


def _load_mllm(path: Path) -> nn.Module:
    from mllm.model import MultimodalLM

    return MultimodalLM.from_pretrained(path)


register_model_kind(ModelKind(
    "mllm", _build_mllm, _load_mllm, lambda p: (Path(p) / "mllm.json").is_file(),
    doc="MultimodalLM: tower + projector + causal LM (mllm.model)",
))


# ---------------------------------------------------------------------------------------- contrastive


def _build_contrastive(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> nn.Module:
    from encoders.contrastive import build_contrastive_model

    return build_contrastive_model(cfg, run_dir, corpus_files, seed)


def _load_contrastive(path: Path) -> nn.Module:
    from encoders.contrastive import ContrastiveModel

    return ContrastiveModel.from_pretrained(path)


def _is_contrastive(path: Path) -> bool:
    from encoders.contrastive import META_FILE

    return (Path(path) / META_FILE).is_file()


register_model_kind(ModelKind(
    "contrastive", _build_contrastive, _load_contrastive, _is_contrastive,
    doc="encoders.ContrastiveModel: image tower + text tower + heads, trained by encoders.objectives",
))


# ------------------------------------------------------------------------------- ssl / tips / cloc


def _build_ssl(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> nn.Module:
    from encoders.ssl import build_ssl_model

    return build_ssl_model(cfg, run_dir, corpus_files, seed)


def _load_ssl(path: Path) -> nn.Module:
    from encoders.ssl import SSLModel

    return SSLModel.from_pretrained(path)


def _is_ssl(path: Path) -> bool:
    from encoders.ssl import is_saved

    return is_saved(path, "ssl")


register_model_kind(ModelKind(
    "ssl", _build_ssl, _load_ssl, _is_ssl,
    doc="encoders.ssl.SSLModel: a Dinov2 tower trained by DINO + iBOT self-distillation (images only)",
))


def _build_tips(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> nn.Module:
    from encoders.tips import build_tips_model

    return build_tips_model(cfg, run_dir, corpus_files, seed)


def _load_tips(path: Path) -> nn.Module:
    from encoders.tips import TipsModel

    return TipsModel.from_pretrained(path)


def _is_tips(path: Path) -> bool:
    from encoders.tips import is_tips_dir

    return is_tips_dir(path)


register_model_kind(ModelKind(
    "tips", _build_tips, _load_tips, _is_tips,
    doc="encoders.tips.TipsModel: two-CLS contrastive (short/long captions) + DINO + iBOT",
))


def _build_cloc(cfg: ModelConfig, run_dir: Path, corpus_files: list[Path], seed: int) -> nn.Module:
    from encoders.cloc import build_cloc_model

    return build_cloc_model(cfg, run_dir, corpus_files, seed)


def _load_cloc(path: Path) -> nn.Module:
    from encoders.cloc import ClocModel

    return ClocModel.from_pretrained(path)


def _is_cloc(path: Path) -> bool:
    from encoders.cloc import is_cloc_dir

    return is_cloc_dir(path)


register_model_kind(ModelKind(
    "cloc", _build_cloc, _load_cloc, _is_cloc,
    doc="encoders.cloc.ClocModel: CLIP pair + Prompter (region-text InfoNCE + grounding)",
))
