"""Moderation in the server: requests and replies screened by a policy classifier (safety/guard.py).

- Input: the user's text (a chat's last user message, a completion's prompt) is scored under every policy before
  anything is generated; a score at or above the threshold answers 400 with OpenAI's error shape, code
  "content_filter".
- Output: a reply's text is released only after the classifier passed it, scored as a response to the user's text.
  A stream is screened at every `window` characters: the prefixes ending at those boundaries are scored in order
  (several in turn when generation ran ahead, each in a forward of its own), text up to the last passing boundary
  is sent, and at the first failing one the generation stops with finish_reason "content_filter". So flagged text
  is never sent, and the boundaries and their scores (hence what a client receives) do not depend on timing. A
  non-streamed reply is scored whole once; a flagged one comes back empty with finish_reason "content_filter".
- POST /v1/moderations: OpenAI's moderation response (results[].flagged, categories, category_scores), one result
  per input, categories named after the policies.

Every score goes to the server log. The classifier has its own model and runs on a worker thread, one batch at a
time, so the engines keep decoding meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from ..chat_templates import content_text
from ..errors import GemmaError
from ..quant.kernels import release_threads
from ..safety.guard import Guard, GuardResult
from ..safety.policies import resolve
from . import schemas
from .events import Event, TokenLogprob
from .output import ApiError, Choice, Run

log = logging.getLogger("gemmakit.serve")
KINDS = ("input", "output")


def parse_kinds(spec: str | None) -> tuple[bool, bool]:
    """--moderate "input,output" -> (screen inputs, screen outputs)."""
    kinds = [k.strip() for k in (spec or "").split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise GemmaError(f"--moderate takes input, output or input,output; got {', '.join(bad)}")
    return "input" in kinds, "output" in kinds


def build(moderate: str | None, guard_model: str | None, policies: Sequence[str] | None, *, threshold: float,
          window: int, device: str = "auto", classifier: bool = False) -> Moderator | None:
    """The server's Moderator from its command-line options; None when neither is given."""
    inputs, outputs = parse_kinds(moderate)
    if not (inputs or outputs) and guard_model is None:
        return None
    from ..loader import load

    chosen = resolve(policies)
    if window < 1:
        raise GemmaError(f"--moderation-window must be at least 1 character, got {window}")
    guard = Guard(load(guard_model, device=device, progress=False), chosen, threshold=threshold,
                  classifier=classifier or None)
    name = Path(guard_model).name.removesuffix(".gguf") if guard_model else "gemma-3-270m"
    return Moderator(guard, inputs=inputs, outputs=outputs, window=window, name=name)


def user_text(messages: Sequence[Any]) -> str:
    """The text a chat request is screened by: its last user message."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return content_text(m.get("content"), where="the last user message")
    return ""


class Moderator:
    """A classifier with the server's settings: what to screen, and the release window for streams."""

    def __init__(self, guard: Guard, *, inputs: bool = True, outputs: bool = True, window: int = 64,
                 name: str = "guard") -> None:
        if window < 1:
            raise ValueError("the moderation window must be at least one character")
        self.guard, self.inputs, self.outputs, self.window, self.name = guard, inputs, outputs, window, name
        self._lock = threading.Lock()

    def describe(self) -> str:
        kinds = ",".join(k for k, on in zip(KINDS, (self.inputs, self.outputs), strict=True) if on) or "off"
        return (f"moderation: {kinds} (+ /v1/moderations), classifier {self.name}, policies "
                f"{', '.join(p.name for p in self.guard.policies)}, threshold {self.guard.threshold}")

    async def score(self, items: Sequence[tuple[str, str | None]], what: str, alone: bool = False
                    ) -> list[GuardResult]:
        """Scores of (prompt, response or None) pairs, computed off the event loop and logged. alone: each pair in
        a forward of its own, in order, up to the first flagged one (a stream's prefixes: those after it are never
        sent), so that its score does not depend on which others were pending at the time (a padded batch of the
        270M's prefixes takes other products than one prefix: scores moved by up to 0.013)."""

        def work() -> list[GuardResult]:
            try:
                with self._lock:
                    if not alone:
                        return self.guard.batch(items)
                    out: list[GuardResult] = []
                    for item in items:
                        out.append(self.guard.batch([item])[0])
                        if out[-1].flagged:
                            break
                    return out
            finally:
                release_threads()  # this pool thread's OpenMP workers must not make the engine's stop spinning

        results = await asyncio.to_thread(work)
        for r in results:
            scores = " ".join(f"{k}={v:.3f}" for k, v in r.scores.items())
            log.info("moderation %s: %s%s", what, scores, f" -> flagged ({', '.join(r.violations)})"
                     if r.flagged else "")
        return results

    async def check_input(self, texts: Sequence[str], param: str) -> None:
        """400 content_filter when any of the request's texts is flagged (nothing is generated then)."""
        if not self.inputs:
            return
        for r in await self.score([(t, None) for t in texts], "input"):
            if r.flagged:
                raise ApiError(400, f"The request was flagged by the server's content filter (policies: "
                                    f"{', '.join(r.violations)}; threshold {r.threshold}) and was not processed.",
                               param=param, code="content_filter")

    def screen(self, run: Run, users: Sequence[str], *, stream: bool) -> Run | ScreenedRun:
        """The run whose replies are released only once screened (users: each job's user text)."""
        return ScreenedRun(run, self, users, stream) if self.outputs else run


class ScreenedRun:
    """A Run seen through the output screen: same interface (jobs, choices, events, collect, cancel).

    A reply is screened as its reasoning (Gemma 4's thinking, which comes first) followed by its text.
    """

    def __init__(self, run: Run, moderator: Moderator, users: Sequence[str], stream: bool) -> None:
        self.run, self.moderator, self.users, self.stream = run, moderator, list(users), stream
        self.jobs, self.queue = run.jobs, run.queue
        self.choices = [Choice() for _ in run.jobs]  # what was released
        self._reasoning = [""] * len(run.jobs)  # everything generated so far, per choice
        self._text = [""] * len(run.jobs)
        self._tokens: list[list[TokenLogprob]] = [[] for _ in run.jobs]  # logprobs of the held-back text

    collect = Run.collect  # the same loop over self.events(), with the same disconnect watch on the shared queue

    def cancel(self) -> None:
        self.run.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        open_ = set(range(len(self.jobs)))
        inner = self.run.events()
        try:
            async for i, ev in inner:
                if i not in open_:
                    continue
                self._reasoning[i] += ev.reasoning
                self._text[i] += ev.text
                self._tokens[i] += ev.tokens
                self.choices[i].completion_tokens = ev.completion_tokens
                out = await self._release(i, ev.finish_reason)
                if out is not None:
                    yield i, out
                    if out.finish_reason is not None:
                        open_.discard(i)
                if not open_:
                    break
        finally:
            await inner.aclose()

    async def _release(self, i: int, finish: str | None) -> Event | None:
        """The screened event for choice i once its newest event arrived, or None while text is held back."""
        c = self.choices[i]
        full = self._reasoning[i] + self._text[i]
        released, w = len(c.reasoning) + len(c.text), self.moderator.window
        ends = list(range((released // w + 1) * w, len(full) + 1, w)) if self.stream else []
        if finish is not None and len(full) > released and (not ends or ends[-1] != len(full)):
            ends.append(len(full))
        flagged = False
        if ends:
            results = await self.moderator.score([(self.users[i], full[:e]) for e in ends], "output", alone=True)
            passed = next((k for k, r in enumerate(results) if r.flagged), len(ends))  # results stop there
            flagged = passed < len(ends)
            end = ends[passed - 1] if passed else released
        elif finish is None:
            return None
        else:
            end = released
        split = len(self._reasoning[i])
        reasoning, text = full[len(c.reasoning):min(end, split)], full[max(split, released):end]
        c.reasoning, c.text = c.reasoning + reasoning, c.text + text
        if flagged:
            self.jobs[i].cancelled = True  # the engine frees the row; nothing more of this reply is sent
            finish = c.finish_reason = "content_filter"
        elif finish is not None:
            c.finish_reason = finish
        if not (reasoning or text or finish):
            return None
        tokens, self._tokens[i] = (self._tokens[i], []) if not flagged else ([], [])
        return Event(text, tokens, finish, c.completion_tokens, reasoning=reasoning)


class ModerationRequest(schemas.Strict):
    input: str | list[str]
    model: str | None = None


def add_routes(app: FastAPI, moderator: Moderator | None, authorize: Any, parse: Any) -> None:
    """POST /v1/moderations, answered by `moderator` (404 with the fix when the server has none)."""

    @app.post("/v1/moderations")
    async def moderations(request: Request) -> dict:
        authorize(request)
        if moderator is None:
            raise ApiError(404, "This server has no content classifier; start it with --guard-model PATH "
                                "(and --moderate input,output to screen requests and replies).",
                           code="not_found")
        body = await parse(request, ModerationRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ApiError(400, "input must be a non-empty string or a list of non-empty strings", param="input")
        results = await moderator.score([(t, None) for t in texts], "moderations")
        return {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or moderator.name,
                "results": [_result(r) for r in results]}


def _result(r: GuardResult) -> dict[str, Any]:
    return {"flagged": r.flagged,
            "categories": {k: v >= r.threshold for k, v in r.scores.items()},
            "category_scores": dict(r.scores),
            "category_applied_input_types": {k: ["text"] for k in r.scores}}
