"""cpu_share: the thread count follows the cores other programs leave free, within the user's ceiling."""

from __future__ import annotations

import os

import pytest
import torch

from gemmakit import cpu_share

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_getaffinity"),
                                reason="reads /proc/stat")


@pytest.fixture
def fresh(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_share, "_state", cpu_share._State())
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    yield
    torch.set_num_threads(before)


def _fake(monkeypatch, busy: list[float], ours: list[float], clock: list[float]):
    monkeypatch.setattr(cpu_share, "_busy_seconds", lambda cpus: busy.pop(0))
    monkeypatch.setattr(cpu_share, "_clock", lambda: clock.pop(0))
    monkeypatch.setattr(cpu_share, "_our_seconds", lambda: ours.pop(0))


def test_fewer_threads_while_another_program_is_busy_and_back_after(fresh, monkeypatch):
    torch.set_num_threads(4)
    # 1 s apart: our process used 2 CPU s; the cores were busy 3.7, 5.2, then 2 s: others took 1.7, 3.2, 0 cores
    _fake(monkeypatch, busy=[0.0, 3.7, 8.9, 10.9], ours=[0.0, 2.0, 4.0, 6.0], clock=[10.0, 11.0, 12.0, 13.0])
    assert cpu_share.adapt() == 4  # the first sample decides nothing
    assert cpu_share.adapt() == 2 and torch.get_num_threads() == 2  # 1.7 cores: 2 taken (from 0.6 of one), 2 left
    assert cpu_share.adapt() == 1  # 3.2 taken: at least one thread
    assert cpu_share.adapt() == 4  # the other program stopped: back to the user's count


def test_the_users_count_is_the_ceiling_and_fixed_threads_turns_it_off(fresh, monkeypatch):
    torch.set_num_threads(2)
    _fake(monkeypatch, busy=[0.0, 1.0], ours=[0.0, 1.0], clock=[10.0, 11.0])
    cpu_share.adapt()
    assert cpu_share.adapt() == 2  # 4 cores free, the user asked for 2
    monkeypatch.setenv("GEMMAKIT_FIXED_THREADS", "1")
    torch.set_num_threads(3)
    assert cpu_share.adapt() == 3


def test_samples_are_spaced(fresh, monkeypatch):
    torch.set_num_threads(4)
    _fake(monkeypatch, busy=[0.0], ours=[0.0], clock=[10.0, 10.05])
    cpu_share.adapt()
    assert cpu_share.adapt() == 4  # 50 ms later: no new sample (the fakes would run out if it took one)


def test_real_proc_stat_reads():
    assert cpu_share._busy_seconds(os.sched_getaffinity(0)) > 0
