"""A request once accepted: its jobs in the engine (Run), its errors (ApiError), and its OpenAI-shaped output:
usage, Server-Sent Events chunks and logprobs. app.py turns HTTP into Runs; this module turns Runs into bytes."""

from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import __version__
from ..errors import GemmaError
from . import schemas, structured
from .engine import Engine
from .events import Event, Job, Mailbox, QueueFull, TokenLogprob

FINGERPRINT = f"gemmakit-{__version__}"
RETRY_AFTER_S = 1
DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Choice:
    text: str = ""
    reasoning: str = ""  # Gemma 4's thinking, returned as reasoning_content
    tokens: list[TokenLogprob] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # every generated token (Gemma 4's calls are read from them)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Meta:
    id: str
    created: int
    model: str
    prompt_tokens: int


class LoopMailbox(Mailbox):
    """Every event of an engine step for one event loop in one call_soon_threadsafe: the loop wakes once per step,
    not once per row (its sinks then run on the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def post(self, items: list[tuple[Job, Event]]) -> None:
        self.loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Job, Event]]) -> None:
    for job, event in items:
        job.sink(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = weakref.WeakKeyDictionary()


def loop_mailbox(loop: asyncio.AbstractEventLoop) -> LoopMailbox:
    """The one mailbox of `loop`, shared by all its requests."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = LoopMailbox(loop)
    return box


class Run:
    """A request's jobs in the engine, their events delivered to this event loop; cancel() frees their rows."""

    def __init__(self, engine: Engine, jobs: list[Job]) -> None:
        mailbox = loop_mailbox(asyncio.get_running_loop())
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs = jobs
        self.choices = [Choice() for _ in jobs]
        for i, job in enumerate(jobs):
            job.sink = lambda ev, i=i: self.queue.put_nowait((i, ev))
            job.mailbox = mailbox
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise ApiError(
                429,
                f"The server is busy ({e}); retry in a moment.",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except GemmaError as e:
            raise ApiError(400, str(e)) from None

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        left = len(self.jobs)
        while left:
            i, ev = await self.queue.get()
            if i < 0:
                raise ApiError(499, "the client closed the connection")
            c = self.choices[i]
            c.text += ev.text
            c.reasoning += ev.reasoning
            c.tokens += ev.tokens
            c.ids += ev.ids
            c.completion_tokens = ev.completion_tokens
            if ev.error is not None:
                raise ApiError(500, ev.error, type="server_error")
            if ev.finish_reason is not None:
                c.finish_reason = ev.finish_reason
                left -= 1
            yield i, ev

    async def collect(self, request: Request) -> list[Choice]:
        """Wait for every choice; if the client disconnects meanwhile, stop generating."""

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            self.queue.put_nowait((-1, Event("", [], None, 0)))

        watcher = asyncio.create_task(watch())
        try:
            async for _ in self.events():
                pass
            return self.choices
        finally:
            watcher.cancel()
            self.cancel()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True


def usage(prompt_tokens: int, choices: Sequence[Choice]) -> dict:
    completion = sum(c.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_response(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _chunker(run: Run, meta: Meta, opts: schemas.StreamOptions, obj: str, key: str
             ) -> tuple[dict, Callable[..., str]]:
    """The fields every chunk of this stream shares, and a function making one choice's chunk."""
    base = {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model,
            "system_fingerprint": FINGERPRINT}

    def chunk(index: int, value: Any, logprobs: Any = None, finish: str | None = None) -> str:
        out = {**base, "choices": [{"index": index, key: value, "logprobs": logprobs, "finish_reason": finish}]}
        if opts.include_usage:
            out["usage"] = usage(meta.prompt_tokens, run.choices) if opts.continuous_usage_stats else None
        return sse(out)

    return base, chunk


async def _stream(run: Run, meta: Meta, opts: schemas.StreamOptions, base: dict, opening: Iterable[str],
                  pieces: Callable[[int, Event], Iterable[str]]) -> AsyncIterator[str]:
    """Opening chunks, the chunks of every event, the usage chunk when asked for (stream_options.include_usage),
    then [DONE]; an error mid-stream is sent as an error event. The run is cancelled however the stream ends."""
    try:
        for c in opening:
            yield c
        try:
            async for i, ev in run.events():
                for c in pieces(i, ev):
                    yield c
        except ApiError as e:
            yield sse(e.body())
            yield DONE
            return
        if opts.include_usage:
            yield sse({**base, "choices": [], "usage": usage(meta.prompt_tokens, run.choices)})
        yield DONE
    finally:
        run.cancel()


def stream_chat(run: Run, body: schemas.ChatRequest, meta: Meta, engine: Engine, plan: structured.ChatPlan
                ) -> AsyncIterator[str]:
    """OpenAI's chunk sequence per choice: the role, reasoning/content/tool_calls deltas as they are generated
    (structured.py reads the calls), an empty delta with the finish reason."""
    opts = body.stream_options or schemas.StreamOptions()
    base, chunk = _chunker(run, meta, opts, "chat.completion.chunk", "delta")
    readers = [structured.reader(plan, engine.model.tokenizer) for _ in run.jobs]

    def pieces(i: int, ev: Event) -> Iterable[str]:
        lp = chat_logprobs(engine, ev.tokens) if body.logprobs and ev.tokens else None
        deltas, reason = structured.deltas(readers[i], ev.text, ev.reasoning, ev.ids, ev.finish_reason, plan.mode)
        for k, delta in enumerate(deltas):
            yield chunk(i, structured.openai_delta(delta), lp if k == 0 else None)
        if lp is not None and not deltas:
            yield chunk(i, {"content": ""}, lp)
        if reason is not None:
            yield chunk(i, {}, None, reason)

    opening = (chunk(i, {"role": "assistant", "content": ""}) for i in range(len(run.jobs)))
    return _stream(run, meta, opts, base, opening, pieces)


def stream_completion(run: Run, body: schemas.CompletionRequest, meta: Meta, engine: Engine, echo: list[str]
                      ) -> AsyncIterator[str]:
    """Legacy completions chunks: text pieces per choice, the finish reason on a last (empty) piece."""
    opts = body.stream_options or schemas.StreamOptions()
    base, chunk = _chunker(run, meta, opts, "text_completion", "text")
    offsets = [len(e) for e in echo]

    def pieces(i: int, ev: Event) -> Iterable[str]:
        if ev.text or ev.tokens:
            lp = completion_logprobs(engine, ev.tokens, offsets[i]) if body.logprobs is not None else None
            offsets[i] += len(ev.text)
            yield chunk(i, ev.text, lp)
        if ev.finish_reason is not None:
            yield chunk(i, "", None, ev.finish_reason)

    opening = (chunk(i, e) for i, e in enumerate(echo) if e)
    return _stream(run, meta, opts, base, opening, pieces)


def token_text(engine: Engine, token: int) -> tuple[str, list[int]]:
    """A token as OpenAI shows it: its text and its UTF-8 bytes (a lone byte of a character as "bytes:\\xNN")."""
    tok = engine.model.tokenizer
    if token >= tok.vocab_size:
        return f"<{token}>", []
    if tok.is_byte(token):
        value = int(tok.piece(token)[3:5], 16)
        return (chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"), [value]
    text = tok.piece(token).replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def chat_logprobs(engine: Engine, tokens: Sequence[TokenLogprob]) -> dict:
    content = []
    for t in tokens:
        text, raw = token_text(engine, t.id)
        top = []
        for i, lp in t.top:
            ttext, traw = token_text(engine, i)
            top.append({"token": ttext, "logprob": lp, "bytes": traw})
        content.append({"token": text, "logprob": t.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(engine: Engine, tokens: Sequence[TokenLogprob], offset: int) -> dict:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = token_text(engine, t.id)[0]
        top = {token_text(engine, i)[0]: lp for i, lp in t.top}
        top.setdefault(text, t.logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
