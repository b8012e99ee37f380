"""Summaries of documents longer than the context: map-reduce (default) or refine over chunks.

The document is cut at paragraph, then sentence boundaries (documents.py) into chunks that fit the context
together with the prompt and the summary to be written. Map-reduce summarizes each chunk, then summarizes the
partial summaries (in groups, repeatedly, when they do not fit at once); refine carries one running summary
through the chunks. Prompts are plain text for base models, or the chat template with `chat=True` for
instruction-tuned ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..api import Model
from ..errors import GemmaError
from .documents import Span, chunks

DEFAULT_CONTEXT = 2048
PLAIN = {
    "map": "{text}\n\nA short summary of the text above, in plain sentences:\n",
    "reduce": "Summaries of consecutive parts of one document:\n\n{text}\n\nA short summary of the whole "
              "document, in plain sentences:\n",
    "refine": "Summary of the document so far:\n{summary}\n\nThe next part of the document:\n{text}\n\n"
              "An updated short summary of the document so far, in plain sentences:\n",
}
CHAT = {
    "map": "Summarize the following text in a few sentences.\n\n{text}",
    "reduce": "These are summaries of consecutive parts of one document. Write one short summary of the whole "
              "document.\n\n{text}",
    "refine": "Here is a summary of a document so far:\n{summary}\n\nUpdate it with the next part of the "
              "document, and reply with the updated summary only.\n\n{text}",
}


@dataclass
class Summary:
    text: str
    chunks: list[Span]  # the spans of the input each summarized (they tile it)
    partials: list[str] = field(default_factory=list)  # per-chunk summaries (map-reduce) or running ones (refine)


@dataclass
class _Summarizer:
    model: Model
    context: int
    max_new_tokens: int
    chat: bool
    sampling: dict

    def prompt(self, kind: str, text: str, summary: str = "") -> list[int]:
        template = (CHAT if self.chat else PLAIN)[kind]
        body = template.format(text=text.strip(), summary=summary.strip())
        if self.chat:
            return self.model.chat_ids([{"role": "user", "content": body}])
        return self.model.encode(body)

    def budget(self, kind: str, summary_room: int = 0) -> int:
        """Tokens of text that fit beside this kind of prompt and the summary it asks for (5% margin: pieces
        are counted one by one and may merge at their boundaries)."""
        overhead = len(self.prompt(kind, "")) + summary_room
        return int((self.context - overhead - self.max_new_tokens) * 0.95)

    def size(self, text: str) -> int:
        assert self.model.tokenizer is not None
        return len(self.model.tokenizer.encode(text, bos=False))

    def run(self, ids: list[int], on_text: Callable[[str], None] | None = None) -> str:
        stop = None if self.chat else ["\n\n"]  # a base model's summary is one paragraph
        if on_text is None:
            return self.model.generate(ids, self.max_new_tokens, stop=stop, **self.sampling).text.strip()
        pieces = []
        for piece in self.model.stream(ids, self.max_new_tokens, stop=stop, **self.sampling):
            if not pieces:
                piece = piece.lstrip()
            pieces.append(piece)
            on_text(piece)
        return "".join(pieces).strip()


def summarize(text: str, *, model: Model | None = None, context: int | None = None, max_new_tokens: int = 200,
              mode: str = "map-reduce", chat: bool = False, temperature: float = 0.0,
              repetition_penalty: float | None = 1.3, seed: int | None = None,
              on_chunk: Callable[[int, int], None] | None = None,
              on_text: Callable[[str], None] | None = None) -> Summary:
    """Summarize `text` of any length (default model: the embedded one). context: tokens per model call
    (default min(2048, model context)). on_chunk(done, total) reports chunks; on_text(piece) receives the final
    summary as it is generated."""
    if mode not in ("map-reduce", "refine"):
        raise GemmaError(f"unknown mode {mode!r}; use 'map-reduce' or 'refine'")
    if not text.strip():
        raise GemmaError("the document is empty: there is nothing to summarize")
    if model is None:
        from ..loader import load

        model = load(progress=False)
    context = min(context or DEFAULT_CONTEXT, model.config.max_position_embeddings)
    s = _Summarizer(model, context, max_new_tokens, chat,
                    {"temperature": temperature, "repetition_penalty": repetition_penalty, "seed": seed})
    room = max_new_tokens if mode == "refine" else 0  # refine prompts also carry the running summary
    budget = s.budget("refine" if mode == "refine" else "map", room)
    if budget < 32:
        raise GemmaError(f"a context of {context} tokens leaves {budget} for text after the prompt and "
                         f"{max_new_tokens} summary tokens; raise --ctx or lower --max-new-tokens")
    spans = chunks(text, s.size, budget)
    report = on_chunk or (lambda done, total: None)
    if mode == "refine":
        return _refine(s, text, spans, report, on_text)
    partials = []
    for i, (a, b) in enumerate(spans):
        if len(spans) == 1:  # a short document: its only summary is the final one
            partials.append(s.run(s.prompt("map", text[a:b]), on_text))
            report(1, 1)
            return Summary(partials[0], spans, partials)
        partials.append(s.run(s.prompt("map", text[a:b])))
        report(i + 1, len(spans))
    return Summary(_reduce(s, partials, on_text), spans, partials)


def _reduce(s: _Summarizer, partials: list[str], on_text: Callable[[str], None] | None) -> str:
    """Summaries of summaries until they fit in one prompt; the last call streams."""
    budget = s.budget("reduce")
    level = partials
    while True:
        joined = "\n\n".join(f"- {p}" for p in level if p)
        if s.size(joined) <= budget or len(level) <= 1:
            return s.run(s.prompt("reduce", joined), on_text)
        groups = chunks(joined, s.size, budget)
        if len(groups) >= len(level):  # no progress possible: each summary alone fills the budget
            raise GemmaError("the partial summaries do not fit the context; lower --max-new-tokens or raise --ctx")
        level = [s.run(s.prompt("reduce", joined[a:b])) for a, b in groups]


def _refine(s: _Summarizer, text: str, spans: list[Span], report: Callable[[int, int], None],
            on_text: Callable[[str], None] | None) -> Summary:
    summary, partials = "", []
    for i, (a, b) in enumerate(spans):
        last = i == len(spans) - 1
        ids = s.prompt("map", text[a:b]) if not summary else s.prompt("refine", text[a:b], summary)
        summary = s.run(ids, on_text if last else None)
        partials.append(summary)
        report(i + 1, len(spans))
    return Summary(summary, spans, partials)
