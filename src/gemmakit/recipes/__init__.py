"""The use cases Gemma was launched for, one call each: summaries of long documents, answers from local files."""

from .ask import Answer, Index, Passage, ask, retrieve
from .documents import chunks, read_document
from .summarize import Summary, summarize

__all__ = ["Answer", "Index", "Passage", "Summary", "ask", "chunks", "read_document", "retrieve", "summarize"]
