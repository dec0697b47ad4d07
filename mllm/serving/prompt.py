"""Chat messages to the prompt ids and images a MultimodalLM answers, built as `mllm chat` builds them.

The ids come from `mllm.inference.prompt_ids`, the function `ChatSession` and the evaluators use, over
the model's own template; an image part puts an `<image>` marker in its message where the model was
trained to see it (`meta.image_placement`), as `ChatSession` does for its first question. So the same
image and question asked here and in `mllm chat` are the same ids, and greedy decoding gives the same
answer.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image

from mllm.chat import SampleError, with_image
from mllm.inference import prompt_ids
from mllm.model import MultimodalLM
from mllm.serving.images import ImageLimits, load_image_url
from mllm.serving.protocol import ApiError, ChatRequest, ImagePart, Message

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Prompt:
    ids: torch.Tensor  # 1-D prompt ids, image markers expanded
    images: list[Image.Image]  # in the order of their markers
    max_tokens: int  # the answer's budget: asked for (or the server's default), within the context


def context_length(model: MultimodalLM) -> int:
    """Positions the LM can attend over: its config's `max_position_embeddings` (else the recipe's
    `max_length`, which is what the model was trained on)."""
    n = getattr(model.lm.config, "max_position_embeddings", None)
    return int(n) if n else int(model.meta.max_length)


def message_turn(
    msg: Message, k: int, placement: str, limits: ImageLimits
) -> tuple[str, str, list[Image.Image]]:
    """(role, text with its image markers, images) of message `k`."""
    where = f"messages.{k}"
    if isinstance(msg.content, str) or msg.content is None:
        texts, images = [msg.content or ""], []
    else:
        texts, images = [], []
        for j, part in enumerate(msg.content):
            if isinstance(part, ImagePart):
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append(load_image_url(url, limits, f"{where}.content.{j}.image_url"))
            else:
                texts.append(part.text)
    text = "\n".join(t for t in texts if t)
    if "<image>" in text:
        raise ApiError(
            400,
            f"{where}: write the text without '<image>': send the image as an image_url part and it is placed for you",
            param=f"{where}.content",
        )
    role = ROLES[msg.role]
    if images and role != "user":
        raise ApiError(400, f"{where}: images go in user messages, not {msg.role}", param=where)
    return role, with_image(text, placement, n=len(images)) if images else text, images


def build_prompt(
    model: MultimodalLM,
    req: ChatRequest,
    limits: ImageLimits,
    max_images: int,
    default_max_tokens: int,
    tokenizer_lock: threading.Lock | None = None,
) -> Prompt:
    """The request's prompt; an `ApiError` (400) for anything the model cannot be asked. The tokenizer is
    used under `tokenizer_lock` (the batching worker decodes with it meanwhile); images decode outside it."""
    if req.messages[-1].role != "user":
        raise ApiError(
            400, "messages: the last message must be the user's (the model answers it)", param="messages"
        )
    turns: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    for k, msg in enumerate(req.messages):
        role, text, ims = message_turn(msg, k, model.meta.image_placement, limits)
        turns.append((role, text))
        images.extend(ims)
        if len(images) > max_images:
            raise ApiError(
                400,
                f"messages: {len(images)} images; this server takes at most {max_images} per conversation "
                "(mllm serve --max-images)",
                param="messages",
            )
    try:
        with tokenizer_lock or nullcontext():
            ids = prompt_ids(model, turns, len(images))
    except SampleError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from e
    context = context_length(model)
    if len(ids) >= context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, your messages resulted in "
            f"{len(ids)} tokens ({len(images) * model.num_image_tokens} of them image positions). "
            "Please reduce the length of the messages.",
            code="context_length_exceeded",
            param="messages",
        )
    asked = req.max_completion_tokens or req.max_tokens or default_max_tokens
    return Prompt(ids=ids, images=images, max_tokens=min(asked, context - len(ids)))
