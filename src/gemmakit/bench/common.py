"""What every benchmark shares: the machine it ran on (CPU and instruction sets), a process's own peak RSS, and
atomic JSON + markdown result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


ISA = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def isa() -> list[str]:
    """The instruction-set extensions that decide kernel speed, as /proc/cpuinfo names them (AVX2 laptops vs
    AVX-512/AMX servers: figures from the two must never be confused)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(flags.split(":", 1)[1].split())
    return [f for f in ISA if f in have]


def machine() -> str:
    """CPU model, core count and instruction sets, e.g. "AMD EPYC, 2 cpus, avx2 fma f16c avx512f ..."."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cpus, {' '.join(isa()) or 'no SIMD flags found'}"


def machine_slug() -> str:
    return f"{date.today().isoformat()}-{platform.node() or 'machine'}"


def write_results(folder: Path, name: str | None, result: dict, table: str, kind: str = "") -> Path:
    """Write folder/name.json (the result) and name.md (its table), each atomically; returns the .json path.
    Without a name: <kind>-<date>-<machine> (<date>-<machine> for the inference benchmark, kind "")."""
    name = name or "-".join(filter(None, (kind, machine_slug())))
    out = folder / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)  # a name with folders (--name runs/today) makes them
    for path, text in ((out, json.dumps(result, indent=1)), (out.with_suffix(".md"), table)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return out


_SPIN = ("import os, sys\nif hasattr(os, 'sched_setaffinity'):\n    os.sched_setaffinity(0, {int(sys.argv[1])})\n"
         "while True:\n    pass\n")


@contextmanager
def busy_core() -> Iterator[int]:
    """A process spinning on one core (the last this process may use) for the duration: a laptop's editor or
    browser. Every engine's threads still get all cores, so a step that waits for its slowest thread shows it.
    Yields the busy core's number (where the OS cannot pin a process, macOS, the spinner runs unpinned)."""
    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) - 1
    spinner = subprocess.Popen([sys.executable, "-c", _SPIN, str(cpu)])
    try:
        yield cpu
    finally:
        spinner.kill()
        spinner.wait()


class Pauses:
    """Seconds this process spent stopped: on a shared machine a scheduler may SIGSTOP it mid-run, and the stop
    would count as run time. A thread ticking every 20 ms sees the stop as a gap; SIGCONT confirms it was one."""

    def __init__(self) -> None:
        self.resumes, self.stopped = 0, 0.0
        if hasattr(signal, "SIGCONT"):
            try:
                signal.signal(signal.SIGCONT, self._resumed)
            except ValueError:  # not the main thread: the gaps alone tell
                pass
        threading.Thread(target=self._tick, daemon=True).start()

    def _resumed(self, *_: object) -> None:
        self.resumes += 1

    def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            time.sleep(0.02)
            now = time.perf_counter()
            if now - last > 0.25:
                self.stopped += now - last - 0.02
            last = now

    def clock(self) -> float:
        """perf_counter less the stops seen so far: a timer for runs that may be stopped."""
        return time.perf_counter() - self.stopped
