"""Token log-probabilities of given text under the model: the one scoring primitive behind perplexity and lm-eval.

Gemma's vocabulary has 256k-262k entries, so the logits of a 512-token window are 0.5 GB in fp32. Scoring never
builds them for a whole sequence: the decoder runs over `chunk` tokens at a time (a long sequence goes through a
KV cache, chunk by chunk), and the LM head runs only on the positions whose next token is scored, at most
HEAD_ROWS rows at a time. Only the module's public forward pieces are used (hidden_states with a KV cache, head),
so the fast path and the reference path score the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..api import Model
from ..errors import GemmaError
from ..model import KVCache

HEAD_ROWS = 256  # LM-head rows per call: 256 x 262144 fp32 logits = 256 MB (a quantized head is unpacked per call)
CHUNK = 512  # decoder tokens per forward through the KV cache


@dataclass
class Scores:
    """Per-token results for the scored span of one sequence."""

    logprobs: Tensor  # (n,) float64: log p(ids[j] | ids[:j]) for each scored j
    greedy: Tensor  # (n,) bool: ids[j] is the model's most likely next token


def _score_rows(model: Model, h: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log-softmax at the target ids and argmax agreement for hidden states h (n, D), HEAD_ROWS rows at a time."""
    lps, hits = [], []
    for s in range(0, h.shape[0], HEAD_ROWS):
        logits = model.module.head(h[s:s + HEAD_ROWS], score=True)  # (r, V) fp32
        t = targets[s:s + HEAD_ROWS].to(logits.device)
        picked = logits.gather(1, t[:, None])[:, 0]
        lps.append((picked - torch.logsumexp(logits, dim=-1)).double().cpu())
        hits.append((logits.max(dim=-1).indices == t).cpu())
    if not lps:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(lps), torch.cat(hits)


def _check(model: Model, ids: Sequence[int], start: int) -> None:
    cfg = model.config
    if not 1 <= start <= len(ids):
        raise GemmaError(f"cannot score from position {start} of a {len(ids)}-token sequence: the first scored "
                         "token needs at least one token before it")
    if len(ids) - 1 > cfg.max_position_embeddings:  # the last id is only a target, never an input
        raise GemmaError(f"a {len(ids)}-token sequence needs {len(ids) - 1} input positions, more than the "
                         f"model's context of {cfg.max_position_embeddings}; use a smaller window")
    if ids and not 0 <= min(ids) <= max(ids) < cfg.vocab_size:
        raise GemmaError(f"token ids must lie in 0..{cfg.vocab_size - 1}")


@torch.inference_mode()
def score(model: Model, ids: Sequence[int], start: int = 1, *, chunk: int = CHUNK,
          on_tokens: Callable[[int], None] | None = None) -> Scores:
    """Score ids[start:], each token given everything before it, in one pass of `chunk` tokens per forward.

    on_tokens(n) is called after each forward with the number of tokens it consumed (for a progress bar).
    """
    _check(model, ids, start)
    module, device = model.module, model.device
    cache = KVCache(model.config, 1, len(ids), dtype=module.dtype, device=device)
    lps, hits = [], []
    for s in range(0, len(ids) - 1, chunk):
        e = min(s + chunk, len(ids) - 1)  # the last id is only ever a target
        h = module.hidden_states(torch.tensor([ids[s:e]], device=device),
                                 torch.arange(s, e, device=device)[None], cache)[0]
        first = max(s, start - 1)  # position p predicts ids[p + 1]
        if first < e:
            lp, hit = _score_rows(model, h[first - s:], torch.tensor(ids[first + 1:e + 1]))
            lps.append(lp)
            hits.append(hit)
        if on_tokens is not None:
            on_tokens(e - s)
    if not lps:
        return Scores(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool))
    return Scores(torch.cat(lps), torch.cat(hits))


@torch.inference_mode()
def score_batch(model: Model, rows: Sequence[Sequence[int]], starts: Sequence[int], *,
                chunk: int = CHUNK) -> list[Scores]:
    """score() for many sequences: rows that fit in `chunk` tokens run as one right-padded batch (padding gets
    position -1, which attention ignores); longer rows go through score() one at a time."""
    out: list[Scores | None] = [None] * len(rows)
    short = []
    for i, (r, s) in enumerate(zip(rows, starts, strict=True)):
        _check(model, r, s)
        if len(r) - 1 > chunk:
            out[i] = score(model, r, s, chunk=chunk)
        else:
            short.append(i)
    if short:
        module, device = model.module, model.device
        width = max(len(rows[i]) - 1 for i in short)
        ids = torch.zeros(len(short), max(width, 1), dtype=torch.long)
        pos = torch.full_like(ids, -1)
        for b, i in enumerate(short):
            n = len(rows[i]) - 1
            ids[b, :n] = torch.tensor(rows[i][:-1])
            pos[b, :n] = torch.arange(n)
        h = module.hidden_states(ids.to(device), pos.to(device))  # (B, T, D)
        picks = [(b, p) for b, i in enumerate(short) for p in range(starts[i] - 1, len(rows[i]) - 1)]
        flat = h[[b for b, _ in picks], [p for _, p in picks]] if picks else h[:0, 0]
        targets = torch.tensor([rows[short[b]][p + 1] for b, p in picks], dtype=torch.long)
        lp, hit = _score_rows(model, flat, targets)
        at = 0
        for i in short:
            n = len(rows[i]) - starts[i]
            out[i] = Scores(lp[at:at + n], hit[at:at + n])
            at += n
    return out  # type: ignore[return-value]
