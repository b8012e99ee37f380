"""kernels.build probes how to compile: a compiler without OpenMP (Apple's clang) gets the pthread team, one line
says what was chosen, and the choice is cached (the next build is a cache hit, silent)."""

import shutil
import subprocess

import pytest

from gemmakit.quant import kernels

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def test_a_compiler_without_openmp_builds_the_pthread_team(tmp_path, monkeypatch, capsys):
    cc = tmp_path / "cc-without-openmp"
    cc.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "no -fopenmp" >&2; exit 1; }; done\n'
        'exec gcc "$@"\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("GEMMAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GEMMAKIT_CFLAGS", raising=False)
    path = kernels.build()
    assert path is not None and path.exists()
    line = capsys.readouterr().err.strip()
    assert line.startswith("gemmakit: native kernels built with cc-without-openmp") and "pthread team" in line
    assert (
        kernels.build() == path and capsys.readouterr().err == ""
    )  # cached: no second probe, no second line
    symbols = subprocess.run(["nm", "-D", str(path)], capture_output=True, text=True).stdout
    assert "GOMP_parallel" not in symbols and "team_run" in symbols
