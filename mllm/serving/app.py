"""The HTTP side of `mllm serve`: FastAPI routes over a `BatchEngine`, and the chat page.

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`), `GET /v1/models`,
`GET /health` (the batcher's counters) and `GET /` (a chat page: upload an image, ask, watch the answer
stream in; one HTML file, nothing fetched from elsewhere). Every failure answers in the API's error shape,
`{"error": {"message", "type", "param", "code"}}`, so OpenAI clients raise it with its message; a bad
request never reaches the model, so it cannot stop the server from answering the next one.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mllm.model import MultimodalLM
from mllm.serving import protocol as P
from mllm.serving.engine import BatchEngine, Delta, Done, Event, Failed, Job
from mllm.serving.images import ImageLimits
from mllm.serving.prompt import build_prompt, context_length


@dataclass(frozen=True)
class ServeSettings:
    """What an operator sets (`mllm serve --...`)."""

    model_name: str
    images: ImageLimits = ImageLimits()
    max_images: int = 1
    max_body_bytes: int = 32_000_000
    default_max_tokens: int = 256
    max_batch: int = 8
    batch_window_s: float = 0.01


def chat_page() -> str:
    return resources.files("mllm.serving").joinpath("static/chat.html").read_text(encoding="utf-8")


def _error(e: P.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) past `limit` bytes: by its Content-Length before reading, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise P.ApiError(
            413, f"request body of {int(declared):,} bytes; the limit is {limit:,} (--max-body-bytes)"
        )
    chunks, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise P.ApiError(413, f"request body over the limit of {limit:,} bytes (--max-body-bytes)")
        chunks.append(part)
    return b"".join(chunks)


def create_app(model: MultimodalLM, settings: ServeSettings) -> FastAPI:
    """The server's app around `model` (already on its device, in eval mode); the batcher runs while the
    app does (FastAPI's lifespan)."""
    engine = BatchEngine(model, max_batch=settings.max_batch, window_s=settings.batch_window_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="mllm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(P.ApiError)
    async def _api_error(request: Request, exc: P.ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(P.ApiError(exc.status_code, msg, code=None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return _error(P.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(chat_page())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "context_length": context_length(model),
            **engine.stats,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [P.model_card(settings.model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        if name != settings.model_name:
            raise _unknown_model(name, settings.model_name)
        return P.model_card(name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _read_body(request, settings.max_body_bytes)
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"the request body is not valid JSON: {e}") from e
        req = P.parse_request(obj)
        if req.model != settings.model_name:
            raise _unknown_model(req.model, settings.model_name)
        stops = req.stop_sequences()

        def prepare():  # image decoding and tokenising: off the event loop
            return build_prompt(
                model,
                req,
                settings.images,
                settings.max_images,
                settings.default_max_tokens,
                engine.tokenizer_lock,
            )

        prompt = await run_in_threadpool(prepare)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is gone (shutting down): nobody is listening
                pass

        temperature = P.DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        job = Job(
            ids=prompt.ids,
            images=prompt.images,
            max_tokens=prompt.max_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=stops,
            emit=emit,
        )
        engine.submit(job)
        ident = P.new_id()
        if req.stream:
            usage_chunk = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(job, events, ident, settings.model_name, usage_chunk),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text = []
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, Delta):
                    text.append(ev.text)
                elif isinstance(ev, Done):
                    use = P.usage(ev.prompt_tokens, ev.completion_tokens)
                    return P.completion(ident, settings.model_name, "".join(text), ev.finish_reason, use)
                else:
                    raise P.ApiError(500, ev.message, type="server_error")
        finally:
            job.cancelled.set()  # a no-op once done; stops the row if the client went away mid-answer

    return app


def _unknown_model(name: str, served: str) -> P.ApiError:
    return P.ApiError(
        404,
        f"The model {name!r} does not exist on this server; it serves {served!r} (GET /v1/models)",
        code="model_not_found",
        param="model",
    )


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(
    job: Job, events: asyncio.Queue[Event], ident: str, model: str, usage_chunk: bool
) -> AsyncIterator[str]:
    """The answer as server-sent events: a role chunk, content chunks, a finish chunk, [usage], [DONE]."""
    try:
        yield _event(P.chunk(ident, model, {"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            if isinstance(ev, Delta):
                yield _event(P.chunk(ident, model, {"content": ev.text}))
            elif isinstance(ev, Done):
                yield _event(P.chunk(ident, model, {}, finish_reason=ev.finish_reason))
                if usage_chunk:
                    use = P.usage(ev.prompt_tokens, ev.completion_tokens)
                    yield _event(P.chunk(ident, model, {}, use=use, choices=False))
                break
            elif isinstance(ev, Failed):
                yield _event(P.error_body(ev.message, type="server_error"))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client left (or the answer ended): the row stops at its next step
