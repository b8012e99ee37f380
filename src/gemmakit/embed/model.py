"""EmbeddingModel: the bidirectional Gemma encoder + pooling head + tokenizer, and `embed(texts) -> [n, dim]`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from ..config import GemmaConfig
from ..errors import GemmaError
from ..model import Gemma
from ..tokenizer import Tokenizer
from .head import Head, HeadSpec

TOKENS_PER_BATCH = 8192  # tokens per forward (packed, no padding): bounds activation memory on long inputs
PROGRESS_AFTER = 256  # texts: a bar on stderr (a terminal only) from this many on


@dataclass(frozen=True)
class Wrap:
    """The special tokens the reference tokenizer puts around every text (EmbeddingGemma: both)."""

    bos: bool = True
    eos: bool = False


@dataclass
class EmbeddingModel:
    module: Gemma  # the encoder: config.use_bidirectional_attention
    head: Head
    tokenizer: Tokenizer
    wrap: Wrap
    spec: HeadSpec  # prompts, default prompt, Matryoshka-able width
    max_tokens: int  # per text, special tokens included
    source: str
    format: str  # "hf" or "gguf"

    @property
    def config(self) -> GemmaConfig:
        return self.module.config

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.spec.prompts)

    @property
    def dim(self) -> int:
        return self.head.dim or self.config.hidden_size

    def tokenize(self, text: str, *, prompt_name: str | None = None, truncate: bool = False) -> list[int]:
        """The ids the reference feeds the encoder: [<bos>] prompt + text [<eos>], at most max_tokens of them."""
        if not isinstance(text, str):
            raise GemmaError(f"embed() takes strings; got {type(text).__name__}")
        body = self.tokenizer.encode(self._prompt(prompt_name) + text, bos=False)
        return self.wrap_ids(body, truncate=truncate)

    def wrap_ids(self, body: Sequence[int], *, truncate: bool = False) -> list[int]:
        cfg = self.config
        head = [cfg.bos_token_id] if self.wrap.bos else []
        tail = [cfg.eos_token_id] if self.wrap.eos else []
        room = self.max_tokens - len(head) - len(tail)
        if len(body) > room:
            if not truncate:
                raise GemmaError(f"a text has {len(body) + len(head) + len(tail)} tokens, over this model's "
                                 f"{self.max_tokens}; shorten it, split it, or pass truncate=True to cut it")
            body = body[:room]  # as transformers truncates: the text, then the special tokens around it
        bad = [i for i in body if not 0 <= int(i) < cfg.vocab_size]
        if bad:
            raise GemmaError(f"token id {bad[0]} is outside this model's vocabulary (0..{cfg.vocab_size - 1})")
        return head + [int(i) for i in body] + tail

    def _prompt(self, name: str | None) -> str:
        name = name if name is not None else self.spec.default_prompt_name
        if name is None:
            return ""
        if name not in self.spec.prompts:
            known = ", ".join(self.spec.prompts) or "none"
            raise GemmaError(f"unknown prompt {name!r}; this model's prompts: {known}")
        return self.spec.prompts[name]

    def embed(self, texts: str | Sequence[str], prompt_name: str | None = None, dimensions: int | None = None,
              truncate: bool = False, *, batch_size: int = 32, progress: bool | None = None) -> np.ndarray:
        """float32 [n, dim] unit vectors, one per text (a single string gives [1, dim]).

        prompt_name: one of `prompts` (EmbeddingGemma: "query", "document", ...), prepended to every text.
        dimensions: a Matryoshka width (EmbeddingGemma: 512, 256, 128): the first `dimensions` values, re-normalised.
        truncate: cut texts over the model's limit instead of refusing them.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        ids = [self.tokenize(t, prompt_name=prompt_name, truncate=truncate) for t in items]
        return self.embed_ids(ids, dimensions=dimensions, batch_size=batch_size, progress=progress)

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 0 < dimensions <= self.dim):
            raise GemmaError(f"dimensions={dimensions!r}: give a whole number in 1..{self.dim} (EmbeddingGemma's "
                             "Matryoshka widths: 768, 512, 256, 128)")

    @torch.inference_mode()
    def embed_ids(self, ids: Sequence[Sequence[int]], *, dimensions: int | None = None, batch_size: int = 32,
                  progress: bool | None = None) -> np.ndarray:
        """Embeddings of already-wrapped token id lists (see `tokenize`), packed end to end in batches."""
        self.check_dimensions(dimensions)
        for row in ids:
            if len(row) > self.max_tokens:
                raise GemmaError(f"an input has {len(row)} tokens, over this model's {self.max_tokens}")
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        show = progress if progress is not None else len(ids) >= PROGRESS_AFTER and sys.stderr.isatty()
        bar = Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), disable=not show, transient=True)
        with bar:
            task = bar.add_task("embedding", total=len(ids))
            for batch in _batches(ids, batch_size):
                out[batch] = self._forward([ids[i] for i in batch]).cpu().numpy()
                bar.advance(task, len(batch))
        if dimensions is not None and dimensions < out.shape[1]:
            out = out[:, :dimensions]
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _forward(self, rows: list[Sequence[int]]) -> torch.Tensor:
        """(B, dim) fp32 for B texts packed end to end in one row: no padding reaches the linear layers (padding
        to the longest text cost 1.6x the tokens on mixed-length retrieval chunks), and each text attends only to
        itself (model.py `spans`), so the result equals embedding it alone."""
        lengths = [len(r) for r in rows]
        if min(lengths) == 0:
            raise GemmaError("an input has no tokens; embed at least one token per text")
        ids = torch.tensor([i for r in rows for i in r], dtype=torch.long)[None]  # (1, N)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, N): each text from 0
        ends = torch.tensor(lengths).cumsum(0).tolist()
        spans = [(e - n, e) for n, e in zip(lengths, ends, strict=True)]
        dev = self.module.device
        hidden = self.module.hidden_states(ids.to(dev), pos.to(dev), spans=spans)
        return self.head(hidden[0], lengths)


def _batches(ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices in order, grouped into at most batch_size texts and about TOKENS_PER_BATCH tokens per forward."""
    groups: list[list[int]] = []
    used = 0
    for i, row in enumerate(ids):
        if groups and len(groups[-1]) < batch_size and used + len(row) <= TOKENS_PER_BATCH:
            groups[-1].append(i)
            used += len(row)
        else:
            groups.append([i])
            used = len(row)
    return groups
