"""Threads that fit the cores other programs leave free: a laptop's editor or browser must not halve us.

Every decode step and prefill product splits its work over its threads and waits for the slowest. With one core
kept busy by another program, the thread on that core runs half the time and the whole step with it: the 270M
decoded at 20 instead of 56 tok/s on 2 cores, and prefilled at 117 instead of 917 tok/s (AVX-512 build, a spinning
process on one core). Fewer threads on the free cores are faster than all of them on shared ones.

`adapt()`, called at the start of each forward, samples /proc/stat at most every INTERVAL seconds: the CPU time the
cores we may use spent busy, less our own process's, is what other programs took. The thread count becomes the
cores left free (at least one), never above the count the user set (torch.set_num_threads, --threads), which it
restores once the other program stops. The native kernels give the same results for any thread count, so this
changes speed, not tokens, with one exception: on CPUs with native bf16 (AVX512-BF16, AMX), products of 64 rows
or more (prefills) go through torch's bf16 GEMM (quant/qlinear.py), whose sums depend on the thread count (a
guard score of a 128-token prompt on the 270M: 0.7234 with 2 threads, 0.7278 with 1). GEMMAKIT_FIXED_THREADS=1
turns it off.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

INTERVAL = 0.1  # seconds between samples (/proc/stat counts in 10 ms ticks); gemmakit.load takes the first
TAKEN = 0.6  # a core counts as taken when other programs used this share of it


@dataclass
class _State:
    wall: float = 0.0  # monotonic time of the last sample (0: none yet)
    busy: float = 0.0  # busy seconds of our cores then
    ours: float = 0.0  # this process's CPU seconds then
    chosen: int = 0  # the thread count adapt() last set (0: none yet)
    ceiling: int = 0  # the thread count the user set


_state = _State()
_clock = time.monotonic
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds(cpus: set[int]) -> float | None:
    """Seconds the given cores spent outside idle and iowait since boot; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in rest.split()]
            total += sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal
    return total / _TICK


def _our_seconds() -> float:
    t = os.times()
    return t.user + t.system  # every thread of this process


def adapt() -> int:
    """Set torch's thread count to the cores other programs leave free (see the module doc); returns it."""
    st = _state
    current = torch.get_num_threads()
    if current != st.chosen:  # first call, or the user set a count: that count is the ceiling from now on
        st.ceiling = st.chosen = current
    if os.environ.get("GEMMAKIT_FIXED_THREADS") == "1" or st.ceiling <= 1:
        return st.chosen
    now = _clock()
    if now - st.wall < INTERVAL:
        return st.chosen
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    busy, ours = _busy_seconds(cpus), _our_seconds()
    if busy is None:
        return st.chosen
    if st.wall:
        others = ((busy - st.busy) - (ours - st.ours)) / (now - st.wall)
        want = max(1, min(st.ceiling, len(cpus) - int(others + 1 - TAKEN)))
        if want != st.chosen:
            torch.set_num_threads(want)
            st.chosen = want
    st.wall, st.busy, st.ours = now, busy, ours
    return st.chosen
