"""Gemma 4's reasoning, split from the reply as it streams: the model writes `<|channel>thought\\n...<channel|>`
before its answer (the channel markers are gemma4.py's). Other generations have no thinking mode."""

from __future__ import annotations

from typing import Any

from .gemma4 import CHANNEL, CHANNEL_END, THOUGHT


def reasoning_splitter(tokenizer: Any) -> ReasoningSplitter | None:
    """A splitter of generated text into reasoning and reply for a Gemma 4 tokenizer; None for other tokenizers."""
    token_id = getattr(tokenizer, "token_id", None)
    start = token_id(CHANNEL) if token_id is not None else None
    end = token_id(CHANNEL_END) if token_id is not None else None
    return ReasoningSplitter(start, end) if start is not None and end is not None else None


class ReasoningSplitter:
    """Routes a generated text stream into the reasoning and the reply, by the channel tokens Gemma 4 emits.

    The model writes `<|channel>thought\\n...reasoning...<channel|>reply`. Generated text drops control tokens, so
    the split is made by token: `observe(token, offset)` records where in the generated text a channel token fell
    (offset = the text's length just after the token was added), and `split(piece)` routes each newly released
    piece of that text. The "thought\\n" label at the start of a channel is dropped, as vLLM's Gemma 4 parser does.
    """

    def __init__(self, start_id: int, end_id: int) -> None:
        self.start_id, self.end_id = start_id, end_id
        self._cuts: list[tuple[int, bool]] = []  # (text offset, inside the channel from there on)
        self._opened = False  # the state after the last observed token
        self._inside = False  # the state at self._pos
        self._pos = 0
        self._label: str | None = None  # reasoning held back while it may still be the "thought\n" label

    def observe(self, token: int, offset: int) -> None:
        if token == (self.end_id if self._opened else self.start_id):
            self._opened = not self._opened
            self._cuts.append((offset, self._opened))

    def split(self, piece: str) -> tuple[str, str]:
        """(reasoning, reply) parts of the next released piece of generated text."""
        reasoning, reply, i = [], [], 0
        while i < len(piece):
            while self._cuts and self._cuts[0][0] <= self._pos:
                _, self._inside = self._cuts.pop(0)
                reasoning.append(self._label or "")
                self._label = "" if self._inside else None
            end = len(piece) if not self._cuts else min(len(piece), i + self._cuts[0][0] - self._pos)
            if self._inside:
                reasoning.append(self._unlabel(piece[i:end]))
            else:
                reply.append(piece[i:end])
            self._pos += end - i
            i = end
        return "".join(reasoning), "".join(reply)

    def finish(self) -> str:
        """Reasoning still held back at the end (a channel that ended inside its label)."""
        held, self._label = self._label or "", None
        return held

    def _unlabel(self, chunk: str) -> str:
        self._label, out = unlabel(self._label, chunk)
        return out


def unlabel(label: str | None, chunk: str) -> tuple[str | None, str]:
    """Drop the "thought\n" label at the start of a thought channel from streamed reasoning: (what is still held
    back while it may be the label, or None once decided; the reasoning to release). `label` is "" at the start of a
    channel, None after its label was decided."""
    if label is None:
        return None, chunk
    held = label + chunk
    if held.startswith(THOUGHT):
        return None, held[len(THOUGHT) :]
    if THOUGHT.startswith(held):
        return held, ""
    return None, held
