"""Speculative decoding with an assistant drafter: the drafter proposes k tokens per row, the target verifies k+1
positions in one forward (the same multi-token forward prompt lookup uses), and every row keeps what the target
agrees with.

Greedy: a draft token is kept while it equals the target's arg-max, so the output is exactly plain greedy's.
Sampling: the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023; transformers
`_speculative_sampling`): keep draft x with probability min(1, p(x)/q(x)), on the first rejection sample from
normalize(max(p - q, 0)), and after k kept drafts sample one more from p; the output is distributed as the target's.
p and q are the target's and the drafter's distributions after the same temperature / top-k / top-p / min-p.

Rounds follow transformers' MTP loop (SinglePositionMultiTokenCandidateGenerator): the first round drafts from the
prefill's last hidden state; later ones from the hidden state that predicted the last kept token, at that token's
position, reading the target's keys as the verification left them (drafter.target_kv).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .draft import Drafter, check_pair, greedy_pick, propose, sample_pick, sliding_window_span, target_kv
from .generate import left_pad
from .model import Gemma, KVCache
from .sampling import RowProcessors, RowRules, SamplingParams, first_max, process_logits


@dataclass
class Round:
    """One speculation round of one sequence: the ids the drafter proposed and how many the target kept."""

    drafted: list[int]
    accepted: int


@dataclass
class DraftLength:
    """Adaptive draft length: +1 after a fully kept draft, the kept count + 1 after a partly kept one, a quarter
    after none kept, or 0 at once while the drafter has never had a draft kept. At 0 the rows decode plainly and
    probe with one draft token after a pause that doubles after each failed probe (16 .. 64 steps). A drafted round
    costs about one plain step more than a plain one (verifying 5 or 9 rows took 2.0 and 2.3 plain steps at E4B
    widths on Q8_0, measured), so a drafter that never agrees pays one round and two probes in its first 64 tokens
    (~3-4 plain steps' worth), a probe per 64 tokens after that."""

    most: int
    now: int = 0
    pause: int = 16
    wait: int = 0
    adaptive: bool = True
    agreed: bool = False  # some draft was kept: a round with none kept then only shortens the drafts

    def __post_init__(self) -> None:
        self.now = self.most

    def next(self) -> int:
        if self.now or not self.adaptive:
            return self.now
        if self.wait > 0:
            self.wait -= 1
            return 0
        return 1  # a probe

    def update(self, drafted: int, accepted: int) -> None:
        if not self.adaptive or drafted == 0:
            return
        probe = self.now == 0
        self.agreed = self.agreed or accepted > 0
        if accepted == drafted:
            self.now, self.pause = min(self.most, max(self.now, drafted) + 1), 16
        elif accepted:
            self.now = min(self.most, accepted + 1)
        else:
            self.now = self.now // 4 if self.agreed else 0
            if probe:
                self.pause = min(64, self.pause * 2)
            if self.now == 0:
                self.wait = self.pause


@dataclass
class _Row:
    token: int  # the last kept token: not yet in the cache
    hidden: Tensor  # the target's final hidden state that predicted it (D,)
    position: int  # its position
    column: int  # its cache column
    sliding: tuple[int, int]  # the target's sliding-layer key positions the drafter sees (sliding_window_span)
    produced: int = 1
    queue: list[int] = field(default_factory=list)


def _accept_sampled(p: Tensor, q: Tensor, draft: list[int], gen: torch.Generator | None) -> tuple[int, int]:
    """(drafts kept, the next token) under the speculative-sampling rule; p (k+1, V), q (k, V) probabilities."""
    for j, x in enumerate(draft):
        other = _judge(p[j], q[j], x, gen)
        if other is not None:
            return j, other
    return len(draft), int(torch.multinomial(p[len(draft)], 1, generator=gen))


def _judge(p: Tensor, q: Tensor, x: int, gen: torch.Generator | None) -> int | None:
    """None when draft token x (drawn from q) is kept under target distribution p (both (V,)), else the token
    drawn from normalize(max(p - q, 0)) in its place."""
    u = torch.rand((), generator=gen).item()
    if u < (p[x] / q[x]).item():
        return None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return int(torch.multinomial(residual / total if total > 0 else p, 1, generator=gen))


class DraftPicker:
    """The drafter's choice for each active row, step by step (propose's `pick`): the arg-max for greedy rows, a
    sample of the row's distribution otherwise, with the row's bias and penalties counting its earlier drafts (not
    its processors, which have not seen them). Keeps each sampling row's q per step for the acceptance test."""

    def __init__(self, rules: Sequence[RowRules]) -> None:
        self.rules = rules
        self.tallies = [None if r.plain else _Tally(r) for r in rules]
        self.q: list[list[Tensor]] = [[] for _ in rules]

    def __call__(self, logits: Tensor) -> Tensor:
        out = first_max(logits)
        for i, (r, tally) in enumerate(zip(self.rules, self.tallies, strict=True)):
            if r.plain and r.params.greedy:
                continue
            scores = (process_logits(logits[i : i + 1].float(), r.params) if tally is None
                      else r.distribution(logits[i : i + 1], tally.seen, tally.counts, processors=False))
            if r.params.greedy:
                out[i] = scores.max(-1).indices[0]
            else:
                q = scores.softmax(-1)
                self.q[i].append(q[0])
                out[i] = torch.multinomial(q, 1, generator=r.generator)[0, 0]
            if tally is not None:
                tally.add(int(out[i]))
        return out


def verify_row(logits: Tensor, draft: list[int], rules: RowRules, q: list[Tensor],
               stop_ids: Collection[int] = ()) -> tuple[int, int]:
    """(drafts kept, the next token) of one row from its verification logits (len(draft) + 1, V).

    A plain row is judged on all positions at once. A row with a bias, penalties or processors is judged position
    by position, each scored with the penalties of the drafts kept before it and processed by processors that
    have accepted them (the LogitsProcessor contract: process() per position, accept() per kept draft, nothing
    after a stop token), so greedy output equals plain greedy's and sampled output keeps the row's distribution.
    The next token is not accept()ed here: the caller does that with every token it emits."""
    params = rules.params
    if rules.plain:
        if params.greedy:
            return _accept_greedy(logits, draft)
        p = process_logits(logits.float(), params).softmax(-1)
        return _accept_sampled(p, torch.stack(q) if draft else p[:0], draft, rules.generator)
    tally = _Tally(rules)
    for j in range(len(draft) + 1):
        scores = rules.distribution(logits[j : j + 1], tally.seen, tally.counts, processors=True)
        if params.greedy:
            token = int(scores.max(-1).indices[0])
            other = None if j < len(draft) and token == draft[j] else token
        elif j == len(draft):
            other = int(torch.multinomial(scores.softmax(-1)[0], 1, generator=rules.generator))
        else:
            other = _judge(scores.softmax(-1)[0], q[j], draft[j], rules.generator)
        if other is not None:
            return j, other
        for proc in rules.processors:
            proc.accept(draft[j])
        tally.add(draft[j])
        if draft[j] in stop_ids:  # the row ends with this draft: nothing after it is scored or accepted
            return j + 1, draft[j]
    raise AssertionError("unreachable")


class _Tally:
    """A row's seen set and counts extended by the drafts of this round (the row's own stay as they are)."""

    def __init__(self, rules: RowRules) -> None:
        self.seen = rules.seen.clone() if rules.seen is not None else None
        self.counts = rules.counts.clone() if rules.counts is not None else None

    def add(self, token: int) -> None:
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1


def _accept_greedy(logits: Tensor, draft: list[int]) -> tuple[int, int]:
    preds = first_max(logits).tolist()
    j = 0
    while j < len(draft) and preds[j] == draft[j]:
        j += 1
    return j, preds[j]


@torch.inference_mode()
def speculative_step(model: Gemma, drafter: Drafter, prompts: Sequence[Sequence[int]], params: SamplingParams,
                     max_new_tokens: int, k: int, *, stop_ids: Collection[int] = (),
                     rounds: list[list[Round]] | None = None, adaptive: bool = True,
                     processors: RowProcessors | None = None) -> Iterator[Tensor]:
    """Yield the next token of every row, (B,), max_new_tokens times, as generate_step does.

    Rows whose queue of kept tokens is empty take part in the next round; the others wait, so every row runs at
    its own pace through one cache. `rounds` (one list per row) receives each round's drafts and kept count.
    With `processors` (each row's LogitsProcessors) or a repetition penalty, every row's drafts are verified
    position by position under its rules (verify_row).
    """
    check_pair(drafter, model.config)
    device, B = model.device, len(prompts)
    ids, pos = left_pad(prompts, model.config.pad_token_id, device)
    cache = KVCache(model.config, B, ids.shape[1] + max_new_tokens + k + 1, dtype=model.dtype, device=device,
                    slack=k + 1)
    gen = None
    if not params.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed) if params.seed is not None else gen.seed()

    def probs(logits: Tensor) -> Tensor:
        return process_logits(logits, params).softmax(-1)

    pick = greedy_pick if params.greedy else sample_pick(probs, gen)
    rules = _row_rules(prompts, params, processors, gen, model.config.vocab_size, device)
    h = model.hidden_states(ids, pos, cache)[:, -1]
    first = pick(model.head(h)) if rules is None else _first_tokens(rules, model.head(h), stop_ids)
    W = model.config.sliding_window or 0
    rows = []
    for b in range(B):
        p = int(pos[b, -1]) + 1
        rows.append(_Row(int(first[b]), h[b], p, ids.shape[1], sliding_window_span(W, 0, p - 1, p, True)))
    length = DraftLength(k, adaptive=adaptive)
    yield first
    for _ in range(max_new_tokens - 1):
        while any(not r.queue for r in rows):
            active = [b for b, r in enumerate(rows) if not r.queue]
            _round(model, drafter, cache, rows, active, params, pick, probs, gen, max_new_tokens, length,
                   stop_ids, rounds, rules)
        yield torch.tensor([r.queue.pop(0) for r in rows], device=device)


def _row_rules(prompts: Sequence[Sequence[int]], params: SamplingParams, processors: RowProcessors | None,
               gen: torch.Generator | None, vocab: int, device: torch.device) -> list[RowRules] | None:
    """Each row's rules when some row has processors or the repetition penalty is on (else None: the plain path);
    the processors begin() on their row's prompt."""
    penalty = params.repetition_penalty not in (None, 1.0)
    if not penalty and not (processors and any(processors)):
        return None
    rules = []
    for b, prompt in enumerate(prompts):
        procs = list(processors[b]) if processors else []
        for p in procs:
            p.begin(prompt)
        seen = None
        if penalty:
            seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            seen[0, torch.tensor(list(prompt), device=device)] = True
        rules.append(RowRules(params, procs, seen, generator=gen))
    return rules


def _first_tokens(rules: list[RowRules], logits: Tensor, stop_ids: Collection[int]) -> Tensor:
    """The prefill's next token of each row under its rules, told to the row's processors and tallies."""
    out = []
    for b, r in enumerate(rules):
        scores = r.distribution(logits[b : b + 1], r.seen, None, processors=True)
        if r.params.greedy:
            token = int(scores.max(-1).indices[0])
        else:
            token = int(torch.multinomial(scores.softmax(-1)[0], 1, generator=r.generator))
        _chosen(r, [token], stop_ids)
        out.append(token)
    return torch.tensor(out, device=logits.device)


def _chosen(r: RowRules, tokens: list[int], stop_ids: Collection[int]) -> None:
    """Tokens chosen for a row whose processors have not seen them: accept()ed, and added to its seen set; after a
    stop token its processors are no longer called."""
    for t in tokens:
        if r.seen is not None:
            r.seen[0, t] = True
        for p in r.processors:
            p.accept(t)
        if t in stop_ids:
            r.processors = ()
            return


def _round(model: Gemma, drafter: Drafter, cache: KVCache, rows: list[_Row], active: list[int],
           params: SamplingParams, pick, probs, gen, budget: int, length: DraftLength,
           stop_ids: Collection[int], rounds: list[list[Round]] | None, rules: list[RowRules] | None) -> None:
    """One draft + verify round for the `active` rows (each gets at least one new token in its queue)."""
    device = model.device
    act = [rows[b] for b in active]
    k = min(length.next(), *(budget - r.produced - 1 for r in act))
    tokens = torch.tensor([r.token for r in act], device=device)
    positions = torch.tensor([r.position for r in act], device=device)
    drafts, draft_logits = torch.zeros(len(act), 0, dtype=torch.long, device=device), []
    picker = DraftPicker([rules[b] for b in active]) if rules is not None else None
    if k > 0:  # drafted before the rollback: the drafter sees the cache as transformers' does (draft.target_kv)
        spans = torch.tensor([r.sliding for r in act], device=device)
        kv = target_kv(model.config, cache, active, positions, spans)
        drafts, draft_logits = propose(drafter, model, tokens, torch.stack([r.hidden for r in act]), positions, kv,
                                       k, picker or pick)
    for b, r in zip(active, act, strict=True):
        cache.rollback(b, r.column)  # forget the last round's rejected drafts (their keys stayed for drafting)
    inp = torch.cat([tokens[:, None], drafts], 1)
    pos = positions[:, None] + torch.arange(k + 1, device=device)
    hidden = model.hidden_states(inp, pos, cache, rows=active)
    logits = model.head(hidden)
    kept_total = 0
    for i, (b, r) in enumerate(zip(active, act, strict=True)):
        draft = drafts[i].tolist()
        draft = draft[: next((j for j, t in enumerate(draft) if t in stop_ids), len(draft)) + 1]
        if picker is not None:
            rule = picker.rules[i]
            kept, nxt = verify_row(logits[i, : len(draft) + 1], draft, rule, picker.q[i], stop_ids)
            if rule.seen is not None:
                rule.seen[0, draft[:kept]] = True
            if kept and draft[kept - 1] in stop_ids:  # the row ended with a kept draft
                rule.processors = ()
            else:
                _chosen(rule, [nxt], stop_ids)
        elif params.greedy:
            kept, nxt = _accept_greedy(logits[i, : len(draft) + 1], draft)
        else:
            q = torch.stack([probs(dl[i : i + 1])[0] for dl in draft_logits[: len(draft)]]) if draft else None
            kept, nxt = _accept_sampled(probs(logits[i, : len(draft) + 1]), q, draft, gen)
        if rounds is not None and k > 0:
            rounds[b].append(Round(drafts[i].tolist(), kept))
        kept_total += kept
        r.queue.extend(draft[:kept] + [nxt])
        r.produced += kept + 1
        r.sliding = sliding_window_span(model.config.sliding_window or 0, r.position, r.position + k,
                                        r.position + kept + 1, False)
        r.token, r.hidden, r.position = nxt, hidden[i, kept], r.position + kept + 1
        r.column += kept + 1  # columns past it hold rejected drafts until the next round rolls them back
    length.update(k * len(act), kept_total)
