"""The engine's decode step with an assistant drafter: every row without penalties, a logit bias or processors
drafts up to k tokens and one forward verifies them all (speculative.py, row by row): greedy rows keep the drafts
the arg-max agrees with, sampling rows follow the speculative-sampling rule with their own temperature, top-k/top-p
and generator, so each row's output keeps its target distribution. Rows with penalties, a bias or processors
(grammars, tools) ride in the same forward with their one token, the draft slots padded at position -1 (masked
out, rolled back).

Per row the engine keeps what the drafter needs next: the target's hidden state that predicted the row's last
token, the sliding-layer key span it may read, and the cache column of that token (columns past it hold the last
round's rejected drafts, which the next draft reads, as transformers' does, before they are rolled back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..draft import propose, sliding_window_span, target_kv
from ..sampling import process_logits
from ..speculative import DraftLength, _accept_greedy, _accept_sampled


@dataclass
class RowDraftState:
    hidden: Tensor  # (D,)
    sliding: tuple[int, int]
    column: int


def prefill_state(engine: Any, r: int, hidden: Tensor, length: int) -> None:
    """After a prefill of `length` tokens into row r whose last hidden state is `hidden`."""
    W = engine.model.config.sliding_window or 0
    engine.draft_state[r] = RowDraftState(hidden, sliding_window_span(W, 0, length - 1, length, True), length)


@torch.inference_mode()
def decode_step(engine: Any, live: list[tuple[int, Any]], drafting: set[int], length: DraftLength
                ) -> tuple[Tensor, dict[int, tuple[list[int], int, int]]]:
    """One round for rows 0..hi-1: -> (logits (hi, k+1, V), {row: (drafts, kept, next token)} of the drafting rows).

    The caller emits each drafting row's kept drafts and next token, and every other row's one token from
    logits[r, 0]."""
    module, cache, device = engine.model.module, engine.cache, engine.model.device
    hi = live[-1][0] + 1
    limits = [seq.job.max_new_tokens - seq.generated - 1 for r, seq in live if r in drafting]
    limits += [engine.context - engine.draft_state[r].column - 1 for r, _ in live]
    k = min(length.next(), *limits) if drafting else 0
    k = max(k, 0)
    act = [r for r, _ in live if r in drafting] if k else []
    tokens = torch.zeros(hi, k + 1, dtype=torch.long, device=device)
    pos = torch.full((hi, k + 1), -1, dtype=torch.long, device=device)
    for r, seq in live:
        tokens[r, 0], pos[r, 0] = seq.last, seq.position
    if act:
        states = [engine.draft_state[r] for r in act]
        positions = torch.tensor([engine.rows[r].position for r in act], device=device)
        kv = target_kv(module.config, cache, act, positions, torch.tensor([s.sliding for s in states], device=device))
        seqs = [engine.rows[r] for r in act]
        drafts, draft_logits = propose(engine.draft, module, tokens[act, 0], torch.stack([s.hidden for s in states]),
                                       positions, kv, k, lambda logits: _pick(seqs, logits))
        tokens[act, 1:] = drafts
        pos[act] = positions[:, None] + torch.arange(k + 1, device=device)
    for r, _ in live:
        cache.rollback(r, engine.draft_state[r].column)  # the last round's rejected drafts, now read
    hidden = module.hidden_states(tokens, pos, cache, rows=list(range(hi)))
    logits = module.head(hidden)
    out: dict[int, tuple[list[int], int, int]] = {}
    kept_total = 0
    W = module.config.sliding_window or 0
    for r, seq in live:
        state = engine.draft_state[r]
        kept = 0
        if r in act:
            i = act.index(r)
            draft = tokens[r, 1:].tolist()
            if seq.job.params.greedy:
                kept, nxt = _accept_greedy(logits[r], draft)
            else:
                q = torch.cat([_probs(seq, dl[i : i + 1]) for dl in draft_logits])
                kept, nxt = _accept_sampled(_probs(seq, logits[r]), q, draft, _generator(seq))
            kept_total += kept
            out[r] = (draft, kept, nxt)
        state.sliding = sliding_window_span(W, seq.position, seq.position + (k if r in act else 0),
                                            seq.position + kept + 1, False)
        state.hidden, state.column = hidden[r, kept], state.column + kept + 1
    for r in range(hi):
        if engine.rows[r] is None:
            cache.reset(r)
    if act:
        length.update(k * len(act), kept_total)
        engine.draft_stats[0] += k * len(act)
        engine.draft_stats[1] += kept_total
    return logits, out


def _probs(seq: Any, logits: Tensor) -> Tensor:
    """The row's sampling distribution (temperature, top-k, top-p, min-p) over (n, V) logits."""
    return process_logits(logits.float(), seq.job.params).softmax(-1)


def _generator(seq: Any) -> torch.Generator:
    """The row's own generator for drafting and acceptance, seeded from its request's seed."""
    if seq.draft_gen is None:
        seq.draft_gen = torch.Generator()
        seed = seq.job.params.seed
        seq.draft_gen.manual_seed(seed) if seed is not None else seq.draft_gen.seed()
    return seq.draft_gen


def _pick(seqs: list[Any], logits: Tensor) -> Tensor:
    """The drafter's choice per row: the arg-max for greedy rows, a sample of the row's distribution otherwise."""
    out = logits.argmax(-1)
    for i, seq in enumerate(seqs):
        if not seq.job.params.greedy:
            out[i] = torch.multinomial(_probs(seq, logits[i : i + 1]), 1, generator=_generator(seq))[0, 0]
    return out
