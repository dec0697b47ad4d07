"""A recipe's model on the meta device, built by its family's own code, and each stage's view of it.

The meta device gives every parameter its shape and dtype and no storage, so a 7B model "builds" in a
fraction of a second with no memory. The build is the family's (`mllm.families`), not a copy of it: the
recipe's parts are rewritten to configs (`mllm.planning.configs`) and the tokenizer is the real one where
it is here, else a stand-in of the real one's size (a word-level tokenizer whose entries are
placeholders). Only the size matters: it sets the LM's embedding rows, as `<image>` is added to it exactly
as training adds it (`mllm.tokenizer.ensure_image_token`).

A stage's view applies what training applies before its optimiser exists: LoRA adapters (on a copy, as
the stage after a LoRA stage starts from the merged model), then the stage's trainable prefixes
(`mllm.training.optim.set_trainable`, which refuses a prefix that matches nothing) and the adapters-only
rule under a peft wrapper.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from mllm.config import Recipe, StageConfig
from mllm.families import get_family, resolve_trainable
from mllm.lora import apply_lora, restrict_to_adapters
from mllm.planning.configs import PartConfig, TokenizerPlan, plan_model_config
from mllm.tokenizer import IMAGE_TOKEN
from mllm.training.optim import set_trainable

__all__ = ["MetaModel", "build_meta", "stage_view", "write_standin_tokenizer"]

_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


def write_standin_tokenizer(size: int, folder: Path, with_image_token: bool = False) -> None:
    """A tokenizer of exactly `size` entries (BOS, EOS, pad, unk, `<image>` when asked, placeholders),
    saved to `folder`: what the build needs of a tokenizer it cannot read (its length, its special ids)."""
    specials = [*_SPECIALS, *([IMAGE_TOKEN] if with_image_token else [])]
    if size < len(specials):
        raise ValueError(f"a tokenizer of {size} entries cannot hold the special tokens {specials}")
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<t{i}>": i for i in range(len(specials), size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"additional_special_tokens": [IMAGE_TOKEN]} if with_image_token else {}
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **extra
    ).save_pretrained(str(folder))


@dataclass
class MetaModel:
    """The recipe's model on the meta device, and where its parts' configs came from."""

    model: nn.Module
    parts: list[PartConfig]
    tokenizer: TokenizerPlan
    real_tokenizer: bool  # the tokenizer is the model's own (lengths can then be counted exactly)


def build_meta(recipe: Recipe) -> MetaModel:
    """Build `recipe`'s model (every stage trains the same architecture) on the meta device."""
    cfg, parts, tok = plan_model_config(recipe.model)
    family = get_family(cfg.kind)
    with tempfile.TemporaryDirectory(prefix="mllm-dry-run-") as tmp:
        folder = tok.folder
        if folder is None:
            folder = str(Path(tmp) / "tokenizer")
            write_standin_tokenizer(int(tok.size or 0), Path(folder), tok.has_image_token)
        cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=folder))
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # deprecation chatter of the libraries, not about the recipe
            model = family.build(cfg, Path(tmp), [], recipe.engine.seed)
    return MetaModel(model, parts, tok, real_tokenizer=tok.folder is not None)


def stage_view(
    model: nn.Module, stage: StageConfig, wrap: Callable[[nn.Module, StageConfig], nn.Module] | None = None
) -> tuple[nn.Module, dict[str, float]]:
    """The module the stage trains, with `requires_grad` set as the engine sets it, and its prefixes.

    A LoRA stage gets a copy with adapters on its LM; any other stage the model itself (flags reset).
    `wrap`: the task's training module around the model, where it is not the model itself (the runner
    resolves the prefixes on that module too)."""
    module = model
    if stage.lora is not None:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            module = apply_lora(copy.deepcopy(model), stage.lora)
    if wrap is not None:
        module = wrap(module, stage)
    trainable = resolve_trainable(stage, module)
    set_trainable(module, trainable)
    restrict_to_adapters(module)
    return module, trainable
