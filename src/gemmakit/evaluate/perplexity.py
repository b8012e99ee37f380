"""Strided sliding-window perplexity, computed as the transformers guide "Perplexity of fixed-length models" does.

The text is tokenized once, with <bos> in front, exactly as transformers' tokenizer(text) does. Windows of
`window` tokens start every `stride` tokens (0, stride, 2*stride, ...); each window scores only the tokens that
no earlier window scored (the last `end - previous_end`), with the rest as context, and the loop stops at the
window that reaches the end of the text. Every window is scored from a fresh start (its first token at position
0), as the guide's separate forward passes do.

Averaging follows the guide to the letter, so the same window and stride give the same number: the guide
multiplies each window's mean loss by (its unmasked labels - 1), which is the number of tokens it scored for the
first window but one less for the others (their first label is a real target, yet one is still subtracted for
the label shift). Perplexity is exp(weighted sum / sum of weights). `nll` and `bits_per_byte` use the plain sum
of the negative log-likelihoods of every scored token.

Memory stays bounded on long files: token ids are held for the whole text, but logits only for HEAD_ROWS
positions at a time (scoring.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..api import Model
from ..errors import GemmaError
from .scoring import score

DEFAULT_WINDOW = 2048


@dataclass
class Perplexity:
    tokens: int  # tokens whose probability was scored (every token after <bos> when stride < window)
    perplexity: float  # the transformers guide's number (see the module docstring)
    bits_per_byte: float  # total negative log-likelihood in bits / UTF-8 bytes of the scored text
    nll: float  # mean negative log-likelihood per scored token, in nats
    window: int
    stride: int
    windows: int
    bytes: int  # UTF-8 bytes covered by the scored tokens

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, targets) per window over n tokens, as the guide's loop: targets = end - previous end."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return out


def resolve_window(model: Model, window: int | None, stride: int | None) -> tuple[int, int]:
    """Default window min(2048, context), stride half of it; the window never exceeds the model's context."""
    context = model.config.max_position_embeddings
    window = window or min(DEFAULT_WINDOW, context)
    stride = stride or max(1, window // 2)
    if window < 2:
        raise GemmaError(f"--window must be at least 2 tokens, got {window}")
    if window > context:
        raise GemmaError(f"--window {window} exceeds the model's context of {context} tokens; use at most {context}")
    if not 1 <= stride <= window:
        raise GemmaError(f"--stride must be between 1 and the window ({window}), got {stride}: a larger stride "
                         "would skip tokens")
    return window, stride


def perplexity(model: Model, text: str, *, window: int | None = None, stride: int | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Perplexity of `text` under `model` by strided sliding windows (default window min(2048, context), stride
    window/2). on_progress(done, total) counts tokens through the decoder (context and scored alike)."""
    if model.tokenizer is None:
        raise GemmaError("this model was loaded without a tokenizer; perplexity needs one to read text")
    window, stride = resolve_window(model, window, stride)
    ids = model.tokenizer.encode(text, bos=True)
    if len(ids) < 2:
        raise GemmaError("the text is empty: there is no token to score")
    plan = windows(len(ids), window, stride)
    total, done = sum(end - begin - 1 for begin, end, _ in plan), 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    weighted = weights = nll_sum = 0.0
    tokens, unscored = 0, []
    for begin, end, targets in plan:
        length = end - begin
        if targets >= length and begin > 0:  # no overlap: the window's first token has no context to score it
            unscored.append(ids[begin])
        s = score(model, ids[begin:end], max(1, length - targets), on_tokens=advance)
        n = s.logprobs.numel()
        if n:
            window_nll = -float(s.logprobs.sum())
            weight = min(targets, length) - 1  # the guide's count: unmasked labels minus one
            weighted += window_nll / n * weight
            weights += weight
            nll_sum += window_nll
            tokens += n
    if weights <= 0:
        raise GemmaError("the text is too short to score with this window and stride; give more text")
    scored_bytes = len(text.encode("utf-8")) - sum(len(model.tokenizer.decode([t]).encode("utf-8"))
                                                   for t in unscored)
    return Perplexity(tokens=tokens, perplexity=math.exp(weighted / weights),
                      bits_per_byte=nll_sum / math.log(2) / max(1, scored_bytes), nll=nll_sum / tokens,
                      window=window, stride=stride, windows=len(plan), bytes=scored_bytes)


def perplexity_of_file(model: Model, path: str | Path, **kwargs) -> Perplexity:
    """perplexity() of a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise GemmaError(f"{p} is not a file; give a UTF-8 text file to score")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GemmaError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); convert it first") from e
    return perplexity(model, text, **kwargs)
