"""SynthID-Text watermarking, equal to transformers' SynthIDTextWatermarkLogitsProcessor (spec §7).

Generation: for every candidate token v after the context (the last ngram_len-1 tokens), `depth` pseudo-random bits
g_l(context, v) come from hashing the context, v and the l-th key; a tournament over those bits tilts the
next-token distribution towards tokens with g = 1 (p <- p * (1 + g_l - E_p[g_l]) per layer). The text reads the
same, but its g-values average above the 0.5 of text written without the keys: detect.py measures that.

Exactness with transformers: the same int64 hash with wrap-around, the same sampling table (torch.randint from a
CPU generator seeded with sampling_table_seed), the same float32 operations in the same order, the same state
rules (the context starts as zeros and never sees the prompt; a context seen within the last
context_history_size steps leaves the scores untouched). A speed-up changes nothing in the numbers: when the table
size S is a power of two (the default 2**16), a g-value depends only on (context hash + v) mod S, because every
hash step is multiply-add modulo 2**64 and S divides 2**64. So each layer's g over the whole vocabulary is one
gather from a precomputed (depth, S) table instead of four int64 passes over the vocabulary.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..api import ProcessorFactory
from ..errors import GemmaError
from ..sampling import LogitsProcessor

MULTIPLIER = 6364136223846793005  # the LCG step transformers uses (newlib/musl constants), spec §7.2
INCREMENT = 1
MAX_TABLE = 2**24  # SynthIDTextWatermarkingConfig.validate()
INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class WatermarkConfig:
    """The watermark's settings, in the field names of transformers' SynthIDTextWatermarkingConfig.

    The keys (and the table seed) are the secret: anyone holding them can detect the watermark, and can also
    learn to imitate or scrub it. Generate them with `WatermarkConfig.generate()` (`gemmakit watermark keygen`).
    """

    ngram_len: int  # tokens per n-gram: a g-value hashes the ngram_len - 1 tokens before a token, and the token
    keys: tuple[int, ...]  # one per tournament layer; depth = len(keys)
    context_history_size: int = 1024  # contexts remembered; a repeated context is left unwatermarked
    sampling_table_seed: int = 0  # seeds torch's CPU generator for the table of g-values
    sampling_table_size: int = 2**16  # the table the hashes index (modulo its size)
    skip_first_ngram_calls: bool = False  # leave the first ngram_len - 1 tokens unwatermarked
    debug_mode: bool = False  # transformers' test mode: the model's scores are replaced by uniform ones

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", tuple(self.keys))
        ints = {"ngram_len": self.ngram_len, "context_history_size": self.context_history_size,
                "sampling_table_seed": self.sampling_table_seed, "sampling_table_size": self.sampling_table_size}
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise GemmaError(f"watermark {name} must be an integer, got {value!r}")
        if self.ngram_len < 2:
            raise GemmaError(f"watermark ngram_len must be >= 2 (the context is ngram_len - 1 tokens), "
                             f"got {self.ngram_len}")
        if not self.keys or not all(isinstance(k, int) and not isinstance(k, bool) and INT64[0] <= k <= INT64[1]
                                    for k in self.keys):
            raise GemmaError("watermark keys must be a non-empty list of 64-bit integers, one per layer")
        if not 1 <= self.sampling_table_size <= MAX_TABLE:
            raise GemmaError(f"watermark sampling_table_size must be in 1..2**24, got {self.sampling_table_size}")
        if self.context_history_size < 1:
            raise GemmaError(f"watermark context_history_size must be >= 1, got {self.context_history_size}")
        if not 0 <= self.sampling_table_seed < 2**64:
            raise GemmaError(f"watermark sampling_table_seed must be in 0..2**64-1, got {self.sampling_table_seed}")
        for name in ("skip_first_ngram_calls", "debug_mode"):
            if not isinstance(getattr(self, name), bool):
                raise GemmaError(f"watermark {name} must be true or false")

    @property
    def depth(self) -> int:
        return len(self.keys)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "watermark config") -> WatermarkConfig:
        """From SynthIDTextWatermarkingConfig's fields (also nested as a detector config's "watermarking_config")."""
        if isinstance(data, Mapping) and isinstance(data.get("watermarking_config"), Mapping):
            data = data["watermarking_config"]
        if not isinstance(data, Mapping):
            raise GemmaError(f"{where}: expected a JSON object with 'ngram_len' and 'keys'")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise GemmaError(f"{where}: unknown field(s) {sorted(unknown)}; SynthIDTextWatermarkingConfig has "
                             f"{', '.join(sorted(known))}")
        missing = {"ngram_len", "keys"} - set(data)
        if missing:
            raise GemmaError(f"{where}: missing {', '.join(sorted(missing))}")
        keys = data["keys"]
        if not isinstance(keys, list | tuple):
            raise GemmaError(f"{where}: 'keys' must be a list of integers")
        return cls(**{**data, "keys": tuple(keys)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WatermarkConfig:
        p = Path(path)
        if not p.is_file():
            raise GemmaError(f"{p}: no such keys file; create one with `gemmakit watermark keygen {p}`")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GemmaError(f"{p}: not valid JSON ({e})") from None
        return cls.from_dict(data, str(p))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "keys": list(self.keys)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keys file atomically, readable by its owner only (the keys are a secret)."""
        p = Path(path)
        if not p.parent.is_dir():
            raise GemmaError(f"{p}: folder {p.parent} does not exist; create it first")
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def generate(cls, *, depth: int = 30, ngram_len: int = 5, **settings: Any) -> WatermarkConfig:
        """Fresh secret keys (and table seed) from the OS's random source; below 2**53 so any JSON reader keeps
        them exact. 30 layers as in the SynthID paper's experiments; ngram_len 5 as transformers' example."""
        if depth < 1:
            raise GemmaError(f"depth must be >= 1, got {depth}")
        settings.setdefault("sampling_table_seed", secrets.randbelow(2**53))
        return cls(ngram_len=ngram_len, keys=tuple(secrets.randbelow(2**53) for _ in range(depth)), **settings)


def accumulate_hash(h: Tensor, data: Tensor) -> Tensor:
    """h <- (h + d) * MULTIPLIER + INCREMENT for each d along data's last axis, in int64 with wrap-around."""
    for i in range(data.shape[-1]):
        h = (h + data[..., i]) * MULTIPLIER + INCREMENT
    return h


class GValues:
    """The g-values of a keys config: g_l(context, v) in {0, 1} for every layer l."""

    def __init__(self, config: WatermarkConfig) -> None:
        self.config = config
        size = config.sampling_table_size
        generator = torch.Generator(device="cpu").manual_seed(config.sampling_table_seed)
        self.table = torch.randint(0, 2, (size,), generator=generator)  # as transformers draws it on a CPU
        self.keys = torch.tensor(config.keys, dtype=torch.long)
        self.by_residue: Tensor | None = None
        if size & (size - 1) == 0:  # (depth, S): row l, column x = g_l of any (context, v) with c + v = x mod S
            x = torch.arange(size, dtype=torch.long)
            ngram = x * MULTIPLIER + INCREMENT
            index = ((ngram[None] + self.keys[:, None]) * MULTIPLIER + INCREMENT) % size
            self.by_residue = self.table[index].to(torch.uint8)
        self._periodic: Tensor | None = None  # by_residue repeated along the vocabulary: (depth, S + V)

    @property
    def depth(self) -> int:
        return self.config.depth

    def context_hash(self, context: Tensor) -> Tensor:
        """(..., ngram_len - 1) token ids -> (...) int64 hashes, seeded with 1 as in transformers."""
        return accumulate_hash(torch.ones(context.shape[:-1], dtype=torch.long), context.long())

    def layers(self, c: Tensor, v: Tensor) -> Iterator[Tensor]:
        """g_l for l = 0..depth-1 (int64) in the broadcast shape of context hashes c and tokens v."""
        size = self.config.sampling_table_size
        if self.by_residue is not None:
            x = (c % size + v) % size  # no overflow: c % size < 2**24
            for row in self.by_residue:
                yield row[x].long()
            return
        ngram = (c + v) * MULTIPLIER + INCREMENT  # int64 wrap-around, as transformers
        for key in self.keys:
            yield self.table[((ngram + key) * MULTIPLIER + INCREMENT) % size]

    def vocab_layers(self, c: int, vocab: int) -> Iterator[Tensor]:
        """g_l(c, v) for v = 0..vocab-1, one (vocab,) tensor per layer. With a power-of-two table these are views
        of one periodic array at offset c mod S (no hashing, no gather); otherwise transformers' full hash."""
        if self.by_residue is None:
            yield from self.layers(torch.tensor(c), torch.arange(vocab))
            return
        size = self.config.sampling_table_size
        if self._periodic is None or self._periodic.shape[1] < size + vocab:
            reps = -(-(size + vocab) // size)
            self._periodic = self.by_residue.repeat(1, reps)
        start = c % size
        for row in self._periodic:
            yield row[start : start + vocab]

    def of_ngrams(self, ids: Tensor) -> Tensor:
        """Token ids (B, T) -> g-values (B, T - ngram_len + 1, depth): window t scores token t + ngram_len - 1
        with the ngram_len - 1 tokens before it (transformers' compute_g_values)."""
        windows = ids.long().unfold(1, self.config.ngram_len, 1)
        c, v = self.context_hash(windows[..., :-1]), windows[..., -1]
        return torch.stack(list(self.layers(c, v)), dim=-1)


@cache
def gvalues_for(config: WatermarkConfig) -> GValues:
    """One GValues per config (building the tables costs ~50 ms)."""
    return GValues(config)


def tournament(scores: Tensor, g_layers: Iterator[Tensor]) -> Tensor:
    """transformers' update_scores: softmax, then per layer p <- p * (1 + g - sum(g * p)), then log; -inf (a token
    cut by top-k/top-p) becomes float32's lowest finite value, as there."""
    probs = torch.softmax(scores, dim=1)
    for g in g_layers:
        mass = (g * probs).sum(dim=1, keepdim=True)
        probs = probs * (1 + g - mass)
    out = torch.log(probs)
    return torch.where(torch.isfinite(out), out, torch.finfo(out.dtype).min)


class WatermarkState:
    """One generation's watermark over a batch of B rows: call it with each step's processed scores (B, V).

    Equal to SynthIDTextWatermarkLogitsProcessor.__call__: `last` is each row's token chosen at the previous
    step (None on the first call, whose context is all zeros), and the result is what sampling draws from.
    """

    def __init__(self, gvalues: GValues, batch: int) -> None:
        cfg = gvalues.config
        self.g, self.config = gvalues, cfg
        self.context = torch.zeros(batch, cfg.ngram_len - 1, dtype=torch.long)
        self.history = torch.zeros(batch, cfg.context_history_size, dtype=torch.long)
        self.calls = 0

    def __call__(self, scores: Tensor, last: Tensor | None) -> Tensor:
        cfg = self.config
        if self.calls > 0:
            if last is None:
                raise ValueError("every call after the first needs the tokens chosen at the previous step")
            self.context = torch.cat([self.context[:, 1:], last.reshape(-1, 1).long().cpu()], dim=1)
        self.calls += 1
        if cfg.skip_first_ngram_calls and self.calls < cfg.ngram_len:
            return scores
        if cfg.debug_mode:
            scores = torch.ones_like(scores)
        c = self.g.context_hash(self.context)  # (B,)
        repeated = (self.history == c[:, None]).any(dim=1).tolist()
        self.history = torch.cat([c[:, None], self.history[:, :-1]], dim=1)
        out = scores.clone()
        for b, (hash_b, seen) in enumerate(zip(c.tolist(), repeated, strict=True)):
            if not seen:  # a context seen within the history keeps its scores (transformers' repetition rule)
                layers = (g.to(scores.device) for g in self.g.vocab_layers(hash_b, scores.shape[1]))
                out[b] = tournament(scores[b : b + 1], layers)[0]
        return out


class WatermarkProcessor(LogitsProcessor):
    """One sequence's watermark on the per-row logits-processor hook (sampling.py): the "warp" stage, after
    temperature/top-k/top-p/min-p, where transformers puts its watermark processor."""

    stage = "warp"

    def __init__(self, gvalues: GValues) -> None:
        self.state = WatermarkState(gvalues, 1)
        self.last: Tensor | None = None

    def process(self, logits: Tensor) -> Tensor:
        return self.state(logits[None], self.last)[0]

    def accept(self, token: int) -> None:
        self.last = torch.tensor([token])


class Watermark:
    """A factory of per-sequence watermark processors, for the `logits_processors=` of generate/stream/chat:

        model.generate(prompt, 64, temperature=0.8, logits_processors=Watermark("keys.json"))
    """

    def __init__(self, keys: str | os.PathLike[str] | WatermarkConfig | Mapping[str, Any]) -> None:
        self.config = load_config(keys)
        self.gvalues = gvalues_for(self.config)

    def __call__(self) -> list[LogitsProcessor]:
        return [WatermarkProcessor(self.gvalues)]


def with_watermark(factory: ProcessorFactory | None, watermark: Watermark | None) -> ProcessorFactory | None:
    """A processor factory that adds the watermark's processor to `factory`'s (e.g. a grammar's)."""
    if watermark is None or factory is None:
        return watermark or factory
    return lambda: [*factory(), *watermark()]


def load_config(keys: str | os.PathLike[str] | WatermarkConfig | Mapping[str, Any]) -> WatermarkConfig:
    """A WatermarkConfig from a keys file path, a dict of its fields, or itself."""
    if isinstance(keys, WatermarkConfig):
        return keys
    if isinstance(keys, Mapping):
        return WatermarkConfig.from_dict(keys)
    return WatermarkConfig.load(keys)

