"""`gemmakit bench`'s own options: --batch parsing, --name with folders, and --busy-core's spinning process
(started, and always ended)."""

from __future__ import annotations

import os

import pytest
import typer

from gemmakit.bench.common import busy_core, write_results
from gemmakit.cli.bench import _batches


def test_batch_sizes_parse_and_bad_ones_name_the_fix():
    assert _batches("1,4,8") == (4, 8)
    assert _batches("8, 4,4") == (4, 8)
    assert _batches("1") == ()
    for bad in ("", "0,4", "four", "1,100"):
        with pytest.raises(typer.BadParameter, match="comma-separated"):
            _batches(bad)


def test_a_name_with_folders_makes_them(tmp_path):
    """--name runs/today: written under the results folder, not a traceback after minutes of measurements."""
    out = write_results(tmp_path / "results", "runs/today", {"a": 1}, "| a |")
    assert out == tmp_path / "results" / "runs" / "today.json"
    assert out.read_text().startswith("{") and out.with_suffix(".md").read_text() == "| a |"
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_busy_core_spins_on_one_core_and_stops():
    with busy_core() as cpu:
        assert cpu in os.sched_getaffinity(0)
        children = [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == os.getpid()]
        assert children, "no spinning process"
    assert all(not os.path.exists(f"/proc/{p}") or _parent(p) != os.getpid() for p in children)


def _parent(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def test_the_avx2_path_takes_no_bf16_tiles(monkeypatch):
    """GEMMAKIT_CFLAGS=-mno-avx512f stands for an AVX2 laptop: its prefill must not borrow this CPU's AMX/bf16."""
    from gemmakit.quant import kernels

    monkeypatch.setenv("GEMMAKIT_CFLAGS", "-mno-avx512f")
    assert not kernels.native_bf16("cpu")
    assert kernels.native_bf16("cuda")
