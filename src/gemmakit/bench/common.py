"""What every benchmark shares: the machine it ran on (CPU and instruction sets), a process's own peak RSS, and
atomic JSON + markdown result files."""

from __future__ import annotations

import json
import os
import platform
import resource
from datetime import date
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM where /proc has it, since ru_maxrss is not its own on Linux.

    exec records the old address space's high-water mark in ru_maxrss, and a spawned child's old space is its
    parent's, so every engine would inherit the bench parent's peak (the fine-tuning bench's parent holds a 2.4 GB
    fp32 model).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus"


def machine_slug() -> str:
    return f"{date.today().isoformat()}-{platform.node() or 'machine'}"


def write_results(folder: Path, name: str, result: dict, table: str) -> Path:
    """Write folder/name.json (the result) and name.md (its table), each atomically; returns the .json path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{name}.json"
    for path, text in ((out, json.dumps(result, indent=1)), (out.with_suffix(".md"), table)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return out
