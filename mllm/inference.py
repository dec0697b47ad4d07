"""Generation for people and for evaluators: one chat session, and batched greedy answers.

Prompts are built by `mllm.chat.encode_conversation` with the model's own template, the same code
that built the training ids, so a model is asked in exactly the format it learned.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from mllm.chat import encode_conversation, get_template, with_image
from mllm.data.conversations import left_pad
from mllm.data.images import load_image
from mllm.evaluation.agla import AglaConfig, agla_generate
from mllm.model import MultimodalLM
from mllm.readout import look_at


def prompt_ids(model: MultimodalLM, turns: list[tuple[str, str]], num_images: int) -> torch.Tensor:
    enc = encode_conversation(
        turns,
        model.tokenizer,
        model.meta.template,
        model.image_token_id,
        model.num_image_tokens,
        num_images,
        max_length=None,
        sample="prompt",
        for_generation=True,
        look_token=model.meta.look_token,
        look_at=look_at(model.meta.readout),
    )
    return enc["input_ids"]


def stop_ids(model: MultimodalLM) -> list[int]:
    return get_template(model.meta.template).stop_tokens(model.tokenizer)


@torch.no_grad()
def answer_batch(
    model: MultimodalLM,
    questions: Sequence[str],
    images: Sequence[Image.Image | None],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    decoding: str = "greedy",
    agla: AglaConfig | None = None,
) -> list[str]:
    """Deterministic single-turn answers; a `None` image asks the question without one.

    A question that mentions no `<image>` gets one where the model was trained to see it
    (`meta.image_placement`; LLaVA's evaluation prompt `<image>\\n{q}` for "before").
    `decoding`: "greedy" (the LM's KV-cached generate) or "agla" (`mllm.evaluation.agla`; every
    question needs an image).
    """
    if decoding not in ("greedy", "agla"):
        raise ValueError(f"decoding must be 'greedy' or 'agla', got {decoding!r}")
    if decoding == "agla" and any(im is None for im in images):
        raise ValueError("AGLA decoding needs an image for every question")
    out: list[str] = []
    for s in range(0, len(questions), batch_size):
        qs, ims = questions[s : s + batch_size], images[s : s + batch_size]
        seqs, pix = [], []
        for q, im in zip(qs, ims):
            text = q if (im is None or "<image>" in q) else with_image(q, model.meta.image_placement)
            seqs.append(prompt_ids(model, [("user", text)], 0 if im is None else 1))
            if im is not None:
                pix.append(model.preprocess([im]))
        ids, mask = left_pad(seqs, model.tokenizer.pad_token_id)
        dev = next(model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        pixel_values = torch.cat(pix).to(dev) if pix else None
        if decoding == "agla":
            new = agla_generate(
                model, ids, pixel_values, mask, agla or AglaConfig(), max_new_tokens, stop_ids(model)
            )
        else:
            new = model.generate(
                ids, pixel_values, mask, max_new_tokens=max_new_tokens, stop_token_ids=stop_ids(model)
            )
        out.extend(model.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True))
    return [o.strip() for o in out]


@dataclass
class ChatSession:
    """A multi-turn conversation about (at most) one image at a time; `/image` starts a new one."""

    model: MultimodalLM
    max_new_tokens: int = 128
    image: Image.Image | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)

    def set_image(self, path: str | Path) -> None:
        self.image = load_image(path)
        self.turns = []

    def reset(self) -> None:
        self.turns = []

    def ask(self, text: str) -> Iterator[str]:
        """Stream the reply piece by piece; the full reply joins the history when done."""
        if "<image>" in text:
            raise ValueError("type your question without '<image>': the image is attached for you")
        first = not self.turns
        user = (
            with_image(text, self.model.meta.image_placement) if (first and self.image is not None) else text
        )
        turns = [*self.turns, ("user", user)]
        n_img = 1 if self.image is not None else 0
        ids = prompt_ids(self.model, turns, n_img).unsqueeze(0)
        pix = self.model.preprocess([self.image]) if self.image is not None else None
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=False, skip_special_tokens=True)
        err: list[BaseException] = []

        def work() -> None:
            try:
                self.model.generate(
                    ids,
                    pix,
                    None,
                    max_new_tokens=self.max_new_tokens,
                    stop_token_ids=stop_ids(self.model),
                    streamer=streamer,
                )
            except BaseException as e:  # noqa: BLE001 - surfaced to the caller below
                err.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        if err:
            raise err[0]
        self.turns = [*turns, ("assistant", "".join(pieces).strip())]
