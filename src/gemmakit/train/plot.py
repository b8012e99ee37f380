"""The loss curve of a run as a small PNG (matplotlib, imported only when asked for)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import GemmaError


def plot_loss(
    history: Sequence[dict[str, Any]], path: str | Path, *, title: str = "fine-tuning loss"
) -> Path:
    """Training loss per step (and validation loss where measured), written atomically as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GemmaError("plotting the loss needs matplotlib: pip install matplotlib") from None
    from ..weights.writers import atomic_write

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1.2, label="train")
    val = [r for r in history if "val_loss" in r]
    if val:
        ax.plot(
            [r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, lw=1.2, label="validation"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
