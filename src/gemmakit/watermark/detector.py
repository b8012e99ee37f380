"""SynthID-Text detection: g-value scores of a text and their p-value against text written without the keys.

Scores (spec §7.4; SynthID's detector_mean.py): every window of ngram_len tokens gives `depth` g-values for its
last token; windows whose context already occurred within the last context_history_size windows, and windows from
the first EOS on, are masked out (transformers' compute_context_repetition_mask and compute_eos_token_mask). The
mean score averages the unmasked g-values; the weighted mean weights layer l by linspace(10, 1, depth), scaled to
sum to depth. Unwatermarked text scores about 0.5; watermarked text higher.

p-value: P(score >= observed) for text not watermarked with these keys. With a power-of-two sampling table (the
default) the null distribution is exact: a window's g-vector depends only on x = (context hash + token) mod S
(watermark.py), x is uniform over 0..S-1 for text that never saw the keys, and distinct contexts give independent
windows. Enumerating all S values of x gives one window's score distribution exactly; the sum over N windows is
its N-fold convolution, evaluated with exponential tilting so that tail probabilities far below float precision
stay exact to rounding. Other table sizes mix all 64 hash bits, so there is no such enumeration: one window's
distribution is then measured on unwatermarked text that ships with the package (data/unwatermarked.txt),
scored with the same keys and tokenizer, and convolved the same way.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GemmaError
from ..tokenizer import Tokenizer
from .synthid import GValues, WatermarkConfig, gvalues_for, load_config

DEFAULT_FPR = 0.01
FFT_LIMIT = 2**23  # lattice points of the N-window score; beyond, the tilted tail uses Bahadur-Rao's formula
CALIBRATION_FILE = "unwatermarked.txt"


@dataclass
class Detection:
    """The verdict on one text. `watermarked` is p_value <= fpr: the chance that text written without these keys
    scores as high is at most fpr."""

    mean: float  # mean g-value of the scored windows (about 0.5 without the watermark)
    weighted_mean: float  # SynthID's weighted mean: early tournament layers weigh more
    scored: int  # windows (tokens) scored after the repetition and EOS masks
    tokens: int  # tokens in the text
    p_value: float  # of the weighted mean, against unwatermarked text
    p_value_mean: float  # of the mean
    fpr: float
    null: str  # "exact" or "calibrated": where the null distribution comes from

    @property
    def watermarked(self) -> bool:
        return self.p_value <= self.fpr

    def to_dict(self) -> dict[str, Any]:
        return {"watermarked": self.watermarked, "mean": self.mean, "weighted_mean": self.weighted_mean,
                "scored_tokens": self.scored, "tokens": self.tokens, "p_value": self.p_value,
                "p_value_mean": self.p_value_mean, "fpr": self.fpr, "null": self.null}


def layer_weights(depth: int) -> np.ndarray:
    """Integer weights proportional to SynthID's linspace(10, 1, depth): 10(d-1) - 9l for layer l (1 if d = 1)."""
    if depth == 1:
        return np.ones(1, dtype=np.int64)
    return 10 * (depth - 1) - 9 * np.arange(depth, dtype=np.int64)


def repetition_mask(gvalues: GValues, ids: Sequence[int]) -> np.ndarray:
    """1 where a window's context was not among the last context_history_size contexts (history starts as zeros,
    exactly as transformers' compute_context_repetition_mask), per window."""
    n = gvalues.config.ngram_len
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    if len(ids_t) < n:
        return np.zeros(0, dtype=bool)
    hashes = gvalues.context_hash(ids_t[:-1].unfold(0, n - 1, 1)).tolist()
    size = gvalues.config.context_history_size
    window = [0] * size  # oldest first
    counts = Counter({0: size})
    start = 0
    out = np.empty(len(hashes), dtype=bool)
    for i, h in enumerate(hashes):
        out[i] = counts[h] == 0
        window.append(h)
        counts[h] += 1
        counts[window[start]] -= 1  # drop the oldest
        start += 1
    return out


def eos_mask(ids: Sequence[int], ngram_len: int, eos_id: int | None) -> np.ndarray:
    """1 for windows whose last token comes before the first EOS (compute_eos_token_mask[:, ngram_len-1:])."""
    n_windows = max(0, len(ids) - ngram_len + 1)
    first = next((i for i, t in enumerate(ids) if t == eos_id), len(ids)) if eos_id is not None else len(ids)
    return np.arange(ngram_len - 1, ngram_len - 1 + n_windows) < first


def g_values(gvalues: GValues, ids: Sequence[int], eos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(g (windows, depth) int, mask (windows,) bool) of a token sequence."""
    n = gvalues.config.ngram_len
    if len(ids) < n:
        return np.zeros((0, gvalues.depth), dtype=np.int64), np.zeros(0, dtype=bool)
    g = gvalues.of_ngrams(torch.tensor([list(ids)], dtype=torch.long))[0].numpy()
    return g, repetition_mask(gvalues, ids) & eos_mask(ids, n, eos_id)


def window_pmf(gvalues: GValues, weights: np.ndarray, tokenizer: Tokenizer | None) -> tuple[np.ndarray, str]:
    """One window's integer score sum_l weights_l * g_l under the null, as a pmf over 0..sum(weights)."""
    if gvalues.by_residue is not None:  # exact: every residue x = (context hash + token) mod S, equally likely
        per_x = torch.tensor(weights)[:, None].mul(gvalues.by_residue.long()).sum(0).numpy()
        counts = np.bincount(per_x, minlength=int(weights.sum()) + 1)
        return counts / counts.sum(), "exact"
    if tokenizer is None:
        raise GemmaError("a sampling table whose size is not a power of two needs the tokenizer for calibration")
    g, mask = g_values(gvalues, calibration_ids(tokenizer))
    per_window = g[mask] @ weights
    counts = np.bincount(per_window, minlength=int(weights.sum()) + 1)
    return counts / counts.sum(), "calibrated"


def calibration_ids(tokenizer: Tokenizer) -> list[int]:
    """The shipped unwatermarked text, tokenized (each paragraph on its own, without <bos>)."""
    text = resources.files("gemmakit.watermark").joinpath("data", CALIBRATION_FILE).read_text(encoding="utf-8")
    return [t for para in text.split("\n\n") if para.strip() for t in tokenizer.encode(para, bos=False)]


def tail_probability(pmf: np.ndarray, n: int, s: int) -> float:
    """P(X_1 + ... + X_n >= s) for n independent copies of X ~ pmf over 0..W.

    Tilting: with f_t(k) = f(k) e^{tk} / M(t) and t chosen so that n E_t[X] = s, P = M(t)^n sum_{j>=s}
    f_t^{*n}(j) e^{-tj}; the convolution is taken where f_t^{*n} has its bulk, so its rounding errors stay far
    below the terms that matter, however small P is.
    """
    W = len(pmf) - 1
    support = np.nonzero(pmf)[0]
    if s <= support[0] * n:
        return 1.0
    if s > support[-1] * n:
        return 0.0
    logf = np.full(W + 1, -np.inf)
    logf[support] = np.log(pmf[support])
    k = np.arange(W + 1)

    def tilted(t: float) -> tuple[np.ndarray, float]:
        a = logf + t * k
        log_m = float(np.logaddexp.reduce(a[support]))
        return np.exp(a - log_m), log_m

    t = 0.0
    if s > n * float(pmf @ k):
        lo, hi = 0.0, 1.0
        while float(tilted(hi)[0] @ k) * n < s and hi < 1e6:
            lo, hi = hi, hi * 2
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(tilted(mid)[0] @ k) * n < s else (lo, mid)
        t = lo
    f_t, log_m = tilted(t)
    if s == support[-1] * n:  # every window at its maximum
        return math.exp(n * math.log(pmf[support[-1]]))
    size = n * W + 1
    if size <= FFT_LIMIT:
        length = 1 << (size - 1).bit_length()
        dist = np.fft.irfft(np.fft.rfft(f_t, length) ** n, length)[:size].clip(min=0.0)
        tail = float((dist[s:] * np.exp(-t * (np.arange(s, size) - s))).sum())
        log_p = n * log_m - t * s + math.log(tail) if tail > 0 else -math.inf
    else:  # Bahadur-Rao: the lattice saddlepoint approximation, relative error O(1/n)
        var = float(f_t @ (k - f_t @ k) ** 2)
        if t < 1e-6:
            z = (s - 0.5 - n * float(pmf @ k)) / math.sqrt(n * var)
            return 0.5 * math.erfc(z / math.sqrt(2))
        log_p = n * log_m - t * s - math.log((1 - math.exp(-t)) * math.sqrt(2 * math.pi * n * var))
    return min(1.0, math.exp(log_p)) if log_p > -745 else 0.0


@cache
def _null(config: WatermarkConfig, tokenizer: Tokenizer | None) -> tuple[np.ndarray, np.ndarray, str]:
    gvalues = gvalues_for(config)
    mean_pmf, null = window_pmf(gvalues, np.ones(config.depth, dtype=np.int64), tokenizer)
    weighted_pmf, _ = window_pmf(gvalues, layer_weights(config.depth), tokenizer)
    return mean_pmf, weighted_pmf, null


def score_ids(ids: Sequence[int], keys: WatermarkConfig, *, eos_id: int | None = None, fpr: float = DEFAULT_FPR,
              tokenizer: Tokenizer | None = None) -> Detection:
    """Scores and p-values of token ids (the text as generated, without the prompt or <bos>)."""
    if not 0 < fpr < 1:
        raise GemmaError(f"fpr is a probability in (0, 1), got {fpr}")
    gvalues = gvalues_for(keys)
    g, mask = g_values(gvalues, ids, eos_id)
    scored = int(mask.sum())
    if scored == 0:
        raise GemmaError(f"nothing to score: the text has {len(ids)} tokens, and a watermark needs at least "
                         f"{keys.ngram_len} (ngram_len) tokens with unrepeated contexts; give a longer text")
    weights = layer_weights(keys.depth)
    total, weighted = int(g[mask].sum()), int((g[mask] @ weights).sum())
    mean_pmf, weighted_pmf, null = _null(keys, tokenizer if gvalues.by_residue is None else None)
    return Detection(mean=total / (keys.depth * scored), weighted_mean=weighted / int(weights.sum() * scored),
                     scored=scored, tokens=len(ids), p_value=tail_probability(weighted_pmf, scored, weighted),
                     p_value_mean=tail_probability(mean_pmf, scored, total), fpr=fpr, null=null)


def detect(text: str | Sequence[int], keys: str | os.PathLike[str] | WatermarkConfig | Mapping[str, Any], *,
           model: Any = None, fpr: float = DEFAULT_FPR) -> Detection:
    """Is `text` watermarked with `keys`? -> Detection (mean / weighted-mean scores, p-value, verdict at fpr).

    text: a string, tokenized as plain text without <bos> (the tokens a model generated), or token ids.
    keys: a keys file (SynthIDTextWatermarkingConfig fields, JSON), a dict of them, or a WatermarkConfig.
    model: what gives the tokenizer: a loaded Model, a Tokenizer, a model path, or None for the embedded one.
    Score the generated text only: a prompt in front dilutes the score (its tokens were not watermarked).
    """
    config = load_config(keys)
    tokenizer = _tokenizer(model)
    if isinstance(text, str):
        if not text.strip():
            raise GemmaError("the text to check is empty")
        ids = tokenizer.encode(text, bos=False)
    else:
        ids = [int(t) for t in text]
    return score_ids(ids, config, eos_id=tokenizer.eos_id, fpr=fpr, tokenizer=tokenizer)


def _tokenizer(model: Any) -> Tokenizer:
    if isinstance(model, Tokenizer):
        return model
    if model is None or isinstance(model, str | Path):
        from ..loader import load_tokenizer

        return load_tokenizer(model)
    if getattr(model, "tokenizer", None) is None:
        raise GemmaError("detect() needs a tokenizer: pass a Model loaded with one, a Tokenizer or a model path")
    return model.tokenizer
