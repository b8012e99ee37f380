"""Pure next-token selection: logits processors and a sampler factory, in transformers' order.

Order (as HF `generate`): repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample. Greedy when
temperature is 0. Every function takes fp32 logits (B, V) and returns new logits; nothing here touches the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import GemmaError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise GemmaError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GemmaError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GemmaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise GemmaError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise GemmaError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty on tokens already in the sequence: divide positive logits, multiply negative ones.

    seen: (B, V) bool of tokens present in prompt + output so far.
    """
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = (cum - sorted_logits.softmax(-1)) >= p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    probs = logits.softmax(-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None) -> Tensor:
    """All enabled processors applied to fp32 logits (B, V); the distribution that sampling draws from."""
    if params.repetition_penalty not in (None, 1.0) and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p:
        logits = apply_min_p(logits, params.min_p)
    return logits


def make_sampler(params: SamplingParams, device: torch.device | str = "cpu") -> Callable[[Tensor, Tensor | None],
                                                                                         Tensor]:
    """sampler(logits (B, V), seen (B, V) | None) -> token ids (B,). Seeded samplers repeat exactly."""
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()

    def sample(logits: Tensor, seen: Tensor | None = None) -> Tensor:
        logits = process_logits(logits.float(), params, seen)
        if params.greedy:
            return logits.max(dim=-1).indices  # same first-maximum index as argmax, ~3x faster on a CPU vocab row
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample
