"""Generation: prefill, one decode step, and the generate_step() generator that chat, server, eval and bench share.

Batches are left-padded: padding gets position -1, which the attention mask hides (model.py), so every row sees
exactly its own tokens and a batched greedy run gives the same tokens as single runs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import GemmaError
from .model import Gemma, KVCache
from .quant.kernels import release_threads
from .sampling import LogitsProcessor, RowProcessors, SamplingParams, accept_tokens, first_max, make_sampler
from .tokenizer import StreamDecoder, Tokenizer


def check_prompt(ids: Sequence[int], context: int, vocab: int, *, room: int = 1) -> None:
    """Empty, too long (fewer than `room` free positions left in the context) or out-of-vocabulary ids get one
    clear error. Generation needs room for a token (room=1); scoring a sequence may fill the context (room=0)."""
    if len(ids) == 0:
        raise GemmaError("the prompt is empty; give at least one token of text")
    if len(ids) > context - room:
        raise GemmaError(f"the prompt has {len(ids)} tokens but the model's context is {context}; "
                         "shorten the prompt (or trim the conversation history)")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise GemmaError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")


def stop_ids(config: Any, tokenizer: Tokenizer | None) -> set[int]:
    """The ids that end a generation: <eos>, the end of a turn (<end_of_turn>, Gemma 4's <turn|>), and Gemma 4's
    <|tool_response>, where a reply that called tools waits for their answers (Gemma 4's generation_config lists
    eos_token_id [1, 106, 50]; found by the tokenizer, so tiny test vocabularies keep their own ids)."""
    ids = {config.eos_token_id, config.end_of_turn_id}
    response = tokenizer.token_id("<|tool_response>") if tokenizer is not None else None
    return ids if response is None else ids | {response}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """ids (B, T) and positions (B, T) with -1 on padding."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    pos = torch.full((len(prompts), width), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        pos[b, width - len(p):] = torch.arange(len(p))
    return ids.to(device), pos.to(device)


class _LiveRows:
    """Each row's LogitsProcessors while the row runs: a row is over (its processors no longer called) once a
    stop token was chosen for it (the LogitsProcessor contract)."""

    def __init__(self, processors: RowProcessors | None, prompts: Sequence[Sequence[int]],
                 stop_ids: Collection[int]) -> None:
        if processors is not None and len(processors) != len(prompts):
            raise GemmaError(f"got {len(processors)} lists of logits processors for {len(prompts)} prompts")
        self.rows: list[list[LogitsProcessor]] | None = None
        if processors and any(processors):
            self.rows = [list(p) for p in processors]
            for procs, prompt in zip(self.rows, prompts, strict=True):
                for p in procs:
                    p.begin(prompt)
        self.stop_ids = stop_ids

    def accept(self, tokens: Sequence[int]) -> None:
        if self.rows is None:
            return
        accept_tokens(self.rows, tokens)
        for b, t in enumerate(tokens):
            if t in self.stop_ids:
                self.rows[b] = []


@torch.inference_mode()
def generate_step(model: Gemma, prompts: Sequence[Sequence[int]], params: SamplingParams, max_new_tokens: int,
                  *, processors: RowProcessors | None = None, stop_ids: Collection[int] = ()) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), up to max_new_tokens times; the caller stops early when done.

    One prefill of the (left-padded) prompts computes logits only at the last position; each later step feeds
    the sampled tokens back through the KV cache. `processors` holds each row's LogitsProcessors (see their
    contract in sampling.py); a row's processors stop being called once it yields one of `stop_ids`.
    """
    device = model.device
    ids, pos = left_pad(prompts, model.config.pad_token_id, device)
    cache = KVCache(model.config, len(prompts), ids.shape[1] + max_new_tokens, dtype=model.dtype,
                    device=device)
    sample = make_sampler(params, device)
    live = _LiveRows(processors, prompts, stop_ids)
    seen = None
    if params.repetition_penalty not in (None, 1.0):
        seen = torch.zeros(len(prompts), model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, True)
    logits = model(ids, pos, cache, last_only=True)[:, -1]
    next_pos = pos[:, -1:] + 1
    for step in range(max_new_tokens):
        token = sample(logits, seen, live.rows)
        live.accept(token.tolist())
        yield token
        if step + 1 == max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(len(prompts)), token] = True
        logits = model(token[:, None], next_pos, cache)[:, -1]
        next_pos = next_pos + 1


class NgramIndex:
    """Where each recent 1..3-gram last occurred, for prompt-lookup drafting (HF's prompt_lookup_num_tokens idea):
    the tokens that followed the latest earlier occurrence of the current suffix are proposed as the draft."""

    def __init__(self, ids: Sequence[int], max_n: int = 3) -> None:
        self.ids: list[int] = []
        self.max_n = max_n
        self.last: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its latest occurrence
        for t in ids:
            self.append(t)

    def append(self, token: int) -> None:
        # Record the n-grams that end just before this token: their continuation is now known.
        for n in range(1, self.max_n + 1):
            if len(self.ids) >= n:
                self.last[tuple(self.ids[-n:])] = len(self.ids)
        self.ids.append(token)

    def draft(self, k: int) -> list[int]:
        for n in range(min(self.max_n, len(self.ids)), 0, -1):
            at = self.last.get(tuple(self.ids[-n:]))
            if at is not None:
                return self.ids[at:at + k]
        return []


def _verify(logits: Tensor, draft: Sequence[int], processors: Sequence[LogitsProcessor]) -> tuple[int, int]:
    """(drafts accepted, the model's next token) from the verification logits (len(draft) + 1, V), greedy.

    With processors, position j is processed (and its token accepted) only once the drafts before it were
    kept, so a processor sees exactly the calls that single greedy steps would make (LogitsProcessor contract).
    """
    if not processors:
        preds = first_max(logits).tolist()
        accepted = 0
        while accepted < len(draft) and preds[accepted] == draft[accepted]:
            accepted += 1
        return accepted, preds[accepted]
    greedy = make_sampler(SamplingParams())
    for j in range(len(draft) + 1):
        token = int(greedy(logits[j : j + 1], None, [processors])[0])
        for p in processors:
            p.accept(token)
        if j == len(draft) or token != draft[j]:
            return j, token
    raise AssertionError("unreachable")


@torch.inference_mode()
def lookup_step(model: Gemma, prompt: Sequence[int], max_new_tokens: int, k: int, *,
                processors: Sequence[LogitsProcessor] = (), stop_ids: Collection[int] = ()) -> Iterator[Tensor]:
    """Greedy decoding with prompt-lookup speculation: draft up to k tokens from n-gram matches in the text so far,
    verify them in one forward, keep the longest agreeing prefix plus the model's own next token.

    Yields the same tokens as greedy generate_step, one at a time. Pays off when the output copies spans of the
    input (summaries, edits, code changes): each accepted draft token saves a full pass over the weights.
    With `processors` (e.g. a grammar), drafts are first cut to the prefix every processor allows
    (valid_prefix) and each position is verified against the processed logits, in order. Drafts end before
    any of `stop_ids`: nothing is verified past the end of the sequence.
    """
    device = model.device
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens + k + 1, dtype=model.dtype, device=device,
                    slack=k + 1)
    index = NgramIndex(prompt)
    for p in processors:
        p.begin(prompt)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache, last_only=True)[0, -1]
    _, token = _verify(logits[None], [], processors)
    produced = 0
    k_now = min(k, 4)  # draft length adapts to acceptance: +2 after a fully accepted draft, -1 otherwise
    while True:
        yield torch.tensor([token])
        produced += 1
        if produced == max_new_tokens:
            return
        index.append(token)
        draft = index.draft(min(k_now, max_new_tokens - produced - 1))
        draft = draft[: next((i for i, t in enumerate(draft) if t in stop_ids), len(draft))]
        for p in processors:
            draft = draft[: p.valid_prefix(draft)]
        start = len(index.ids) - 1  # position of `token`, not yet in the cache
        inp = torch.tensor([[token, *draft]], device=device)
        pos = torch.arange(start, start + inp.shape[1], device=device)[None]
        accepted, nxt = _verify(model(inp, pos, cache)[0], draft, processors)
        cache.rollback(0, start + 1 + accepted)  # keep `token` and the accepted drafts
        if draft:
            k_now = min(k, k_now + 2) if accepted == len(draft) else max(1, k_now - 1)
        for t in draft[:accepted]:
            yield torch.tensor([t])
            produced += 1
            index.append(t)
        token = nxt


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens, without the prompt and without a final EOS / end-of-turn
    finish_reason: str  # "stop" (EOS, end of turn or a stop string) or "length" (max_new_tokens or the context)
    prompt_tokens: int = 0
    parsed: Any = None  # with a json_schema: the JSON value (the validated object for a pydantic class)
    speculation: list[Any] | None = None  # with draft=: each round's drafted ids and accepted count (speculative.Round)


@dataclass
class TextRow:
    """One sequence's text state: incremental detokenizing, stop strings, and what may already be streamed."""

    decoder: StreamDecoder
    stop: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def push(self, token: int, stop_ids: set[int]) -> str:
        if token in stop_ids:
            self.finish_reason = "stop"
            return self._release(final=True)
        self.ids.append(token)
        self.text += self.decoder.push(token)
        return self._release(final=False)

    def finish(self, reason: str) -> str:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        """Text safe to emit: cut at a stop string; hold back a tail that may still become one."""
        for s in self.stop:
            i = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0:
                self.text, self.finish_reason, final = self.text[:i], "stop", True
        end = len(self.text)
        if not final:
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out


class Generation:
    """A batch being generated: iterate for per-step (new text, finish reason or None) per row; then results().

    Validates everything up front, so bad input fails before any compute.
    """

    def __init__(self, model: Gemma, tokenizer: Tokenizer | None, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int, params: SamplingParams, stop: Sequence[str] = (),
                 ignore_eos: bool = False, lookup: int = 0, processors: RowProcessors | None = None,
                 parse: Callable[[str], Any] | None = None, draft: Any = None, draft_tokens: int = 8) -> None:
        cfg = model.config
        if not prompts:
            raise GemmaError("no prompts given")
        for p in prompts:
            check_prompt(p, cfg.max_position_embeddings, cfg.vocab_size)
        if max_new_tokens < 1:
            raise GemmaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if tokenizer is None:
            raise GemmaError("this model was loaded without a tokenizer; put tokenizer.model next to the weights")
        if processors is not None and len(processors) != len(prompts):
            raise GemmaError(f"got {len(processors)} lists of logits processors for {len(prompts)} prompts")
        self.model, self.prompts, self.params, self.processors = model, prompts, params, processors
        self.parse = parse  # fills GenerationResult.parsed of the rows that ended with "stop"
        # Generation also ends at the context length, reported as "length".
        self.budget = min(max_new_tokens, cfg.max_position_embeddings - max(len(p) for p in prompts))
        self.stop_ids = set() if ignore_eos else stop_ids(cfg, tokenizer)
        self.rows = [TextRow(StreamDecoder(tokenizer), tuple(s for s in stop if s)) for _ in prompts]
        self.texts = [""] * len(prompts)
        self._started = False
        # Speculation only where it cannot change the result: greedy, one sequence, no penalty.
        self.lookup = lookup if (lookup > 0 and params.greedy and len(prompts) == 1
                                 and params.repetition_penalty in (None, 1.0)) else 0
        if draft is not None and lookup:
            raise GemmaError("lookup= (prompt lookup) and draft= (an assistant drafter) are two ways to speculate; "
                             "pass one of them")
        if draft is not None and draft_tokens < 1:
            raise GemmaError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.draft = draft
        self.draft_tokens = draft_tokens
        self.rounds: list[list[Any]] = [[] for _ in prompts]

    def __iter__(self) -> Iterator[list[tuple[str, str | None]]]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        if self.draft is not None:
            from .speculative import speculative_step

            steps = speculative_step(self.model, self.draft, self.prompts, self.params, self.budget,
                                     self.draft_tokens, stop_ids=self.stop_ids, rounds=self.rounds,
                                     processors=self.processors)
        elif self.lookup:
            procs = self.processors[0] if self.processors else ()
            steps = lookup_step(self.model, self.prompts[0], self.budget, self.lookup, processors=procs,
                                stop_ids=self.stop_ids)
        else:
            steps = generate_step(self.model, self.prompts, self.params, self.budget, processors=self.processors,
                                  stop_ids=self.stop_ids)
        try:
            for step, tokens in enumerate(steps):
                out: list[tuple[str, str | None]] = []
                for i, (row, t) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
                    if row.finish_reason is not None:
                        out.append(("", None))
                        continue
                    piece = row.push(t, self.stop_ids)
                    if row.finish_reason is None and step + 1 == self.budget:
                        piece += row.finish("length")
                    elif row.finish_reason is not None:
                        piece += row.finish(row.finish_reason)
                    self.texts[i] += piece
                    out.append((piece, row.finish_reason))
                yield out
                if all(r.finish_reason is not None for r in self.rows):
                    break
        finally:
            steps.close()
            # Every thread that ran OpenMP keeps a pool, and libgomp stops spinning once it manages more threads
            # than CPUs: generations on a web UI's worker threads would slow each other down (-35% on 2 cores).
            release_threads()

    def results(self) -> list[GenerationResult]:
        if not self._started:
            for _ in self:
                pass
        out = [GenerationResult(self.texts[i], row.ids, row.finish_reason or "length", len(p),
                                speculation=self.rounds[i] if self.draft is not None else None)
               for i, (row, p) in enumerate(zip(self.rows, self.prompts, strict=True))]
        if self.parse is not None:
            for r in out:
                r.parsed = self.parse(r.text) if r.finish_reason == "stop" else None
        return out
