"""Conversation templates, `<image>` placeholder expansion and label masks.

Labels come from the template, not from arithmetic on a rendered string: each turn is tokenised on
its own and the pieces are concatenated, so the ids the model trains on and the mask over them are
built together. The classic "tokenisation mismatch" (a prompt length computed one way and the ids
produced another, silently masking a whole sample) cannot happen; the inference prompt is built by
the same function, so training and chat see identical ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from encoders.registry import Registry

IGNORE_INDEX = -100
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


# Where a question's `<image>` marker goes, by name. "before" is LLaVA's `<image>\n{q}`. "after" puts the
# question first, so in a causal LM every image position can already read the question (as an
# instruction-aware resampler would). Measured on GeoWorld (docs/results.md, "Second round"): neither
# order learned faster, in the binding probe or in the pipeline; it is an option, not a default.
IMAGE_PLACEMENTS: Registry[Callable[[str, str], str]] = Registry("image placement")
IMAGE_PLACEMENTS.register("before", lambda text, images: f"{images}\n{text}")
IMAGE_PLACEMENTS.register("after", lambda text, images: f"{text}\n{images}")


def check_image_placement(placement: str) -> str:
    """`placement` if it names an IMAGE_PLACEMENTS entry, else a ValueError listing the known ones."""
    IMAGE_PLACEMENTS[placement]
    return placement


def with_image(text: str, placement: str = "before", n: int = 1, marker: str = "<image>") -> str:
    """`text` with `n` image markers placed as `placement` says (a key of IMAGE_PLACEMENTS)."""
    place = IMAGE_PLACEMENTS[check_image_placement(placement)]
    return place(text, "\n".join([marker] * n)) if n else text


class SampleError(ValueError):
    """A sample that cannot be used, with where it came from (file and sample id) in the message."""


@dataclass(frozen=True)
class Segment:
    text: str
    target: bool  # True: the model is trained to produce it (labels kept)


@dataclass
class Template:
    """How a conversation becomes text segments, and what ends an assistant reply at inference."""

    name: str
    render: Callable[[list[tuple[str, str]], PreTrainedTokenizerBase, bool], list[Segment]]
    stop_tokens: Callable[[PreTrainedTokenizerBase], list[int]]


TEMPLATES: Registry[Template] = Registry("chat template")


def register_template(t: Template) -> Template:
    """Add a conversation template under its name."""
    return TEMPLATES.register(t.name, t, stacklevel=2)


def get_template(name: str) -> Template:
    return TEMPLATES[name]


def _eos(tok: PreTrainedTokenizerBase) -> str:
    return tok.eos_token or ""


def _render_plain(turns: list[tuple[str, str]], tok: PreTrainedTokenizerBase, gen: bool) -> list[Segment]:
    """LLaVA's alignment format: the image, then the caption. The human's words are dropped."""
    segs: list[Segment] = []
    for role, text in turns:
        if role == "user":
            n = text.count("<image>")
            segs.append(Segment("<image>" * n + "\n", False))
        elif role == "assistant":
            segs.append(Segment(text + _eos(tok), True))
    return segs


def _render_chatml(turns: list[tuple[str, str]], tok: PreTrainedTokenizerBase, gen: bool) -> list[Segment]:
    segs: list[Segment] = []
    for role, text in turns:
        if role == "assistant":
            segs.append(Segment("<|im_start|>assistant\n", False))
            segs.append(Segment(text + "<|im_end|>", True))
            segs.append(Segment("\n", False))
        else:
            segs.append(Segment(f"<|im_start|>{role}\n{text}<|im_end|>\n", False))
    if gen:
        segs.append(Segment("<|im_start|>assistant\n", False))
    return segs


VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def _render_vicuna(turns: list[tuple[str, str]], tok: PreTrainedTokenizerBase, gen: bool) -> list[Segment]:
    """LLaVA-1.5's `vicuna_v1` conversation: `SYSTEM USER: q ASSISTANT: a</s>USER: ...`."""
    system = next((t for r, t in turns if r == "system"), VICUNA_SYSTEM)
    segs = [Segment(system + " ", False)]
    for role, text in turns:
        if role == "user":
            segs.append(Segment(f"USER: {text} ASSISTANT:", False))
        elif role == "assistant":
            segs.append(Segment(f" {text}{_eos(tok)}", True))
    if gen and (not turns or turns[-1][0] != "user"):
        raise ValueError("a generation prompt needs a final user turn")
    return segs


def _render_tokenizer(turns: list[tuple[str, str]], tok: PreTrainedTokenizerBase, gen: bool) -> list[Segment]:
    """The tokenizer's own chat template, split into turns by rendering growing prefixes.

    The rendered text of conversation[:k+1] must extend that of conversation[:k]; the difference is
    turn k (a target when it is the assistant's). A template that rewrites earlier turns breaks
    this and is refused rather than guessed at.
    """
    if not getattr(tok, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
    msgs = [{"role": r, "content": t} for r, t in turns]
    segs: list[Segment] = []
    prev = ""
    for k in range(len(msgs)):
        is_asst = msgs[k]["role"] == "assistant"
        if is_asst:
            head = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
            if not head.startswith(prev):
                raise ValueError("the tokenizer's chat template is not prefix-stable; use another template")
            segs.append(Segment(head[len(prev) :], False))
            prev = head
        cur = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
        if not cur.startswith(prev):
            raise ValueError("the tokenizer's chat template is not prefix-stable; use another template")
        segs.append(Segment(cur[len(prev) :], is_asst))
        prev = cur
    if gen:
        full = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        segs.append(Segment(full[len(prev) :], False))
    return [s for s in segs if s.text]


def _stop_eos(tok: PreTrainedTokenizerBase) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def _stop_chatml(tok: PreTrainedTokenizerBase) -> list[int]:
    ids = _stop_eos(tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    if end is not None and end != tok.unk_token_id:
        ids.append(end)
    return ids


register_template(Template("plain", _render_plain, _stop_eos))
register_template(Template("chatml", _render_chatml, _stop_chatml))
register_template(Template("vicuna_v1", _render_vicuna, _stop_eos))
register_template(Template("tokenizer", _render_tokenizer, _stop_chatml))


def normalise_turns(conversations: Sequence[dict], sample: str) -> list[tuple[str, str]]:
    """LLaVA `{"from", "value"}` (or `{"role", "content"}`) turns -> (role, text); errors name the sample."""
    turns: list[tuple[str, str]] = []
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise SampleError(f"{sample}: 'conversations' must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise SampleError(f"{sample}: turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise SampleError(
                f"{sample}: turn {i} has unknown role {role!r} (expected human/gpt/user/assistant/system)"
            )
        if not isinstance(text, str):
            raise SampleError(f"{sample}: turn {i} has no text 'value'")
        turns.append((ROLE_ALIASES[role], text))
    return turns


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself starts a text with BOS (Llama's does, ours and Qwen's do not):
    the templates then do the same, so ids match what the LM saw in pretraining."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


_IMAGE_RE = re.compile(re.escape("<image>"))


def encode_conversation(
    conversations: Sequence[dict] | list[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    image_token_id: int,
    num_image_tokens: int,
    num_images: int,
    max_length: int | None = None,
    sample: str = "sample",
    for_generation: bool = False,
    look_token: str | None = None,
    look_at: str = "question",
) -> dict[str, torch.Tensor]:
    """Token ids and labels for one conversation, with each `<image>` expanded to the tower's count.

    `look_token` (a model with a readout, `meta.look_token`): where the readout writes what the image
    says about each question of a conversation with an image. `look_at` (the readout's `at`,
    mllm.readout.look_at): "question" appends it to every user turn; "answer" puts it as the first
    token of every reply (and last of a generation prompt), so the position that predicts the answer's
    first word is the look itself. Never a label. The plain template drops the questions, so it has no
    looks at the answers.

    Returns `input_ids` and `labels` (IGNORE_INDEX outside assistant turns), 1-D long tensors.
    Raises SampleError (naming `sample`) for: no assistant turn (when training), a count of
    `<image>` markers different from the number of images, or a sequence longer than `max_length`.
    """
    if conversations and isinstance(conversations[0], tuple):
        turns = list(conversations)  # type: ignore[arg-type]
    else:
        turns = normalise_turns(conversations, sample)  # type: ignore[arg-type]
    if not for_generation and not any(r == "assistant" for r, _ in turns):
        raise SampleError(f"{sample}: no assistant turn, nothing to learn from")
    markers = sum(len(_IMAGE_RE.findall(t)) for _, t in turns)
    if markers != num_images:
        raise SampleError(f"{sample}: {markers} <image> marker(s) in the text but {num_images} image(s)")
    look_id = None
    if look_token and num_images:
        if any(look_token in t for _, t in turns):
            raise SampleError(f"{sample}: the text already holds the look token {look_token!r}")
        if look_at == "question":
            turns = [(r, t + look_token if r == "user" else t) for r, t in turns]
        elif look_at != "answer":
            raise ValueError(f"look_at must be 'question' or 'answer', got {look_at!r}")
        elif template != "plain":
            look_id = tokenizer.convert_tokens_to_ids(look_token)
    segs = get_template(template).render(turns, tokenizer, for_generation)
    ids: list[int] = []
    labels: list[int] = []
    if template != "tokenizer" and adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    # one call for every segment: the tokenizer's per-call overhead, not the tokenising, was most of
    # a live training sample's cost (bench/loader_memo.py)
    pieces = tokenizer([seg.text for seg in segs], add_special_tokens=False)["input_ids"] if segs else []
    for seg, piece in zip(segs, pieces):
        if look_id is not None and seg.target:  # the reply is predicted from the look (never a label)
            ids.append(look_id)
            labels.append(IGNORE_INDEX)
        expanded: list[int] = []
        for t in piece:
            if t == image_token_id:
                expanded.extend([image_token_id] * num_image_tokens)
            else:
                expanded.append(t)
        ids.extend(expanded)
        labels.extend(expanded if seg.target else [IGNORE_INDEX] * len(expanded))
    if look_id is not None and for_generation:
        ids.append(look_id)
        labels.append(IGNORE_INDEX)
    found = sum(1 for t in ids if t == image_token_id)
    if found != num_images * num_image_tokens:
        raise SampleError(
            f"{sample}: expected {num_images * num_image_tokens} image positions, the template produced {found}"
        )
    if max_length is not None and len(ids) > max_length:
        raise SampleError(
            f"{sample}: {len(ids)} tokens exceed max_length={max_length} (not truncated: fix the data or raise max_length)"
        )
    if not for_generation and all(v == IGNORE_INDEX for v in labels):
        raise SampleError(f"{sample}: every label is masked")
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
