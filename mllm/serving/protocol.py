"""The OpenAI chat completions API as this server speaks it: the request it accepts, the bodies it sends
back, and the one error shape every failure takes.

Clients written against OpenAI's API send fields this server has no use for (`logprobs`, `user`,
`seed`, ...): they are accepted and ignored, as an unknown field must not break a working client. A
field this server cannot honour with the meaning the API gives it (`n` > 1, a `tools` call) is refused
with a message rather than silently answered differently.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The API's default when a request names no temperature: sampling at 1.0, as OpenAI's own endpoint does.
DEFAULT_TEMPERATURE = 1.0
MAX_STOP_SEQUENCES = 4  # as the API documents


class ApiError(Exception):
    """A request that cannot be served, as the API reports it: an HTTP status and `{"error": {...}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; the `openai` client raises it as `BadRequestError`, `NotFoundError`, ..."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted, ignored: the tower sees one fixed resolution


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """`POST /v1/chat/completions`'s body; unknown fields are kept and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(
                400, f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop"
            )
        if any(not s for s in stops):
            raise ApiError(400, "stop: an empty stop sequence would end every answer at once", param="stop")
        return tuple(stops)


def parse_request(obj: Any) -> ChatRequest:
    """A decoded JSON body as a `ChatRequest`, or a 400 naming the first field that is wrong."""
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        req = ChatRequest.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ApiError(400, f"{loc or 'body'}: {first.get('msg', 'invalid')}{more}", param=loc or None) from e
    if req.n not in (None, 1):
        raise ApiError(400, "n: this server returns one choice per request (n=1)", param="n")
    for name in ("tools", "functions", "tool_choice", "response_format"):
        if obj.get(name) not in (None, [], {"type": "text"}, "none"):
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    return req


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(ident: str, model: str, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
    """A non-streamed answer (`object: chat.completion`)."""
    return {
        "id": ident,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": use,
    }


def chunk(
    ident: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    use: dict[str, int] | None = None,
    choices: bool = True,
) -> dict[str, Any]:
    """One server-sent event of a streamed answer (`object: chat.completion.chunk`); with `choices=False`,
    the closing usage chunk that `stream_options.include_usage` asks for."""
    out: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        if choices
        else [],
    }
    if use is not None:
        out["usage"] = use
    return out


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mllm"}
