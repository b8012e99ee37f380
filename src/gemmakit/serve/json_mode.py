"""`response_format={"type": "json_object"}`: token choice constrained so the output is one valid JSON object.

A byte-level pushdown automaton tracks where the text is in the JSON grammar (RFC 8259, top level an object).
Each step the sampler's candidates are tried best-first and the first whose bytes keep the text a valid JSON
prefix is taken; when the object is closed only a stop token is allowed. With Gumbel noise added to the scores
(sampling) or without (greedy), "best valid candidate" is an exact draw from the distribution restricted to valid
tokens, so constraining never changes the relative odds of the tokens it allows. A first-byte mask over the
whole vocabulary prunes most invalid tokens before the scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..tokenizer import Tokenizer

WS = frozenset(b" \t\n\r")
MAX_WS = 24  # longest whitespace run between tokens: enough for indentation, not for a model stuck on spaces
MAX_DEPTH = 64
HEX = frozenset(b"0123456789abcdefABCDEF")
DIGITS = frozenset(b"0123456789")
ESCAPES = frozenset(b'"\\/bfnrt')
NUM_END = frozenset({"0", "int", "frac", "exp"})  # number states where the number may end

# A state is (mode, stack of open containers "{"/"[", aux, whitespace run); immutable, so copies are free.
State = tuple[str, str, object, int]
START: State = ("start", "", None, 0)


def _after_value(stack: str) -> State:
    return ("after", stack, None, 0) if stack else ("done", "", None, 0)


def _value(stack: str, b: int) -> State | None:
    """Begin a value with byte b."""
    if b == ord("{"):
        return ("obj_first", stack + "{", None, 0) if len(stack) < MAX_DEPTH else None
    if b == ord("["):
        return ("arr_first", stack + "[", None, 0) if len(stack) < MAX_DEPTH else None
    if b == ord('"'):
        return ("str", stack, "v", 0)
    if b == ord("-"):
        return ("num", stack, "-", 0)
    if b == ord("0"):
        return ("num", stack, "0", 0)
    if b in DIGITS:
        return ("num", stack, "int", 0)
    for word in (b"true", b"false", b"null"):
        if b == word[0]:
            return ("lit", stack, word[1:], 0)
    return None


def _number(stack: str, sub: str, b: int) -> State | None:
    """Continue a number in sub-state `sub`, or None when b cannot continue it."""
    nxt = None
    if sub == "-":
        nxt = "0" if b == ord("0") else "int" if b in DIGITS else None
    elif sub in ("0", "int"):
        if sub == "int" and b in DIGITS:
            nxt = "int"
        elif b == ord("."):
            nxt = "."
        elif b in b"eE":
            nxt = "e"
    elif sub in (".", "frac"):
        nxt = "frac" if b in DIGITS else ("e" if sub == "frac" and b in b"eE" else None)
    elif sub == "e":
        nxt = "esign" if b in b"+-" else "exp" if b in DIGITS else None
    elif sub in ("esign", "exp"):
        nxt = "exp" if b in DIGITS else None
    return None if nxt is None else ("num", stack, nxt, 0)


def advance(state: State, b: int) -> State | None:
    """The state after byte b, or None if b cannot follow."""
    mode, stack, aux, ws = state
    if mode == "str":
        if b == ord('"'):
            return ("colon", stack, None, 0) if aux == "k" else _after_value(stack)
        if b == ord("\\"):
            return ("esc", stack, aux, 0)
        return None if b < 0x20 else state
    if mode == "esc":
        if b == ord("u"):
            return ("uni", stack, (aux, 4), 0)
        return ("str", stack, aux, 0) if b in ESCAPES else None
    if mode == "uni":
        kind, left = aux
        if b not in HEX:
            return None
        return ("str", stack, kind, 0) if left == 1 else ("uni", stack, (kind, left - 1), 0)
    if mode == "num":
        nxt = _number(stack, aux, b)
        if nxt is not None:
            return nxt
        return advance(_after_value(stack), b) if aux in NUM_END else None
    if mode == "lit":
        if b != aux[0]:
            return None
        return ("lit", stack, aux[1:], 0) if len(aux) > 1 else _after_value(stack)
    if b in WS:  # not before the object: the output starts with "{"
        return (mode, stack, aux, ws + 1) if ws < MAX_WS and mode not in ("start", "done") else None
    if mode == "start":
        return ("obj_first", "{", None, 0) if b == ord("{") else None
    if mode in ("obj_first", "obj_key"):
        if b == ord('"'):
            return ("str", stack, "k", 0)
        return _after_value(stack[:-1]) if mode == "obj_first" and b == ord("}") else None
    if mode == "colon":
        return ("value", stack, None, 0) if b == ord(":") else None
    if mode == "value":
        return _value(stack, b)
    if mode == "arr_first":
        return _after_value(stack[:-1]) if b == ord("]") else _value(stack, b)
    if mode == "after":
        top = stack[-1]
        if b == ord(","):
            return ("obj_key", stack, None, 0) if top == "{" else ("value", stack, None, 0)
        if (top, b) in (("{", ord("}")), ("[", ord("]"))):
            return _after_value(stack[:-1])
    return None


def feed(state: State, data: bytes) -> State | None:
    for b in data:
        state = advance(state, b)
        if state is None:
            return None
    return state


@dataclass
class Vocab:
    """Each token's bytes (b"" for control tokens) and first byte (256 for none), for ids < size."""

    data: list[bytes]
    first: Tensor  # (V,) long

    @classmethod
    def build(cls, tok: Tokenizer, size: int) -> Vocab:
        data = []
        for i in range(size):
            if i >= tok.vocab_size or i in tok.special_ids:
                data.append(b"")
            elif tok.is_byte(i):
                data.append(bytes([int(tok.piece(i)[3:5], 16)]))
            else:
                data.append(tok.piece(i).replace("\u2581", " ").encode("utf-8"))
        first = torch.tensor([d[0] if d else 256 for d in data], dtype=torch.long)
        return cls(data, first)


class JsonConstraint:
    """Per-sequence state; pick() chooses the token, accept() moves past it."""

    def __init__(self, vocab: Vocab, stop_ids: list[int]) -> None:
        self.vocab, self.stop_ids, self.state = vocab, stop_ids, START

    @property
    def done(self) -> bool:
        return self.state[0] == "done"

    def first_byte_mask(self) -> Tensor:
        """(V,) bool: tokens whose first byte can follow (a necessary condition, computed for all at once)."""
        allowed = torch.zeros(257, dtype=torch.bool)
        for b in range(256):
            allowed[b] = advance(self.state, b) is not None
        return allowed[self.vocab.first]

    def pick(self, scores: Tensor, fallback: Tensor) -> int:
        """Best-scoring valid token of scores (V,) (-inf = excluded by the sampler); if the sampler left no
        valid token, the best valid token of fallback (V,), the scores before top-k/top-p/min-p."""
        if self.done:
            stops = torch.tensor(self.stop_ids, device=fallback.device)
            return int(stops[fallback[stops].argmax()])
        mask = self.first_byte_mask().to(scores.device)
        for cand in (scores, fallback):
            for i in _best_first(cand.masked_fill(~mask, float("-inf"))):
                data = self.vocab.data[i]
                if data and feed(self.state, data) is not None:
                    return i
        raise RuntimeError(
            "no token can continue the JSON text"
        )  # unreachable: the vocabulary has every byte

    def accept(self, token: int) -> None:
        if not self.done:
            nxt = feed(self.state, self.vocab.data[token])
            if nxt is None:
                raise RuntimeError(f"token {token} does not continue the JSON text")
            self.state = nxt


def _best_first(scores: Tensor, chunk: int = 64):
    """Ids of the finite entries of scores (V,), highest first, found chunk by chunk."""
    scores = scores.clone()
    while True:
        top = torch.topk(scores, min(chunk, scores.shape[-1]))
        for score, i in zip(top.values.tolist(), top.indices.tolist(), strict=False):
            if score == float("-inf"):
                return
            yield i
        scores[top.indices] = float("-inf")
