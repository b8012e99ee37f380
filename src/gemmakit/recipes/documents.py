"""Reading documents and cutting them into pieces that fit a budget, at the most natural boundary available.

A text is tiled by spans (start, end) with no gap and no overlap, so the pieces always cover the whole input:
paragraphs first (blank lines), then sentences, then words, then, for a single "word" too long on its own
(a URL, a table row without spaces), halves of it. Consecutive spans are packed together while they fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import GemmaError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
DOC_SUFFIXES = (*TEXT_SUFFIXES, ".pdf")
# Each boundary ends just after its separator, so the separator stays with the piece before it.
_LEVELS = (re.compile(r"\n[ \t]*\n\s*"),  # paragraphs
           re.compile(r"(?<=[.!?…。！？])[\"')\]]*\s+"),  # sentences
           re.compile(r"\s+"))  # words

Span = tuple[int, int]


def read_document(path: str | Path) -> str:
    """The text of a .txt/.md/.rst file (UTF-8) or of a .pdf (pypdf, the `pdf` extra)."""
    p = Path(path)
    if not p.is_file():
        raise GemmaError(f"{p} is not a file; give a .txt, .md or .pdf document")
    suffix = p.suffix.lower()
    if suffix == ".pdf":
        return _read_pdf(p)
    if suffix not in TEXT_SUFFIXES:
        raise GemmaError(f"{p}: unsupported document type {suffix or '(none)'}; use .txt, .md, .rst or .pdf")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GemmaError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}); convert it first") from e


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as e:
        raise GemmaError("reading PDF files needs pypdf: pip install 'gemmakit[pdf]'") from e
    try:
        pages = [page.extract_text() or "" for page in PdfReader(path).pages]
    except (PdfReadError, OSError, ValueError) as e:
        raise GemmaError(f"{path} could not be read as a PDF ({e}); is it a valid, unencrypted PDF?") from e
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise GemmaError(f"{path} has no extractable text (a scanned PDF needs OCR first)")
    return text


def _cut(text: str, start: int, end: int, level: int) -> list[Span]:
    """Spans of text[start:end] split after each separator of this level."""
    spans, at = [], start
    for m in _LEVELS[level].finditer(text, start, end):
        if m.end() > at and m.end() < end:
            spans.append((at, m.end()))
            at = m.end()
    spans.append((at, end))
    return spans


def units(text: str, fits: Callable[[str], bool], start: int = 0, end: int | None = None,
          level: int = 0) -> list[Span]:
    """The largest natural pieces of text[start:end] that each fit; they tile the range."""
    end = len(text) if end is None else end
    if level == len(_LEVELS):  # one unbreakable run: halve it until the halves fit
        if fits(text[start:end]) or end - start <= 1:
            return [(start, end)]
        mid = (start + end) // 2
        return units(text, fits, start, mid, level) + units(text, fits, mid, end, level)
    out: list[Span] = []
    for a, b in _cut(text, start, end, level):
        out += [(a, b)] if fits(text[a:b]) else units(text, fits, a, b, level + 1)
    return out


def chunks(text: str, size: Callable[[str], int], budget: int) -> list[Span]:
    """Spans tiling `text`, each of size(text[span]) <= budget (summed over its pieces), packed greedily."""
    if budget < 1:
        raise GemmaError(f"no room for any text: the budget is {budget}; give a larger context")
    pieces = units(text, lambda s: size(s) <= budget)
    out: list[Span] = []
    total = 0
    for a, b in pieces:
        n = size(text[a:b])
        if out and total + n <= budget:
            out[-1] = (out[-1][0], b)
            total += n
        else:
            out.append((a, b))
            total = n
    return out
