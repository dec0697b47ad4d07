"""PRIOR ("Prioritizing Image-Related Tokens"): per-token caption weights from a text-only reference LM.

Method (docs: shared/reference/methods.md, PRIOR). A text-only reference LM is trained on the captions;
each caption token t_i then weighs

    w_i = clamp((1 - P_ref(t_i | t_<i)) ** alpha, floor, cap),   renormalised so the k weights of a caption sum to k

and the MLLM trains on sum_i w_i * CE_i / n_labelled (`MultimodalLM.forward(..., token_weights=...)`).
Tokens the text-only model finds easy carry no visual information; down-weighting them stops the
MLLM learning to ignore the image. alpha = 0 gives exactly all-ones weights, i.e. the plain loss.

What the reference LM sees. A *caption* is one maximal run of labelled (target) positions in a sample's
`labels` (with the `plain` template: the assistant's text + EOS). The reference LM scores that run
alone, behind one start token: `[S, t_1, ..., t_k]` where S is the tokenizer's BOS, or its EOS when it
has no BOS (Qwen-style tokenizers, whose documents are EOS-separated). It never sees image
placeholders, the prompt, other captions of the sample or padding; those positions get weight 0.
The `prior_ref` stage trains the reference on exactly these sequences, so training and scoring match.

Stage kinds (registered by the `mllm` family, mllm.families.mllm): `prior_ref` trains the model's `lm` on `[S] + caption` sequences
of the stage's data (images and prompts dropped); `prior` trains the projector (template `plain`)
with the weighted loss, computing the weights once into a cache (on rank 0) and reusing them.

Settings of a `prior` stage: its typed `prior:` section in the recipe (mllm.config.PriorConfig, checked
when the recipe loads, unknown keys refused), e.g. `stages.prior.prior.alpha=0.5` on the command line.
Keys: `ref` (a causal-LM directory, or `stage:NAME` for this run's `NAME/final/lm`; default: the
model's own `lm` at the start of the stage -- the `prior_ref` stage's output in the recipes), `alpha`
(1.0), `floor` (0.0), `cap` (1e9), `cache` (a folder; default `<data dir>/prior_cache/<data stem>-<digest>`),
`batch_size` (32, for the reference pass). Nothing else configures PRIOR: there is no module state, and
a sidecar `<data stem>.prior.json` (read before this convention) is refused with where to move it.

Cache: `weights.safetensors` (one 1-D float32 tensor per sample id: the weights of its labelled
positions in order) + `manifest.json` (the folder's meta file: kind `prior_cache`, format_version) with
the fingerprint: tokenizer (vocabulary + special tokens),
reference LM (hash of its state dict), alpha, floor, cap, template. A cache whose fingerprint differs
is refused with what changed ("stale cache: reference LM changed"), never reused; a sample missing
from it is an error naming the sample.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from encoders.common import read_meta, write_meta
from mllm.chat import IGNORE_INDEX, SampleError, encode_conversation
from mllm.config import ConfigError, PriorConfig
from mllm.data.batch import Skip, is_skipped, skipped
from mllm.data.conversations import ConversationDataset, image_paths, sample_name

CACHE_KIND = "prior_cache"
CACHE_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"  # the cache folder's meta file (kind, format_version, fingerprint)


class StaleCacheError(ValueError):
    """A weight cache made under different settings (tokenizer, reference LM, alpha, floor, cap, template)."""


# The settings are the recipe's (mllm.config.PriorConfig); the old name stays for callers that build them.
PriorSettings = PriorConfig


def resolve_ref(s: PriorConfig, run_dir: str | Path) -> PriorConfig:
    """`s` with a `ref: "stage:NAME"` made the LM of stage NAME's final model in `run_dir`."""
    name = s.ref_stage()
    return s if name is None else replace(s, ref=str(Path(run_dir) / name / "final" / "lm"))


def sidecar_path(data_json: str | Path) -> Path:
    """Where settings were once read from beside the data (`align.json` -> `align.prior.json`)."""
    p = Path(data_json)
    return p.with_name(p.stem + ".prior.json")


def refuse_sidecar(stage_name: str, data_json: str | Path) -> None:
    """A sidecar settings file is no longer read; one beside the data would be silently ignored, so it is
    refused with the recipe section to move it to."""
    side = sidecar_path(data_json)
    if side.is_file():
        raise ConfigError(
            f"{side}: PRIOR settings are no longer read from a file beside the data; move them into "
            f"the recipe as stage {stage_name!r}'s `prior:` section (e.g. prior: {side.read_text().strip()}; "
            "paths there are relative to where the run starts) and delete the file"
        )


# ---------------------------------------------------------------------------------------- weights
def start_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the reference LM sees before a caption: BOS, else EOS (document separator)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a caption with")


def caption_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of labelled positions in a 1-D label row."""
    on = (labels != IGNORE_INDEX).tolist()
    spans, start = [], None
    for i, v in enumerate(on + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _ref_device(ref_lm: nn.Module) -> torch.device:
    for p in ref_lm.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def ref_token_probs(ref_lm: nn.Module, captions: list[torch.Tensor], start_id: int) -> list[torch.Tensor]:
    """P_ref(t_i | S, t_<i) for each caption (1-D target ids), in one right-padded forward (float64)."""
    if not captions:
        return []
    dev = _ref_device(ref_lm)
    n = max(len(c) for c in captions) + 1
    ids = torch.full((len(captions), n), start_id, dtype=torch.long)
    mask = torch.zeros((len(captions), n), dtype=torch.long)
    for r, c in enumerate(captions):
        ids[r, 1 : len(c) + 1] = c
        mask[r, : len(c) + 1] = 1
    logits = ref_lm(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
    out = []
    for r, c in enumerate(captions):
        k = len(c)
        logp = F.log_softmax(logits[r, :k].double(), dim=-1)
        out.append(logp.gather(-1, c.to(dev).unsqueeze(-1)).squeeze(-1).exp().cpu())
    return out


def weights_from_probs(p: torch.Tensor, alpha: float, floor: float, cap: float) -> torch.Tensor:
    """(1 - p)^alpha clamped to [floor, cap], renormalised to sum to len(p) (float32).

    alpha = 0 gives exactly ones (with floor <= 1 <= cap). A caption whose clamped weights are all 0
    (every token certain and floor 0) falls back to uniform weights rather than dividing by zero.
    """
    k = p.numel()
    w = torch.pow((1.0 - p.double()).clamp_min(0.0), alpha).clamp(floor, cap)
    total = w.sum()
    if k == 0:
        return w.float()
    if total <= 0:
        return torch.ones(k, dtype=torch.float32)
    return (w * (k / total)).float()


@torch.no_grad()
def token_weights(
    ref_lm: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    floor: float = 0.0,
    cap: float = 1.0e9,
    start_id: int | None = None,
) -> torch.Tensor:
    """PRIOR weights [B, T] aligned to `labels`: 0 off-target, each caption's weights summing to its length.

    The targets are read from `labels` (the unshifted target ids); `input_ids` only fixes the shape.
    `start_id` defaults to the reference LM's `config.bos_token_id`, else its `eos_token_id`.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape"
        )
    if start_id is None:
        cfg = getattr(ref_lm, "config", None)
        start_id = next(
            (
                t
                for t in (getattr(cfg, "bos_token_id", None), getattr(cfg, "eos_token_id", None))
                if isinstance(t, int)
            ),
            None,
        )
        if start_id is None:
            raise ValueError("pass start_id: the reference LM's config has no bos/eos token id")
    spans = [(r, s, e) for r in range(labels.shape[0]) for s, e in caption_spans(labels[r])]
    probs = ref_token_probs(ref_lm, [labels[r, s:e] for r, s, e in spans], start_id)
    out = torch.zeros(labels.shape, dtype=torch.float32)
    for (r, s, e), p in zip(spans, probs):
        out[r, s:e] = weights_from_probs(p, alpha, floor, cap)
    return out


# ---------------------------------------------------------------------------------------- fingerprint
def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps(special, sort_keys=True).encode())
    h.update(json.dumps(sorted(str(t) for t in tokenizer.all_special_tokens)).encode())
    h.update(str(start_token_id(tokenizer)).encode())
    return h.hexdigest()


def model_fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(
    tokenizer: PreTrainedTokenizerBase, ref_lm: nn.Module, s: PriorConfig, template: str
) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "reference LM": model_fingerprint(ref_lm),
        "alpha": s.alpha,
        "floor": s.floor,
        "cap": s.cap,
        "template": template,
    }


def digest(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- cache
def _targets(ds: ConversationDataset, i: int) -> tuple[str, torch.Tensor] | None:
    """(sample id, labels) of sample i without loading its images; None for a skipped bad sample."""
    rec = ds.records[i]
    name = sample_name(ds.path, i, rec)
    if i in ds.load_errors:
        return None
    try:
        enc = encode_conversation(
            rec["conversations"],
            ds.tokenizer,
            ds.template,
            ds.image_token_id,
            ds.num_image_tokens,
            num_images=len(image_paths(rec)),
            max_length=ds.max_length,
            sample=name,
            look_token=ds.look_token,
            look_at=ds.look_at,
        )
    except SampleError:
        if ds.skip_bad_samples:
            return None
        raise
    return str(rec.get("id", str(i))), enc["labels"]


def _batched(xs: list, n: int) -> Iterable[list]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def compute_weights(
    ref_lm: nn.Module, ds: ConversationDataset, s: PriorConfig, log=print
) -> dict[str, torch.Tensor]:
    """Sample id -> float32 weights of its labelled positions, in order (one batched pass)."""
    start_id = start_token_id(ds.tokenizer)
    items: list[tuple[str, torch.Tensor]] = []
    seen: dict[str, int] = {}
    for i in range(len(ds)):
        t = _targets(ds, i)
        if t is None:
            continue
        if t[0] in seen:
            raise ValueError(
                f"{ds.path}: sample id {t[0]!r} is used by samples #{seen[t[0]]} and #{i}; "
                "the PRIOR cache is keyed by id"
            )
        seen[t[0]] = i
        items.append(t)
    # Sorting by caption length keeps padding low; the result is keyed by id, so order does not matter.
    spans = [(sid, s0, e0) for sid, lab in items for s0, e0 in caption_spans(lab)]
    spans.sort(key=lambda x: x[2] - x[1])
    lab_of = dict(items)
    per_span: dict[tuple[str, int], torch.Tensor] = {}
    was_training = ref_lm.training
    ref_lm.eval()
    for chunk in _batched(spans, s.batch_size):
        probs = ref_token_probs(ref_lm, [lab_of[sid][a:b] for sid, a, b in chunk], start_id)
        for (sid, a, _), p in zip(chunk, probs):
            per_span[(sid, a)] = weights_from_probs(p, s.alpha, s.floor, s.cap)
    ref_lm.train(was_training)
    out = {}
    for sid, lab in items:
        out[sid] = torch.cat([per_span[(sid, a)] for a, _ in caption_spans(lab)]).contiguous()
    log(f"[prior] weights for {len(out)} samples ({len(spans)} captions)")
    return out


def save_cache(cache_dir: str | Path, weights: dict[str, torch.Tensor], fp: dict[str, Any]) -> Path:
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, cache_dir / WEIGHTS_FILE)
    manifest = {"fingerprint": fp, "digest": digest(fp), "samples": len(weights)}
    tmpm = cache_dir / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    write_meta(tmpm, CACHE_KIND, CACHE_VERSION, manifest, indent=1)
    os.replace(tmpm, cache_dir / MANIFEST_FILE)  # the manifest last: its presence means a complete cache
    return cache_dir


def cache_exists(cache_dir: str | Path) -> bool:
    return (Path(cache_dir) / MANIFEST_FILE).is_file() and (Path(cache_dir) / WEIGHTS_FILE).is_file()


def check_fingerprint(cache_dir: str | Path, fp: dict[str, Any]) -> None:
    """Raise StaleCacheError naming every setting that differs from the cache's."""
    manifest = read_meta(Path(cache_dir) / MANIFEST_FILE, CACHE_KIND, CACHE_VERSION)
    old = manifest.get("fingerprint", {})
    changed = []
    for key in fp:
        if old.get(key) != fp[key]:
            if key in ("tokenizer", "reference LM"):
                changed.append(f"{key} changed")
            else:
                changed.append(f"{key} changed (cache {old.get(key)!r}, now {fp[key]!r})")
    if changed:
        raise StaleCacheError(
            f"stale cache {cache_dir}: {'; '.join(changed)}. Delete it or point "
            "`cache` elsewhere; it is never reused under different settings"
        )


class WeightCache:
    """Loaded per-sample weights, checked against the fingerprint they must have been made under."""

    def __init__(self, cache_dir: str | Path, fp: dict[str, Any] | None = None):
        self.dir = Path(cache_dir)
        if not cache_exists(self.dir):
            raise FileNotFoundError(f"{self.dir}: no PRIOR weight cache ({MANIFEST_FILE} + {WEIGHTS_FILE})")
        if fp is not None:
            check_fingerprint(self.dir, fp)
        self.weights = load_file(str(self.dir / WEIGHTS_FILE))

    def __getitem__(self, sample_id: str) -> torch.Tensor:
        if sample_id not in self.weights:
            raise KeyError(
                f"sample {sample_id!r} is missing from the PRIOR cache {self.dir} "
                "(the data changed since it was computed?)"
            )
        return self.weights[sample_id]

    def __len__(self) -> int:
        return len(self.weights)


def load_or_compute(
    ref_lm: nn.Module,
    ds: ConversationDataset,
    s: PriorConfig,
    cache_dir: str | Path,
    fp: dict[str, Any] | None = None,
    log=print,
) -> WeightCache:
    """The cache at `cache_dir` (checked), computed and saved first when absent (single process)."""
    fp = fp if fp is not None else fingerprint(ds.tokenizer, ref_lm, s, ds.template)
    if cache_exists(cache_dir):
        check_fingerprint(cache_dir, fp)
    else:
        save_cache(cache_dir, compute_weights(ref_lm, ds, s, log), fp)
    return WeightCache(cache_dir, fp)


class PriorDataset(Dataset):
    """A ConversationDataset whose samples carry PRIOR `token_weights` aligned to their `labels`."""

    def __init__(self, base: ConversationDataset, cache: WeightCache):
        self.base = base
        self.cache = cache

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if is_skipped(item):
            return item
        on = item["labels"] != IGNORE_INDEX
        w = self.cache[str(item["id"])]
        if w.numel() != int(on.sum()):
            name = sample_name(self.base.path, i, self.base.records[i])
            if self.base.skip_bad_samples:
                return skipped(
                    Skip(
                        name,
                        f"{name}: PRIOR cache has {w.numel()} weights, sample has "
                        f"{int(on.sum())} target tokens",
                    )
                )
            raise SampleError(
                f"{name}: the PRIOR cache {self.cache.dir} has {w.numel()} weights but the sample "
                f"has {int(on.sum())} target tokens (stale cache for changed data?)"
            )
        full = torch.zeros(on.shape, dtype=torch.float32)
        full[on] = w
        item["token_weights"] = full
        return item


# ---------------------------------------------------------------------------------------- prior_ref data
class CaptionTextDataset(Dataset):
    """The reference LM's training data: each caption alone as `[S, t_1..t_k]`, labels `[-100, t_1..t_k]`.

    Built from the same records and template as the `prior` stage (images and prompts dropped), so the
    reference is trained on exactly the sequences it later scores.
    """

    def __init__(self, base: ConversationDataset):
        self.base = base
        self.start_id = start_token_id(base.tokenizer)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.base.records[i]
        name = sample_name(self.base.path, i, rec)
        if i in self.base.load_errors:
            return skipped(Skip(name, self.base.load_errors[i]))
        t = _targets(self.base, i)  # a bad sample raises (naming it) unless skip_bad_samples
        if t is None:
            return skipped(Skip(name, f"{name}: unusable sample"))
        sid, lab = t
        pieces = [lab[a:b] for a, b in caption_spans(lab)]
        # Several captions in one sample become one text, each behind its own start token.
        ids = torch.cat([torch.cat([torch.tensor([self.start_id]), p]) for p in pieces])
        labels = torch.cat([torch.cat([torch.tensor([IGNORE_INDEX]), p]) for p in pieces])
        return {"index": i, "id": sid, "input_ids": ids, "labels": labels, "pixel_values": None}


def reference_from(model_lm: nn.Module, s: PriorConfig, vocab_size: int) -> nn.Module:
    """The reference LM: `s.ref` loaded from disk, else a frozen copy of `model_lm`."""
    if s.ref:
        ref = AutoModelForCausalLM.from_pretrained(s.ref, local_files_only=True, use_safetensors=True)
    else:
        ref = copy.deepcopy(model_lm)
    emb = ref.get_input_embeddings().num_embeddings
    if emb < vocab_size:
        raise ValueError(
            f"reference LM {s.ref or '(the model lm)'} has {emb} embeddings but the tokenizer "
            f"has {vocab_size} tokens: it must share the MLLM's tokenizer"
        )
    return ref.eval().requires_grad_(False)
