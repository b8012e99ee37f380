"""Continuous batching: one thread owns a model and its KV cache and runs every request's sequences together.

Each cache row holds one sequence. Between two decode steps, waiting sequences are prefilled into free rows:
those admitted together share forwards, left-padded as in generate (padding at position -1, which attention masks
out), grouped by length so padding costs less than the forwards it saves. Then one forward decodes every row at its
own position. Free rows ride along with a dummy token at position -1; they are reset after each step so they hold
nothing. A finished or cancelled sequence frees its row at once, so a new request joins the running batch without
waiting for the others to end. Every request has its own sampling parameters; the step's tokens are chosen
together (serve/choose.py: one arg-max, one draw for the unseeded rows), and a seeded request gives the same text
as `Model.generate` with that seed. A step's events are handed off together: one call per receiving event loop
(Job.mailbox), not one per row.

One sequence's failure is its own: an exception while a sequence starts (its sampler, processors, prefill) or
while its token is chosen, its processors advanced or its text decoded ends that sequence alone, with an error
event, and its neighbours carry on. Only a failure of the shared forward pass fails every running sequence.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..api import Model
from ..chat_templates import reasoning_splitter
from ..chat_templates.reasoning import ReasoningSplitter
from ..draft import check_pair
from ..errors import GemmaError
from ..generate import TextRow, check_prompt, left_pad, stop_ids
from ..model import KVCache
from ..quant.kernels import release_threads
from ..sampling import Sampler, make_sampler
from ..speculative import DraftLength
from ..tokenizer import StreamDecoder
from .choose import choose
from .drafting import decode_step, prefill_state
from .events import Event, Job, Mailbox, QueueFull, TokenLogprob

log = logging.getLogger("gemmakit.serve")
PAD_COST = 32  # a prefill forward's fixed cost in prompt tokens (~35 ms of a 270M forward on 2 cores)
MAX_PREFILL = 2048  # tokens (padding included) of one batched prefill, beyond which sequences prefill alone
# An idle engine lets a burst of requests arrive before its first prefill (_gather): it starts once no request has
# come for GATHER_GAP_S, or GATHER_MAX_S after it woke. 8 clients starting at once reach it over 10-20 ms, with
# gaps of up to 6 ms through the openai client (each request parsed on the event loop in turn). Prefilled as they
# came (4, a batch-4 step, then 4) they took 243 ms to their first batch-8 step, 140 ms as one group (270M, 2 cores).
# A lone request's first token waits GATHER_GAP_S more.
GATHER_GAP_S = 0.008
GATHER_MAX_S = 0.04


@dataclass
class _Seq:
    """A job placed in a cache row."""

    job: Job
    row: TextRow
    sample: Sampler
    seen: Tensor | None  # (1, V) bool for the repetition penalty
    counts: Tensor | None  # (1, V) generated-token counts for frequency/presence penalties
    bias: tuple[Tensor, Tensor] | None  # (ids, values) of the logit bias
    splitter: ReasoningSplitter | None = None
    last: int = 0
    position: int = 0
    generated: int = 0
    draft_gen: torch.Generator | None = None  # a sampling row's generator for drafting (serve/drafting.py)


class Engine:
    """Owns `model` on a background thread; `submit()` jobs from any thread, results arrive through their sinks."""

    def __init__(
        self, model: Model, *, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
        draft: Any = None, draft_tokens: int = 8,
    ) -> None:
        if model.tokenizer is None:
            raise GemmaError(
                f"{model.source}: serving needs a tokenizer; put tokenizer.model next to the weights"
            )
        if max_batch < 1 or max_queue < 1:
            raise GemmaError("max_batch and max_queue must be >= 1")
        cfg = model.config
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.vocab_size = cfg.vocab_size
        # An assistant drafter (serve/drafting.py): every row drafts, one forward verifies them all.
        self.draft, self.draft_state = draft, {}
        self.draft_stats = [0, 0]  # draft tokens proposed, accepted
        if draft is not None:
            check_pair(draft, cfg)
            self.draft_length = DraftLength(draft_tokens)
        self.cache = KVCache(cfg, max_batch, self.context, dtype=model.dtype, device=model.device,
                             slack=draft_tokens + 1 if draft is not None else 0)
        self.rows: list[_Seq | None] = [None] * max_batch
        self.waiting: deque[Job] = deque()
        self.stop_ids = stop_ids(cfg, model.tokenizer)
        self.generator = torch.Generator(device=model.device)  # the unseeded rows' draws (serve/choose.py)
        self.generator.seed()
        self._outbox: list[tuple[Job, Event]] = []  # the events of this step, handed off by _flush
        self.tokens_generated = 0
        self.requests_done = 0
        self.peak_batch = 0  # most sequences decoded by one forward so far: evidence of batching
        self._holey = 0  # decode steps in a row whose span held free rows (_pack)
        self._cond = threading.Condition()
        self._last_submit = 0.0  # time.monotonic() of the last submit (_gather)
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"gemmakit-engine-{model.source}", daemon=True
        )

    # ---- public, any thread -------------------------------------------------------------------------

    def start(self) -> None:
        # The engine thread does all the computing from here: the starting thread (which loaded the model) hands
        # back its OpenMP workers, so libgomp keeps spinning between the engine's regions instead of sleeping.
        release_threads()
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs together (all or none); QueueFull when more than max_queue would be waiting, GemmaError when
        they could never all wait at once. A job of 0 new tokens finishes at once ("length"), never queued."""
        for job in jobs:
            check_prompt(job.prompt, self.context, self.vocab_size)
            if job.max_new_tokens < 0:
                raise GemmaError(f"max_new_tokens must be >= 0, got {job.max_new_tokens}")
            if len(job.prompt) + job.max_new_tokens > self.context:
                raise GemmaError(
                    f"the prompt ({len(job.prompt)} tokens) plus max_new_tokens "
                    f"({job.max_new_tokens}) exceed the context of {self.context} tokens"
                )
        run = [job for job in jobs if job.max_new_tokens > 0]
        if len(run) > self.max_queue:  # a 429 would be retried forever: this can never fit
            raise GemmaError(f"this request needs {len(run)} sequences (prompts x n) but the server queues at most "
                             f"{self.max_queue}; send fewer prompts or choices per request, or start the server "
                             "with a larger --max-queue")
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(run) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting (limit {self.max_queue})")
            self.waiting.extend(run)
            self._last_submit = time.monotonic()
            self._cond.notify()
        for job in jobs:
            if job.max_new_tokens == 0:
                _send(job, Event("", [], "length", 0))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # ---- the engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and self.active == 0:
                    self._cond.wait()
                if self._stopping:
                    break
                if self.active == 0:
                    self._gather()
                admitted = []
                for r in range(self.max_batch):
                    if self.rows[r] is None and self.waiting:
                        admitted.append((r, self.waiting.popleft()))
            if admitted:
                self._start(admitted)
                self._flush()  # first tokens out before the next step
            try:
                for r, seq in enumerate(self.rows):
                    if seq is not None and seq.job.cancelled:
                        self._release(r)
                if self.active:
                    self._decode()
            except Exception as e:  # the shared forward failed: every running sequence is lost, the server carries on
                log.exception("engine step failed")
                self._fail_all(f"internal error while generating: {type(e).__name__}")
            self._flush()
        self._fail_all("the server is shutting down")
        self._flush()
        with self._cond:
            for job in self.waiting:
                _send(job, Event("", [], None, 0, error="the server is shutting down"))
            self.waiting.clear()

    def _gather(self) -> None:
        """Idle, with jobs waiting: wait (the wait releases the lock) while requests keep arriving, so that a burst shares one
        prefill and its rows decode in step from the first token (see GATHER_GAP_S). A lone request waits
        GATHER_GAP_S; an engine already decoding never waits, its rows would stall."""
        end = time.monotonic() + GATHER_MAX_S
        while not self._stopping and len(self.waiting) < self.max_batch:
            now = time.monotonic()
            quiet = self._last_submit + GATHER_GAP_S - now
            if quiet <= 0 or now >= end:
                return
            self._cond.wait(min(quiet, end - now))

    def _start(self, admitted: list[tuple[int, Job]]) -> None:
        """Prefill the admitted jobs into their rows, in batched groups, and emit each one's first token."""
        ready = []
        for r, job in admitted:
            if job.cancelled:
                continue
            try:
                self.cache.reset(r)
                ready.append((r, self._new_seq(job)))
            except Exception as e:
                self._fail_one(r, job, e)
        work = self._groups(ready)
        while work:
            group = work.pop(0)
            try:
                logits = self._prefill(group)
            except Exception as e:
                for r, _ in group:
                    self.cache.clear(r)
                if len(group) == 1:
                    self._fail_one(group[0][0], group[0][1].job, e)
                    continue
                log.warning("a batched prefill failed (%s: %s); prefilling its sequences one by one",
                            type(e).__name__, e)
                work[:0] = [[item] for item in group]  # so only the sequence at fault fails
                continue
            for r, seq in group:
                seq.position = len(seq.job.prompt)
                self.rows[r] = seq
            self._emit_step(group, logits)

    def _groups(self, ready: list[tuple[int, _Seq]]) -> list[list[tuple[int, _Seq]]]:
        """Sequences to prefill together: by prompt length, a longer one joins while the padding it adds costs
        less than a forward of its own, every member still fits the context padded, and the group stays within
        MAX_PREFILL tokens. With a drafter each prefills alone (its per-row state counts unpadded columns)."""
        if self.draft is not None:
            return [[item] for item in ready]
        groups: list[list[tuple[int, _Seq]]] = []
        for item in sorted(ready, key=lambda item: len(item[1].job.prompt)):
            n = len(item[1].job.prompt)
            g = groups[-1] if groups else None
            if g is not None:
                width = len(g[-1][1].job.prompt)  # the group's longest so far
                fits = all(n + s.job.max_new_tokens <= self.context for _, s in [*g, item])
                if (fits and (len(g) + 1) * n <= min(len(g) * width + n + PAD_COST, max(MAX_PREFILL, n))):
                    g.append(item)
                    continue
            groups.append([item])
        return groups

    @torch.inference_mode()
    def _prefill(self, group: list[tuple[int, _Seq]]) -> Tensor:
        """One forward over the group's left-padded prompts -> each row's next-token logits (n, V)."""
        module, device = self.model.module, self.model.device
        rows = [r for r, _ in group]
        ids, pos = left_pad([s.job.prompt for _, s in group], self.model.config.pad_token_id, device)
        if self.draft is not None:  # one row (_groups)
            h = module.hidden_states(ids, pos, self.cache, rows=rows)[:, -1]
            prefill_state(self, rows[0], h[0], len(group[0][1].job.prompt))
            return module.head(h)
        return module(ids, pos, self.cache, rows=rows, last_only=True)[:, -1]

    @torch.inference_mode()
    def _decode(self) -> None:
        device = self.model.device
        live = [(r, s) for r, s in enumerate(self.rows) if s is not None]
        if self.draft is not None:
            self._decode_drafted(live)
            return
        # Decode rows 0..hi-1 only (a view of the cache, no copy): new requests take the lowest free rows, so one
        # client decodes at batch 1, not at max_batch; rows freed below the highest live one are packed (_pack).
        self._holey = self._holey + 1 if live[-1][0] + 1 > len(live) else 0
        if self._holey > 1:
            live = self._pack(live)
        hi = live[-1][0] + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long)
        pos = torch.full((hi, 1), -1, dtype=torch.long)
        for r, seq in live:
            tokens[r, 0], pos[r, 0] = seq.last, seq.position
        self.peak_batch = max(self.peak_batch, len(live))
        rows = list(range(hi))
        logits = self.model.module(tokens.to(device), pos.to(device), self.cache, rows=rows)[:, -1]  # (hi, V)
        for r in rows:
            if self.rows[r] is None:
                self.cache.reset(r)  # drop the dummy column: free rows stay empty
        for _, seq in live:
            seq.position += 1
        self._emit_step(live, logits[[r for r, _ in live]] if len(live) < hi else logits)

    def _pack(self, live: list[tuple[int, _Seq]]) -> list[tuple[int, _Seq]]:
        """Move the highest live rows into the free rows below them, so that the step spans len(live) rows. Only
        once the free rows have outlasted a step (a client's next request usually fills them sooner): a move
        copies the row's cache columns once (a few ms), a free row inside the span costs its share of every
        step."""
        n = len(live)
        holes = [r for r in range(n) if self.rows[r] is None]
        for dst, (src, seq) in zip(holes, [item for item in reversed(live) if item[0] >= n], strict=True):
            self.cache.move(src, dst)
            self.rows[dst], self.rows[src] = seq, None
        self._holey = 0
        return [(r, s) for r, s in enumerate(self.rows) if s is not None]

    def _emit_step(self, live: list[tuple[int, _Seq]], logits: Tensor) -> None:
        """Choose every row's token from its logits (len(live), V) together (serve/choose.py), then emit each;
        a row whose choice or emission fails ends alone."""
        tokens = choose([seq for _, seq in live], logits, self.generator)
        for i, ((r, seq), token) in enumerate(zip(live, tokens, strict=True)):
            try:
                if isinstance(token, Exception):
                    raise token
                self._emit(r, seq, logits[i : i + 1], token)
            except Exception as e:
                self._fail_one(r, seq.job, e)

    def _decode_drafted(self, live: list[tuple[int, _Seq]]) -> None:
        """One draft + verify round (serve/drafting.py); each row emits its kept drafts, then its next token."""
        self.peak_batch = max(self.peak_batch, len(live))
        logits, rounds = decode_step(self, live, self.draft_length)
        for r, seq in live:
            draft, kept, nxt = rounds.get(r, ([], 0, None))
            try:
                for j in range(kept + 1):
                    if self.rows[r] is not seq:  # finished (a stop token, its length) inside the kept drafts
                        break
                    seq.position += 1
                    token = draft[j] if j < kept else nxt
                    self._emit(r, seq, logits[r, j : j + 1], token, accepted=j < kept)
            except Exception as e:
                self._fail_one(r, seq.job, e)

    def _new_seq(self, job: Job) -> _Seq:
        device, V = self.model.device, self.vocab_size
        p = job.params
        sample = make_sampler(p, device)
        seen = None
        if p.repetition_penalty not in (None, 1.0):
            seen = torch.zeros(1, V, dtype=torch.bool, device=device)
            seen[0, torch.tensor(job.prompt, device=device)] = True
        counts = None
        if job.frequency_penalty or job.presence_penalty:
            counts = torch.zeros(1, V, device=device)
        bias = None
        if job.logit_bias:
            ids = torch.tensor(list(job.logit_bias), device=device)
            bias = (ids, torch.tensor(list(job.logit_bias.values()), device=device))
        for proc in job.processors:
            proc.begin(job.prompt)
        row = TextRow(StreamDecoder(self.model.tokenizer), tuple(s for s in job.stop if s))
        splitter = reasoning_splitter(self.model.tokenizer) if job.split_reasoning else None
        return _Seq(job, row, sample, seen, counts, bias, splitter)

    def _emit(self, r: int, seq: _Seq, logits: Tensor, token: int | None = None, accepted: bool = False) -> None:
        """Sample this row's next token from its logits (1, V) unless `token` was chosen already, stream the text,
        finish if it is over. `accepted`: the row's processors have accept()ed the token already (a kept draft)."""
        job = seq.job
        if token is None:
            token = choose([seq], logits, self.generator)[0]
            if isinstance(token, Exception):
                raise token
        info = []
        if job.logprobs is not None and token not in self.stop_ids:
            lp = torch.log_softmax(logits.float(), dim=-1)[
                0
            ]  # the model's distribution, before any processing
            top = torch.topk(lp, job.logprobs) if job.logprobs else None
            tops = (
                list(zip(top.indices.tolist(), top.values.tolist(), strict=False)) if top is not None else []
            )
            info.append(TokenLogprob(token, float(lp[token]), tops))
        seq.generated += 1
        self.tokens_generated += 1
        if seq.seen is not None:
            seq.seen[0, token] = True
        if seq.counts is not None:
            seq.counts[0, token] += 1
        for proc in () if accepted else job.processors:
            proc.accept(token)
        stops = set() if job.ignore_eos else self.stop_ids
        text = seq.row.push(token, stops)
        if seq.splitter is not None:
            seq.splitter.observe(token, len(seq.row.text))
        if seq.row.finish_reason is None and (
            seq.generated >= job.max_new_tokens or seq.position >= self.context
        ):
            text += seq.row.finish("length")
        elif seq.row.finish_reason is not None:
            text += seq.row.finish(seq.row.finish_reason)
        seq.last = token
        reasoning = ""
        if seq.splitter is not None:
            reasoning, text = seq.splitter.split(text)
            if seq.row.finish_reason is not None:
                reasoning += seq.splitter.finish()
        self._outbox.append((job, Event(text, info, seq.row.finish_reason, seq.generated, reasoning=reasoning,
                                        ids=[token])))
        if seq.row.finish_reason is not None:
            self._release(r)
            self.requests_done += 1

    def _flush(self) -> None:
        """Hand off the events of this step: one post per mailbox, each other job's sink called."""
        out, self._outbox = self._outbox, []
        boxes: dict[int, tuple[Mailbox, list[tuple[Job, Event]]]] = {}
        for job, event in out:
            if job.mailbox is None:
                _send(job, event)
            else:
                boxes.setdefault(id(job.mailbox), (job.mailbox, []))[1].append((job, event))
        for box, items in boxes.values():
            try:
                box.post(items)
            except Exception:  # the receiver is gone (its event loop closed): nobody waits for these jobs any more
                for job, _ in items:
                    job.cancelled = True

    def _release(self, r: int) -> None:
        self.rows[r] = None
        self.cache.reset(r)

    def _fail_one(self, r: int, job: Job, error: Exception) -> None:
        """End one sequence that failed while starting or emitting: an error event to its job, its row freed."""
        log.error("sequence in row %d failed: %s: %s", r, type(error).__name__, error, exc_info=error)
        seq = self.rows[r]
        generated = seq.generated if seq is not None and seq.job is job else 0
        error_event = Event("", [], None, generated, error=f"internal error while generating: {type(error).__name__}")
        self._outbox.append((job, error_event))
        self._release(r)

    def _fail_all(self, message: str) -> None:
        for r, seq in enumerate(self.rows):
            if seq is not None:
                self._outbox.append((seq.job, Event("", [], None, seq.generated, error=message)))
                self.rows[r] = None
        for r in range(self.max_batch):
            self.cache.clear(r)  # the failed forward may have stored keys past the rows' lengths


def _send(job: Job, event: Event) -> None:
    try:
        if job.mailbox is not None:
            job.mailbox.post([(job, event)])
        else:
            job.sink(event)
    except Exception:  # the receiver is gone (its event loop closed): nobody is waiting for this job any more
        job.cancelled = True


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Block until the engine has no running or waiting sequence (for tests and shutdown)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.active == 0 and engine.queued == 0:
            return True
        time.sleep(0.01)
    return False
