"""The engine's decode step with an assistant drafter: every row drafts up to k tokens and one forward verifies them
all (speculative.py, row by row): greedy rows keep the drafts the arg-max agrees with, sampling rows follow the
speculative-sampling rule with their own temperature, top-k/top-p and generator, so each row's output keeps its
target distribution. A row with penalties, a logit bias or processors (grammars, tools, watermarks) is verified
position by position with the penalties of the drafts before it and processors that have accepted them
(speculative.verify_row), so it too gets exactly what plain steps would give it.

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
from ..sampling import RowRules
from ..speculative import DraftLength, DraftPicker, verify_row


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
def decode_step(engine: Any, live: list[tuple[int, Any]], length: DraftLength
                ) -> tuple[Tensor, dict[int, tuple[list[int], int, int]]]:
    """One round for rows 0..hi-1: -> (logits (hi, k+1, V), {row: (drafts, kept, next token)} of the rows that
    drafted (all, unless k is 0).

    The caller emits each drafting row's kept drafts and next token, every other row's one token from logits[r, 0];
    a row's processors have already accept()ed its kept drafts (not its next token)."""
    module, cache, device = engine.model.module, engine.cache, engine.model.device
    hi = live[-1][0] + 1
    limits = [seq.job.max_new_tokens - seq.generated - 1 for r, seq in live]
    limits += [engine.context - engine.draft_state[r].column - 1 for r, _ in live]
    k = max(min(length.next(), *limits), 0)
    act = [r for r, _ in live] if k else []
    tokens = torch.zeros(hi, k + 1, dtype=torch.long, device=device)
    pos = torch.full((hi, k + 1), -1, dtype=torch.long, device=device)
    for r, seq in live:
        tokens[r, 0], pos[r, 0] = seq.last, seq.position
    if act:
        states = [engine.draft_state[r] for r in act]
        positions = torch.tensor([engine.rows[r].position for r in act], device=device)
        kv = target_kv(module.config, cache, act, positions, torch.tensor([s.sliding for s in states], device=device))
        picker = DraftPicker([row_rules(engine.rows[r]) for r in act])
        drafts, _ = propose(engine.draft, module, tokens[act, 0], torch.stack([s.hidden for s in states]),
                            positions, kv, k, picker)
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
            stops = () if seq.job.ignore_eos else engine.stop_ids
            kept, nxt = verify_row(logits[r], draft, picker.rules[i], picker.q[i], stops)
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


def row_rules(seq: Any, drafting: bool = True) -> RowRules:
    """The engine row's bias, penalties and processors (serve/engine._Seq), and when drafting a sampling row's own
    generator for drafts and acceptance, seeded from its request's seed."""
    job = seq.job
    if drafting and seq.draft_gen is None and not job.params.greedy:
        seq.draft_gen = torch.Generator()
        seed = job.params.seed
        seq.draft_gen.manual_seed(seed) if seed is not None else seq.draft_gen.seed()
    return RowRules(job.params, job.processors, seq.seen, seq.counts, job.frequency_penalty, job.presence_penalty,
                    seq.bias, seq.draft_gen)
