"""How long a stage's samples are: from its data when the data is here, else the recipe's `max_length`.

Compute grows with tokens and attention with their square, so a plan wants the distribution, not a
bound. With the stage's LLaVA-format file present, up to `SAMPLE` records (a seeded draw, the whole file
when smaller) are rendered with the stage's template: counted exactly with the model's own tokenizer when
it is here (`mllm.chat.encode_conversation`, the same ids training sees, each `<image>` expanded to the
model's image tokens), else at ~4 characters a text token (the usual rule of thumb for English BPE
vocabularies) plus the image tokens. Without the data the sequence is `max_length`, the bound training
enforces, and the number of samples is unknown unless given (`--samples STAGE=N`).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mllm.chat import SampleError, encode_conversation, get_template, normalise_turns
from mllm.data.conversations import image_paths
from mllm.data.records import DataError, read_records

__all__ = ["SAMPLE", "CHARS_PER_TOKEN", "SeqStats", "fixed_length", "from_data"]

SAMPLE = 2000  # records drawn from the stage's data: percentiles within ~1-2% on LLaVA-size files
CHARS_PER_TOKEN = 4.0
IMAGE_MARK = "<image>"


@dataclass(frozen=True)
class SeqStats:
    """Tokens per sample of a stage (text + image tokens), and how many samples it has."""

    source: str  # what the numbers come from
    samples: int | None  # records in the stage's data (None: unknown)
    mean: float  # tokens per sample (FLOPs are linear in it)
    mean_sq: float  # E[tokens^2] (attention FLOPs)
    p50: float
    p90: float
    p99: float
    max: float
    peak: float  # the longest sequence a micro-batch pads to (activation memory): min(max, max_length)
    images: float  # images per sample
    labelled: float  # tokens with a label per sample (where the LM head and the loss run)
    over_max: float = 0.0  # share of the drawn samples longer than max_length (refused at training)


def fixed_length(length: int, images: float, image_tokens: int, samples: int | None, source: str) -> SeqStats:
    """Every sample `length` tokens (the bound), `images` images, every text token labelled."""
    text = max(0.0, length - images * image_tokens)
    return SeqStats(
        source, samples, length, float(length) ** 2, length, length, length, length, length, images, text
    )


def _text_tokens(
    turns: list[tuple[str, str]], template: str, tok: PreTrainedTokenizerBase
) -> tuple[int, int]:
    """(text tokens, labelled tokens) of a conversation at ~CHARS_PER_TOKEN characters a token."""
    total = labelled = 0
    for seg in get_template(template).render(turns, tok, False):
        n = math.ceil(len(seg.text.replace(IMAGE_MARK, "")) / CHARS_PER_TOKEN)
        total += n
        labelled += n if seg.target else 0
    return total, labelled


def from_data(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    exact: bool,
    template: str,
    image_token_id: int,
    image_tokens: int,
    max_length: int,
    with_images: bool = True,
    seed: int = 0,
) -> SeqStats:
    """The length distribution of a LLaVA-format file (see the module docstring). `exact`: `tokenizer` is
    the model's own; `with_images` False counts the text alone (PRIOR's reference LM reads captions)."""
    try:
        records = read_records(path)
    except (DataError, OSError) as e:
        raise ValueError(f"{path}: cannot read the stage's data for its lengths: {e}") from e
    n = len(records)
    picks = sorted(random.Random(seed).sample(range(n), min(SAMPLE, n)))
    lengths: list[int] = []
    images: list[int] = []
    labelled: list[int] = []
    for i in picks:
        rec = records[i]
        if not isinstance(rec, dict) or "conversations" not in rec:
            continue
        paths = image_paths(rec) if with_images else []
        try:
            turns = normalise_turns(rec["conversations"], f"{path} sample #{i}")
            if not with_images:
                turns = [(r, t.replace(IMAGE_MARK, "").strip()) for r, t in turns]
            if exact:
                enc = encode_conversation(
                    turns, tokenizer, template, image_token_id, image_tokens, len(paths), None, str(i)
                )
                count, lab = len(enc["input_ids"]), int((enc["labels"] >= 0).sum())
            else:
                text, lab = _text_tokens(turns, template, tokenizer)
                count = text + len(paths) * image_tokens
        except SampleError:
            continue  # training refuses or skips it; it does not count towards the lengths
        lengths.append(count)
        images.append(len(paths))
        labelled.append(lab)
    if not lengths:
        raise ValueError(f"{path}: none of {len(picks)} drawn samples is a trainable conversation")
    ordered = sorted(lengths)

    def pct(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

    kept = [min(x, max_length) for x in lengths]  # longer samples are refused, not trained
    how = "the model's tokenizer" if exact else f"~{CHARS_PER_TOKEN:g} characters a text token"
    return SeqStats(
        source=f"data: {len(lengths)} of {n} samples of {path.name}, {how}",
        samples=n,
        mean=statistics.fmean(kept),
        mean_sq=statistics.fmean(x * x for x in kept),
        p50=pct(0.5),
        p90=pct(0.9),
        p99=pct(0.99),
        max=float(ordered[-1]),
        peak=float(min(ordered[-1], max_length)),
        images=statistics.fmean(images),
        labelled=statistics.fmean(labelled),
        over_max=sum(x > max_length for x in lengths) / len(lengths),
    )
