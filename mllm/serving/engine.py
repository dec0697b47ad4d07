"""One worker thread that owns the model and answers requests in batches, streaming every row's text.

Requests that arrive together are answered together: the worker takes the first request waiting, then
whatever else arrives within `window_s` (up to `max_batch`), left-pads their prompts and runs one
`generate` over them (the LM's KV cache, as `mllm chat` and `mllm eval` use it). Requests that arrive
while a batch runs wait for the next one (static batching: simple, and on a CPU the batch is what
pays).

Each row ends on its own: a per-row stopping criterion (`RowTracker`) sees every new token, feeds the
row's text streamer, and marks the row done at a stop token, a stop string, its own `max_tokens`, or
when its client has gone; the batch runs until every row is done. A row's text is decoded by
transformers' `TextStreamer` logic, the streamer `mllm chat` prints from, so the text a client gets is
the text `mllm chat` prints. Greedy rows are exact argmax (the batch samples only when some row asks
for a temperature, and then a greedy row's distribution is one-hot on its argmax).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
)

from mllm.data.conversations import left_pad
from mllm.inference import stop_ids
from mllm.model import MultimodalLM


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" (a stop token or string) | "length" (max_tokens) | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Done | Failed


@dataclass
class Job:
    """One request as the worker sees it. `emit` is called from the worker thread, in order."""

    ids: torch.Tensor
    images: list[Image.Image]
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Pieces(TextStreamer):
    """transformers' `TextStreamer` (what `TextIteratorStreamer`, and so `mllm chat`, decodes with) for one
    row, handing each finished piece of text to `sink` instead of printing it."""

    def __init__(self, tokenizer, sink: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.sink = sink

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.sink(text)


def held_back(text: str, start: int, stops: Sequence[str]) -> int:
    """How many characters at the end of `text[start:]` could begin a stop string, and must wait."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


class _Row:
    def __init__(self, job: Job, tokenizer) -> None:
        self.job = job
        self.text = ""
        self.sent = 0
        self.tokens = 0
        self.done = False
        self.stopped = False  # a stop string was found: the text ends before it
        self.streamer = _Pieces(tokenizer, self._piece)

    def _piece(self, text: str) -> None:
        if not self.stopped:
            self.text += text
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stops = self.job.stop
        if stops and not self.stopped:
            found = [i for s in stops if (i := self.text.find(s, self.sent)) >= 0]
            if found:
                self.text, self.stopped = self.text[: min(found)], True
        end = len(self.text)
        if stops and not (final or self.stopped):
            end -= held_back(self.text, self.sent, stops)
        if end > self.sent:
            self.job.emit(Delta(self.text[self.sent : end]))
            self.sent = end

    def step(self, token: int, stop_tokens: set[int]) -> None:
        if self.job.cancelled.is_set():
            self.close("cancelled")
            return
        self.tokens += 1
        self.streamer.put(torch.tensor([token]))
        if token in stop_tokens or self.stopped:
            self.close("stop")
        elif self.tokens >= self.job.max_tokens:
            self.close("length")

    def close(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        if reason != "cancelled":
            self.streamer.end()  # flushes what the streamer held back (a word not yet ended)
            self._flush(final=True)
        reason = "stop" if self.stopped else reason
        self.job.emit(Done(reason, len(self.job.ids), self.tokens))


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping, called by `generate` once a step with every row's newest token."""

    def __init__(self, rows: list[_Row], stop_tokens: Sequence[int], lock: threading.Lock) -> None:
        self.rows, self.stop_tokens, self.lock = rows, set(stop_tokens), lock

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        with self.lock:  # the tokenizer is shared with the request threads
            for row, token in zip(self.rows, last):
                if not row.done:
                    row.step(int(token), self.stop_tokens)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


class RowSampling(LogitsProcessor):
    """Each row's own temperature and top-p; a row at temperature 0 keeps only its argmax."""

    def __init__(self, temperatures: Sequence[float], top_ps: Sequence[float]) -> None:
        self.temperatures, self.top_ps = list(temperatures), list(top_ps)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        for i, (t, p) in enumerate(zip(self.temperatures, self.top_ps)):
            row = scores[i]
            if t == 0:
                out[i, row.argmax()] = 0.0
                continue
            row = row / t
            if p < 1.0:
                sorted_logits, order = row.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) >= p  # keep the smallest head whose mass reaches p
                row = row.scatter(0, order[drop], float("-inf"))
            out[i] = row
        return out


class BatchEngine:
    """The model's one worker: `submit` jobs from any thread; events come back through each job's `emit`."""

    def __init__(self, model: MultimodalLM, max_batch: int = 8, window_s: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.tokenizer_lock = threading.Lock()
        self.stop_tokens = stop_ids(model)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mllm-serve-batcher", daemon=True)

    def start(self) -> BatchEngine:
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the batching worker is not running")
        self._queue.put(job)

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        batch, closing = [first], False
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:  # what is already waiting, then what arrives within the window
                job = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if job is None:
                closing = True
                break
            batch.append(job)
        return batch, closing

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, closing = self._collect(first)
            batch = [j for j in batch if not j.cancelled.is_set()]
            if batch:
                self.run_batch(batch)
            if closing:
                return

    @torch.no_grad()
    def run_batch(self, jobs: list[Job]) -> None:
        """Answer `jobs` together (the worker's step; callable directly in tests)."""
        model = self.model
        self.stats["requests"] += len(jobs)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        rows = [_Row(j, model.tokenizer) for j in jobs]
        try:
            dev = next(model.parameters()).device
            ids, mask = left_pad([j.ids for j in jobs], model.tokenizer.pad_token_id)
            pix = [model.preprocess([im]) for j in jobs for im in j.images]  # per image, as ChatSession does
            pixel_values = torch.cat(pix).to(dev) if pix else None
            extra: dict = {
                "stopping_criteria": StoppingCriteriaList(
                    [RowTracker(rows, self.stop_tokens, self.tokenizer_lock)]
                )
            }
            sample = any(j.temperature > 0 for j in jobs)
            if sample:
                extra["logits_processor"] = LogitsProcessorList(
                    [RowSampling([j.temperature for j in jobs], [j.top_p for j in jobs])]
                )
                extra["top_k"] = 0  # the rows' own processor does all the shaping
            model.generate(
                ids.to(dev),
                pixel_values,
                mask.to(dev),
                max_new_tokens=max(j.max_tokens for j in jobs),
                do_sample=sample,
                stop_token_ids=self.stop_tokens,
                **extra,
            )
            with self.tokenizer_lock:
                for row in rows:
                    row.close("length")  # rows still open when the batch ended ran out of tokens
        except Exception as e:  # noqa: BLE001 - every waiting client hears of it; the worker goes on
            for row in rows:
                if not row.done:
                    row.done = True
                    row.job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
