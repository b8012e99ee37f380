"""Training checkpoints: a folder per step, written under a temporary name and renamed into place (atomic).

checkpoints/step-000100/ holds the adapter in the PEFT format (usable on its own) plus trainer_state.pt: optimizer
and scheduler state, every rank's RNG state and the loss history, which is what `--resume` needs to continue the
exact same trajectory (the data order is a pure function of the seed and the step, see data.step_rows).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import GemmaError
from ..lora.adapter import save_adapter

STATE_NAME = "trainer_state.pt"


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, step: int, module: nn.Module, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step-{step:06d} atomically and delete all but the newest `keep` checkpoints."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(module, tmp)
        torch.save(state, tmp / STATE_NAME)
        if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out: Path) -> list[Path]:
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_NAME).exists()
    )


def latest_checkpoint(out: Path) -> Path:
    found = list_checkpoints(out)
    if not found:
        raise GemmaError(f"--resume: {checkpoint_dir(out)} holds no checkpoint; train without --resume first")
    return found[-1]


def load_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / STATE_NAME, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise GemmaError(
            f"{ckpt / STATE_NAME} cannot be read ({e}); delete that checkpoint folder to resume "
            "from the one before"
        ) from None
