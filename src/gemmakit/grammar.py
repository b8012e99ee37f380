"""Constrained decoding: JSON Schemas, regexes and Lark/GBNF grammars compiled by llguidance over our tokenizer.

A `Grammar` is compiled once per request; each sequence gets a `GrammarProcessor` (a LogitsProcessor, see its
contract in sampling.py) whose llguidance matcher computes, at every step, the bitmask of the vocabulary tokens
that keep the output a prefix of the language, over the model's whole vocabulary. Forbidden tokens get -inf before
temperature/top-k/top-p/min-p, so every sampler draws from the allowed tokens only, with their relative odds
unchanged; once the grammar is complete only the stop tokens remain, so the text always parses when the
generation ends with "stop".

Why llguidance (and not xgrammar; measured on this tokenizer by `gemmakit bench --structured`): a ~10 MB wheel with
no dependencies, where xgrammar pulls transformers, triton and a TVM runtime; its masks are computed lazily per
step in ~0.02-0.2 ms on our 262k vocabulary with no per-schema compile step, where xgrammar precompiles every
schema; it reads Lark and GBNF (llama.cpp's grammar format) as well as JSON Schema and regexes; and it drops the
GIL while computing a mask, so the next mask can be computed on a worker thread while the model's forward runs.

The engine's tokenizer is built from gemmakit's own SentencePiece tokenizer (tokenizer.py), never from a hub
download: every id's bytes (byte-fallback pieces as their byte, U+2581 as a space), control tokens marked special
so no grammar can produce them, the model's stop tokens as EOS.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import GemmaError
from .sampling import LogitsProcessor
from .tokenizer import Tokenizer

try:
    import llguidance as llg
except ImportError:  # pragma: no cover - a dependency; a clear message if it was removed
    llg = None

_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], Any] = {}
_LOCK = threading.Lock()
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemmakit-grammar")


def _llguidance() -> Any:
    if llg is None:
        raise GemmaError("constrained decoding needs llguidance: pip install llguidance")
    return llg


class _Vocab:
    """What llguidance.TokenizerWrapper reads: each id's bytes, the special ids, and an encoder."""

    def __init__(self, tok: Tokenizer, eos: int) -> None:
        self.eos_token_id, self.bos_token_id = eos, tok.bos_id
        self.special_token_ids = sorted(tok.special_ids)
        self.tokens = [token_bytes(tok, i) for i in range(tok.vocab_size)]
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes, then falls back to str
            raise TypeError("text only")
        return self._tok.encode(text, bos=False)


def token_bytes(tok: Tokenizer, i: int) -> bytes:
    """The bytes id `i` stands for in generated text (a control token: its name, marked special elsewhere)."""
    piece = tok.piece(i)
    if tok.is_byte(i):
        return bytes([int(piece[3:5], 16)])
    return piece.encode("utf-8") if i in tok.special_ids else piece.replace("\u2581", " ").encode("utf-8")


def engine_tokenizer(tok: Tokenizer, vocab_size: int, stop_ids: Collection[int]) -> Any:
    """llguidance's tokenizer for `tok` (cached: building it walks the 262k pieces once, ~1-3 s)."""
    lib = _llguidance()
    stops = tuple(sorted(stop_ids))
    key = (id(tok), vocab_size, stops)
    with _LOCK:
        if key not in _TOKENIZERS:
            wrapper = lib.TokenizerWrapper(_Vocab(tok, stops[0]))
            _TOKENIZERS[key] = (tok, lib.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=list(stops)))
        return _TOKENIZERS[key][1]


@dataclass(frozen=True)
class Grammar:
    """A compiled, validated constraint: llguidance's grammar text, and what it came from (for parsing)."""

    text: str  # llguidance's grammar definition
    kind: str  # "json_schema", "regex", "grammar"
    schema: Mapping[str, Any] | None = None  # the JSON Schema, for json_schema
    model: Any = None  # the pydantic class the schema came from, if any

    def parse(self, text: str) -> Any:
        """The value of a complete output: the validated pydantic object, the JSON value, or the text itself."""
        if self.model is not None:
            return self.model.model_validate_json(text)
        return json.loads(text) if self.kind == "json_schema" else text


def closed(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists properties and says nothing
    else, as OpenAI's SDK sends a pydantic model: extra keys only waste a small model's tokens."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def schema_of(spec: Any) -> tuple[dict[str, Any], Any]:
    """(JSON Schema, pydantic class or None) from a dict, a JSON string or a pydantic model class (whose objects
    are closed to extra keys, see closed())."""
    if isinstance(spec, type) and hasattr(spec, "model_json_schema"):
        return closed(spec.model_json_schema()), spec
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise GemmaError(f"the JSON Schema is not valid JSON ({e})") from None
    if isinstance(spec, bool):
        spec = {} if spec else {"not": {}}
    if not isinstance(spec, Mapping):
        raise GemmaError(f"a JSON Schema must be an object (dict) or a pydantic model class, got {type(spec).__name__}")
    return dict(spec), None


def compile_grammar(*, json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                    lark: str | None = None) -> Grammar:
    """Exactly one of: a JSON Schema (dict, JSON text or pydantic class), a regex, a Lark or GBNF grammar (`grammar`;
    GBNF is recognised by its `::=` rules), or raw Lark in llguidance's dialect (`lark`). Bad input: GemmaError."""
    given = [n for n, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar), ("lark", lark))
             if v is not None]
    if len(given) != 1:
        raise GemmaError(f"give exactly one of json_schema, regex or grammar (got {', '.join(given) or 'none'})")
    lib = _llguidance()
    schema, model = None, None
    try:
        if json_schema is not None:
            schema, model = schema_of(json_schema)
            # Fixed separators as json.dumps writes them: free whitespace lets a small model pad forever.
            text = lib.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
            kind = "json_schema"
        elif regex is not None:
            text, kind = lib.grammar_from("regex", _str(regex, "regex")), "regex"
        elif grammar is not None:
            fmt = "gbnf" if "::=" in _str(grammar, "grammar") else "lark"
            text, kind = lib.grammar_from(fmt, grammar), "grammar"
        else:
            text, kind = lib.grammar_from("lark", _str(lark, "lark")), "grammar"
    except (ValueError, TypeError, RuntimeError) as e:
        raise GemmaError(f"invalid {given[0]}: {_first_line(e)}") from None
    error = lib.LLMatcher.validate_grammar(text)
    if error:
        raise GemmaError(f"invalid {given[0]}: {_first_line(error)}")
    return Grammar(text, kind, schema, model)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise GemmaError(f"{name} must be a non-empty string")
    return value


def _first_line(e: object) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _spare_core() -> bool:
    """Whether this process may use more cores than the model's compute threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


class GrammarProcessor(LogitsProcessor):
    """One sequence's grammar state: masks its logits to the tokens the grammar allows next.

    After each accept() the next mask is computed on a worker thread (llguidance drops the GIL), so it overlaps
    the model's forward, when a core is free for that thread (more cores than compute threads); otherwise, and with
    background=False, it is computed in process(). On 2 cores decoding with 2 threads the worker thread can only
    take a core from the forward: masks cost 11-14% of tok/s on it against 2-7% inline at batch 1, 11-13% against
    9-12% at batch 8 (three runs of `gemmakit bench --structured`).
    """

    stage = "mask"

    def __init__(self, grammar: Grammar, tokenizer: Any, *, background: bool | None = None) -> None:
        lib = _llguidance()
        self.matcher = lib.LLMatcher(tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise GemmaError(f"invalid grammar: {_first_line(self.matcher.get_error())}")
        self.vocab, self.stop_ids = tokenizer.vocab_size, frozenset(tokenizer.eos_tokens)
        self.ended = False  # a stop token was accepted
        self.bits = np.zeros((self.vocab + 31) // 32, dtype=np.int32)
        self.background = _spare_core() if background is None else background
        self.pending: Future | None = None
        self._compute()

    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)

    def _compute(self) -> None:
        if self.background:
            self.pending = _WORKER.submit(self._fill)
        else:
            self.pending = None
            self._fill()

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def allowed(self) -> Tensor:
        """(vocab,) bool: the tokens the grammar allows next."""
        return ~self._forbidden()

    def _allowed_ids(self) -> np.ndarray | None:
        """The allowed ids when they are few (a JSON key, a bracket, a digit...), else None."""
        self._wait()
        words = np.flatnonzero(self.bits)
        if len(words) > len(self.bits) // 16:
            return None
        bits = np.unpackbits(self.bits[words].view(np.uint8), bitorder="little").reshape(len(words), 32)
        row, col = np.nonzero(bits)
        return words[row] * 32 + col

    def _forbidden(self) -> Tensor:
        self._wait()
        bits = np.unpackbits(~self.bits.view(np.uint8), bitorder="little")[: self.vocab]
        return torch.from_numpy(bits.view(np.bool_))

    def process(self, logits: Tensor) -> Tensor:
        if self.ended:  # after a stop token (reached only with ignore_eos): nothing left to constrain
            return logits.clone()
        ids = self._allowed_ids()
        if ids is not None:  # few allowed: write them into a row of -inf (a memset and a gather, ~0.1 ms)
            keep = torch.from_numpy(ids[ids < logits.shape[0]]).to(logits.device)
            return torch.full_like(logits, float("-inf")).index_copy_(0, keep, logits[keep])
        forbidden = self._forbidden().to(logits.device)
        if forbidden.shape[0] < logits.shape[0]:  # ids past the engine's vocabulary are never allowed
            pad = torch.ones(logits.shape[0] - forbidden.shape[0], dtype=torch.bool, device=logits.device)
            forbidden = torch.cat([forbidden, pad])
        return logits.masked_fill(forbidden[: logits.shape[0]], float("-inf"))  # one pass over the row

    def accept(self, token: int) -> None:
        self._wait()
        if self.ended:
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        self.ended = token in self.stop_ids
        if not self.ended:
            self._compute()

    def valid_prefix(self, draft: Sequence[int]) -> int:
        self._wait()
        return 0 if self.ended else self.matcher.validate_tokens(list(draft))

    @property
    def done(self) -> bool:
        """Whether the grammar is complete (its output parses) or stopped."""
        self._wait()
        return self.matcher.is_accepting() or self.matcher.is_stopped()
