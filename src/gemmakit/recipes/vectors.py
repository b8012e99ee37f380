"""Dense retrieval for `ask`: passage embeddings stored beside the BM25 index, searched by brute force with numpy.

Why numpy and not usearch/hnswlib/faiss: at the sizes `ask` serves (a laptop's folder, up to ~100,000 passages) an
exact scan is fast enough and loses no recall. benchmarks/results/vector-store-2026-12-07-vm.md measured 100,000 x
768 float32 vectors (293 MiB) on a shared 2-core machine: the matrix memory-maps in 1 ms (a full read: 1.2 s), and
an exact top-10 (one matrix-vector product + a partial sort) takes 0.15 s warm, 0.18 s when its pages are first
read, next to the encoder's own time for the question. An approximate index would add a dependency, a build step
and recall loss for no visible gain until millions of passages.

Layout, in DOCS/.gemmakit-index/dense-<model key>/: `files/<sha256>.npy`, one matrix per file content (so only a
changed file is re-embedded), and `matrix-<manifest hash>.npy`, every passage in the manifest's order (one file
to map at query time). Both are written to a temporary name and moved into place with os.replace.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..embed import EmbeddingModel

RRF_K = 60  # reciprocal rank fusion constant (Cormack, Clarke and Buettcher, SIGIR 2009)


def model_key(model: EmbeddingModel) -> str:
    """A folder name that changes when the embedding model does (its source, width and prompts)."""
    facts = [str(Path(model.source).resolve()), model.dim, sorted(model.prompts.items()), model.format]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def _prompt(model: EmbeddingModel, name: str) -> str | None:
    """EmbeddingGemma's retrieval prompts: "document" for passages, "query" for questions (when the model has them)."""
    return name if name in model.prompts else None


def _save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class DenseIndex:
    """Unit vectors of every passage, in the order of the BM25 index's passages."""

    def __init__(self, model: EmbeddingModel, matrix: np.ndarray) -> None:
        self.model, self.matrix = model, matrix

    @classmethod
    def open(cls, root: Path, files: dict[str, dict], model: EmbeddingModel,
             on_embed: Callable[[str], None] | None = None) -> DenseIndex:
        """The index for these files (manifest entries with sha256 and passages), embedding only new contents."""
        folder = root / f"dense-{model_key(model)}"
        (folder / "files").mkdir(parents=True, exist_ok=True)
        body = json.dumps([[rel, f["sha256"], len(f["passages"])] for rel, f in files.items()])
        matrix_path = folder / f"matrix-{hashlib.sha256(body.encode()).hexdigest()[:16]}.npy"
        if matrix_path.exists():
            return cls(model, np.load(matrix_path, mmap_mode="r"))
        parts = []
        for rel, f in files.items():
            path = folder / "files" / f"{f['sha256']}.npy"
            if path.exists():
                part = np.load(path)
            else:
                if on_embed is not None:
                    on_embed(rel)
                texts = [p["text"] for p in f["passages"]]
                part = model.embed(texts, prompt_name=_prompt(model, "document"), truncate=True) if texts else (
                    np.zeros((0, model.dim), np.float32))
                _save(path, part)
            parts.append(part)
        matrix = np.concatenate(parts) if parts else np.zeros((0, model.dim), np.float32)
        _save(matrix_path, matrix)
        keep = {matrix_path.name} | {f"{f['sha256']}.npy" for f in files.values()}
        for stale in [*folder.glob("matrix-*.npy"), *(folder / "files").glob("*.npy")]:
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
        return cls(model, np.load(matrix_path, mmap_mode="r"))

    def search(self, query: str, n: int) -> list[tuple[int, float]]:
        """(passage number, cosine) of the n nearest passages, best first."""
        q = self.model.embed(query, prompt_name=_prompt(self.model, "query"), truncate=True)[0]
        return top(self.matrix, q, n)


def top(matrix: np.ndarray, query: np.ndarray, n: int) -> list[tuple[int, float]]:
    """Exact nearest rows by dot product (unit vectors: cosine): one matrix-vector product and a partial sort."""
    if len(matrix) == 0:
        return []
    scores = np.asarray(matrix @ query, dtype=np.float32)
    n = min(n, len(scores))
    best = np.argpartition(-scores, n - 1)[:n]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(i), float(scores[i])) for i in best]


def fuse(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each item scores sum(1 / (k + rank)) over the rankings it appears in (rank from 1)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
