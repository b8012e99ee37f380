"""Next-token selection: logits processors and a sampler factory, in transformers' order.

Order (as HF `generate`): repetition penalty -> per-row "mask" processors -> temperature -> top-k -> top-p ->
min-p -> per-row "warp" processors -> sample. Greedy when temperature is 0 (or below MIN_TEMPERATURE) or top_p
is 0. Every function takes fp32 logits (B, V) and returns new logits; nothing here touches the model. The per-row processors (LogitsProcessor below)
are the one hook through which grammar masks (structured output) and watermarks reshape a sequence's logits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from .errors import GemmaError

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
# Below this temperature sampling is arg-max in all but ties, and logits / temperature would leave fp32's range
# (30 / 1e-300 = inf, softmax -> nan): taken as greedy, as vLLM does with its _SAMPLING_EPS of 1e-5.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0  # far flatter than any use; beyond it -inf / t turns masked tokens into nan
PENALTY_RANGE = (1e-4, 1e4)  # repetition penalties keeping (penalised logits / temperature) finite in fp32


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy
    top_k: int | None = None
    top_p: float | None = None  # 0 = greedy (the limit of keeping the smallest set), as OpenAI takes it
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _number(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise GemmaError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {t}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GemmaError(f"top_k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and (not _number(self.top_p) or not 0 <= self.top_p <= 1):
            raise GemmaError(f"top_p must be in [0, 1] (0 = greedy), got {self.top_p}")
        if self.min_p is not None and (not _number(self.min_p) or not 0 <= self.min_p <= 1):
            raise GemmaError(f"min_p must be in [0, 1], got {self.min_p}")
        r = self.repetition_penalty
        if r is not None and (not _number(r) or not PENALTY_RANGE[0] <= r <= PENALTY_RANGE[1]):
            raise GemmaError(f"repetition_penalty must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}] "
                             f"(1 = off, > 1 discourages repeats), got {r}")
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_p == 0


def _number(x: object) -> bool:
    """A finite real number (bools are not numbers here: True as a temperature is a caller's bug)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_seed(seed: int | None, what: str = "seed") -> None:
    """A seed torch's generators take: an integer in [-2**63, 2**64 - 1]."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX:
        shown = seed if not isinstance(seed, int) or seed.bit_length() < 80 else f"a {seed.bit_length()}-bit integer"
        raise GemmaError(f"{what} must be an integer in [-2**63, 2**64 - 1], got {shown}")


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


class LogitsProcessor(ABC):
    """One sequence's stateful reshaping of its next-token logits: a grammar mask, a watermark, ...

    The contract every generation loop keeps (generate.generate_step, generate.lookup_step and the server's
    continuous-batching serve.engine.Engine):

    - One instance per sequence, never shared between rows; a request with n sequences gets n instances (APIs
      take a factory, `Callable[[], list[LogitsProcessor]]`, called once per sequence).
    - `begin(prompt)` once, before anything else: the row's prompt ids (a watermark keys on the tokens before
      each new one; a grammar ignores it).
    - `process(logits)` for each new token of this row: `logits` is the row's fp32 (V,) scores (V = the model's
      vocabulary, which may exceed the tokenizer's) after repetition/frequency/presence penalties and logit
      bias. Return a new (V,) tensor and leave the input as it is (it may be the model's output, which the
      caller still reads, e.g. for logprobs); -inf forbids a token, and at least one token must stay finite. Rows are processed one by one, so a batch costs B calls; finished rows are not called.
    - `stage` says where process() runs: "mask" before temperature/top-k/top-p/min-p (so those choose among
      the allowed tokens: grammars), "warp" after them, on the exact distribution that sampling then draws
      from (logits / temperature with the cut tokens at -inf; raw logits when greedy: watermarks).
    - `accept(token)` once for every token chosen for this row, in order, right after it is chosen and before
      the model's next forward, including the final EOS/<end_of_turn>; after a stop token the row is over and
      nothing more is called. A processor may start work for its next process() in accept() (e.g. a grammar
      mask in a thread), since the caller runs the forward pass in between.
    - Speculation (prompt lookup): `valid_prefix(draft)` says how many leading draft tokens this processor can
      allow (default: all); the draft is cut there before verification. Verification then calls process() on
      the logits of each draft position and accept() on each token kept, in order, stopping at the first
      disagreement, so a rejected draft token never reaches accept() (there is no rollback to implement).

    The hook costs nothing when unused: samplers only look at processors that are there.
    """

    stage: ClassVar[Literal["mask", "warp"]] = "mask"

    def begin(self, prompt: Sequence[int]) -> None:  # noqa: B027 - a no-op is the right default
        """The row's prompt ids, once, before the first process()."""

    @abstractmethod
    def process(self, logits: Tensor) -> Tensor:
        """This row's next-token scores (V,) -> new scores (V,)."""

    def accept(self, token: int) -> None:  # noqa: B027
        """The token chosen for this row (never a draft token that verification rejected)."""

    def valid_prefix(self, draft: Sequence[int]) -> int:
        """How many leading tokens of a speculative draft may follow the tokens accepted so far."""
        return len(draft)


RowProcessors = Sequence[Sequence[LogitsProcessor]]  # per batch row, that row's processors (maybe none)


def apply_processors(logits: Tensor, rows: RowProcessors, stage: str) -> Tensor:
    """logits (B, V) with every `stage` processor of each row applied to that row; the input itself when none
    applies (processors return new tensors, so the caller's logits are never modified)."""
    out: list[Tensor] | None = None
    for b, procs in enumerate(rows):
        for p in procs:
            if p.stage == stage:
                if out is None:
                    out = list(logits.unbind(0))
                out[b] = p.process(out[b])
    if out is None:
        return logits
    return out[0][None] if len(out) == 1 else torch.stack(out)


def accept_tokens(rows: RowProcessors, tokens: Sequence[int]) -> None:
    """Tell each row's processors the token chosen for it."""
    for procs, t in zip(rows, tokens, strict=True):
        for p in procs:
            p.accept(t)


def process_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
                   rows: RowProcessors | None = None) -> Tensor:
    """All enabled processors applied to fp32 logits (B, V); the distribution that sampling draws from."""
    if params.repetition_penalty not in (None, 1.0) and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if rows:
        logits = apply_processors(logits, rows, "mask")
    if params.greedy:
        return apply_processors(logits, rows, "warp") if rows else logits
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    if params.min_p:
        logits = apply_min_p(logits, params.min_p)
    return apply_processors(logits, rows, "warp") if rows else logits


CDF_BLOCK = 256  # draw(): vocabulary entries summed per block before the cumulative sum


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of probs (R, V), each found by one uniform against the row's cumulative distribution;
    -1 for a row whose probabilities are not finite with a positive sum.

    Same distribution as torch.multinomial(probs, 1), but not the same draws: multinomial races one exponential
    variate per vocabulary entry (~5 ms a row on a CPU for a 262k vocabulary), this needs one uniform per row
    (~0.1 ms). Blocks of CDF_BLOCK probabilities are summed, the block sums accumulated in float64, and only the
    chosen block's cumulative sum is taken, in float64: rounding moves no token's share by more than float64's
    precision, and a token of probability 0 is never drawn. For draws that need not repeat torch's (unseeded rows).
    """
    R, V = probs.shape
    pad = -V % CDF_BLOCK
    p = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    cum = p.reshape(R, -1, CDF_BLOCK).sum(-1).double().cumsum(-1)  # (R, blocks)
    total = cum[:, -1]
    ok = torch.isfinite(total) & (total > 0)
    u = torch.rand(R, dtype=torch.float64, generator=generator, device=probs.device)
    # u * total < total, so some block's cumulative sum exceeds it: never the zero blocks past the last token
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(cum, x[:, None], right=True)[:, 0].clamp_(max=cum.shape[1] - 1)
    out = torch.full((R,), -1, dtype=torch.long)
    for i in ok.nonzero()[:, 0].tolist():
        b = int(block[i])
        start = b * CDF_BLOCK
        inner = p[i, start : start + CDF_BLOCK].double().cumsum(0)
        rest = x[i] - (cum[i, b - 1] if b else 0.0)
        j = int(torch.searchsorted(inner, rest[None], right=True)[0])  # inner[j - 1] <= rest < inner[j]: p_j > 0
        # the float32 block sum and the float64 cumulative one may disagree in the last bits: past the block's
        # end, take its last token of probability > 0 (the first index of the cumulative sum's maximum)
        out[i] = start + (j if j < CDF_BLOCK else int(inner.argmax()))
    return out


Sampler = Callable[..., Tensor]  # sampler(logits (B, V), seen (B, V) | None = None, rows=None) -> ids (B,)


def make_sampler(params: SamplingParams, device: torch.device | str = "cpu") -> Sampler:
    """sampler(logits (B, V), seen (B, V) | None, rows: RowProcessors | None) -> token ids (B,).

    Seeded samplers repeat exactly. `rows` holds each row's LogitsProcessors; the caller accept()s the tokens.
    """
    generator = None
    if not params.greedy:
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()

    def sample(logits: Tensor, seen: Tensor | None = None, rows: RowProcessors | None = None) -> Tensor:
        logits = process_logits(logits.float(), params, seen, rows)
        if params.greedy:
            return first_max(logits)
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sample


# quant/kernels.py's first_max, set there when the native kernels load (this layer may not import quant/): None
# where they do not apply
native_first_max: Callable[[Tensor], Tensor | None] | None = None


def first_max(logits: Tensor) -> Tensor:
    """Each row's greedy token, (B, V) -> (B,): the index of its first maximum, as argmax gives it. By the native
    kernels where a quantized model loaded them (quant/argmax.c: 8 rows of a 262k vocabulary in 0.2-0.25 instead of
    0.6-1.6 ms on 2 cores); else torch's max, ~3x faster than its argmax on a CPU vocabulary row."""
    out = native_first_max(logits) if native_first_max is not None else None
    return logits.max(dim=-1).indices if out is None else out


@dataclass
class RowRules:
    """One sequence's rules beyond its SamplingParams: a logit bias, OpenAI's frequency/presence penalties, the
    repetition penalty's set of seen tokens, and its LogitsProcessors. The server keeps one per request row; the
    speculative paths use it to score a draft position with exactly what a plain step would apply there."""

    params: SamplingParams
    processors: Sequence[LogitsProcessor] = ()
    seen: Tensor | None = None  # (1, V) bool: prompt + output so far (repetition penalty)
    counts: Tensor | None = None  # (1, V) float: output tokens so far (frequency/presence penalties)
    frequency: float = 0.0
    presence: float = 0.0
    bias: tuple[Tensor, Tensor] | None = None  # (ids, values)
    generator: torch.Generator | None = None  # the row's own, for drafting and acceptance

    @property
    def plain(self) -> bool:
        """Nothing but the SamplingParams shapes this row's distribution."""
        return not self.processors and self.seen is None and self.counts is None and self.bias is None

    def penalized(self, logits: Tensor, counts: Tensor | None = None) -> Tensor:
        """fp32 logits (1, V) with the logit bias, then the frequency/presence penalties of `counts` (default: the
        row's own) applied; what the sampler then processes."""
        scores = logits.float()
        if self.bias is not None:
            scores = scores.index_add(1, self.bias[0], self.bias[1][None])
        counts = self.counts if counts is None else counts
        if counts is not None:
            scores = scores - counts * self.frequency - (counts > 0).float() * self.presence
        return scores

    def distribution(self, logits: Tensor, seen: Tensor | None, counts: Tensor | None, processors: bool) -> Tensor:
        """The processed logits (1, V) that sampling draws from, given the tokens so far (`seen`, `counts`), with or
        without the row's processors (a drafter proposes without them: they have not seen its earlier drafts)."""
        rows = [self.processors] if processors and self.processors else None
        return process_logits(self.penalized(logits, counts), self.params, seen, rows)
