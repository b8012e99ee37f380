"""Every running row's next token for one engine step, chosen together where the rows allow it.

A batch-8 decode step of the 270M takes ~42 ms on 2 cores. Chosen row by row, each sampling row added ~6 ms
(torch.multinomial races one exponential variate per vocabulary entry: 262k of them) and each arg-max ~0.3 ms. So:

- plain rows (no penalty, logit bias or processor) that are greedy share one arg-max over the batch;
- plain unseeded rows with the same temperature, top-k, top-p and min-p share one processing and one softmax;
- every unseeded sampling row takes part in one draw for the step (sampling.draw: one uniform per row against its
  cumulative distribution): the same distribution as Model.generate's sampler, not the same draws, which only a
  seed asks for;
- seeded rows, and rows with penalties, a bias or processors, keep their own sampler (make_sampler): a seeded row
  draws exactly as Model.generate with that seed, and a row's processors see its logits alone, as in generate.

A row's failure is its own: an exception while its logits are processed or its token drawn takes that row's place
in the result, and the other rows are chosen as if it were not there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..sampling import SamplingParams, draw, first_max, process_logits
from .drafting import row_rules


class BadDistribution(ValueError):
    """A row's processed probabilities were not finite with a positive sum (e.g. a nan temperature)."""


def choose(seqs: Sequence[Any], logits: Tensor, generator: torch.Generator) -> list[int | Exception]:
    """The next token of each engine row `seqs[i]` (serve/engine.py _Seq) from its logits[i] (n, V), or the
    exception that choosing it raised. Unseeded rows draw from `generator`."""
    out: list[int | Exception] = [0] * len(seqs)
    greedy: list[int] = []
    groups: dict[SamplingParams, list[int]] = {}  # plain unseeded sampling rows by their settings
    pending: list[tuple[list[int], Tensor]] = []  # rows of one draw and their probabilities (rows, V)
    for i, seq in enumerate(seqs):
        p, rules = seq.job.params, row_rules(seq, drafting=False)
        if rules.plain and p.greedy:
            greedy.append(i)
        elif rules.plain and p.seed is None:
            groups.setdefault(p, []).append(i)
        else:
            try:
                if p.greedy or p.seed is not None:
                    procs = [seq.job.processors] if seq.job.processors else None
                    out[i] = int(seq.sample(rules.penalized(logits[i : i + 1]), seq.seen, procs)[0])
                else:
                    pending.append(
                        ([i], rules.distribution(logits[i : i + 1], seq.seen, None, True).softmax(-1))
                    )
            except Exception as e:
                out[i] = e
    if greedy:
        # The first maximum, as the greedy sampler takes it. Over every row unless most rows sample: gathering the
        # greedy rows first copies megabytes of fresh memory, slower than reducing the rows that did not need it.
        many = 2 * len(greedy) >= len(seqs)
        best = first_max(logits if many else logits[greedy]).tolist()
        for k, i in enumerate(greedy):
            out[i] = best[i] if many else best[k]
    for rows in groups.values():
        try:
            params = seqs[rows[0]].job.params
            pending.append((rows, process_logits(logits[rows].float(), params).softmax(-1)))
        except Exception as e:  # the same settings would fail each of these rows alone
            for i in rows:
                out[i] = e
    if pending:
        drawn = draw(torch.cat([probs for _, probs in pending]), generator).tolist()
        for i, t in zip([i for rows, _ in pending for i in rows], drawn, strict=True):
            out[i] = t if t >= 0 else BadDistribution("the row's sampling distribution is not finite")
    return out
