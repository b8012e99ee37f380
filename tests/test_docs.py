"""README.md and docs/ stay true to the code: the site builds with `mkdocs build --strict` (a broken link or anchor
fails), and every code block either runs here or says why it cannot, with an `<!-- illustrative: REASON -->` line
right before it.

What runs: a page's Python blocks in one fresh interpreter, in order (they share state, as a notebook's cells do);
shell blocks with bash, `.venv/bin/` standing for this interpreter's environment; YAML and JSON blocks are parsed.
Both run in a scratch folder that sees the checkout's examples/ and src/, so what they write stays out of it.
README's blocks run in the default suite; docs/'s, a few seconds each on the embedded model, are marked slow.
Mark what needs a download, a server or minutes as illustrative.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})(?P<lang>[\w+-]*)\s*$")
NOTE = re.compile(r"^\s*<!--\s*illustrative:\s*(?P<reason>.*?)\s*-->\s*$")
RUNS = {"python", "sh", "bash", "yaml", "json"}
VENV = re.compile(r"(?<![\w/])\.venv/bin/(gemmakit|python)\b")  # the commands as the docs spell them, from the checkout


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    reason: str | None  # why it does not run, or None when it runs

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang or 'no language'})"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the illustrative note right before it, if any."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent, fence = i, len(m["indent"]), m["fence"]
        body, i = [], i + 1
        while i < len(lines) and lines[i].strip() != fence:
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        note = NOTE.match(before)
        out.append(Block(page, start + 1, m["lang"], "\n".join(body) + "\n", note["reason"] if note else None))
        i += 1
    return out


ALL = [b for page in PAGES for b in blocks(page)]


def test_every_block_runs_or_says_why():
    silent = [str(b) for b in ALL if b.reason is None and b.lang not in RUNS]
    assert not silent, (
        "these blocks neither run (python, sh, yaml, json) nor say why not; put "
        "'<!-- illustrative: REASON -->' on the line before each:\n" + "\n".join(silent)
    )
    unexplained = [str(b) for b in ALL if b.reason is not None and not b.reason]
    assert not unexplained, "an illustrative note needs its reason:\n" + "\n".join(unexplained)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("COLUMNS", "100")
    return env


def _scratch(tmp_path: Path) -> Path:
    for name in ("examples", "src"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _param(item: Any, page: Path, name: str) -> Any:
    return pytest.param(item, id=name, marks=() if page.name == "README.md" else pytest.mark.slow)


PYTHON_PAGES = [p for p in PAGES if any(b.reason is None and b.lang == "python" for b in blocks(p))]
SHELL = [b for b in ALL if b.reason is None and b.lang in ("sh", "bash")]


@pytest.mark.parametrize("page", [_param(p, p, p.name) for p in PYTHON_PAGES])
def test_python_blocks_run(page, tmp_path):
    code = "\n".join(b.code for b in blocks(page) if b.reason is None and b.lang == "python")
    run = subprocess.run([sys.executable, "-c", code], cwd=_scratch(tmp_path), env=_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{page.name}'s Python blocks failed:\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("block", [_param(b, b.page, str(b)) for b in SHELL])
def test_shell_blocks_run(block, tmp_path):
    code = VENV.sub(lambda m: f"{sys.executable} -m gemmakit" if m[1] == "gemmakit" else sys.executable, block.code)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=_scratch(tmp_path), env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{block} failed:\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in ALL if b.reason is None and b.lang in ("yaml", "json")], ids=str)
def test_data_blocks_parse(block):
    (yaml.safe_load if block.lang == "yaml" else json.loads)(block.code)


def test_site_builds_strict(tmp_path):
    """mkdocs-material (the dev extra) builds the site; --strict turns a broken link or anchor into a failure."""
    pytest.importorskip("material")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
