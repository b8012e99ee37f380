"""lm-evaluation-harness runs with gemmakit's defaults (`gemmakit eval tasks`): the model loaded once, batches of
8, results as lm-eval's own table and JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import GemmaError


def _harness() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise GemmaError("lm-eval is not installed; pip install 'gemmakit[eval]'") from e
    return lm_eval


def run_tasks(tasks: str | list[str], *, model: str | None = None, quant: str = "auto", batch_size: int = 8,
              limit: float | None = None, num_fewshot: int | None = None, include_path: str | None = None,
              apply_chat_template: bool = False, output: str | None = None, seed: int = 1234,
              ) -> tuple[dict, str]:
    """Evaluate `tasks` (names, comma-separated or a list) -> (lm-eval's results dict, its markdown table)."""
    lm_eval = _harness()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from .harness import GemmakitLM

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise GemmaError("no task given; pass --tasks NAME[,NAME...] (lm_eval ls tasks lists them)")
    if include_path is not None and not Path(include_path).is_dir():
        raise GemmaError(f"--include-path {include_path} is not a folder of task YAML files")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise GemmaError(f"unknown lm-eval task {unknown[0]!r}; list them with `lm_eval ls tasks` (local YAML "
                         "tasks need --include-path)")
    lm = GemmakitLM(pretrained=model, quant=quant, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, apply_chat_template=apply_chat_template,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, log_samples=False)
    if results is None:
        raise GemmaError("lm-eval returned no results")
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, path)
    return results, make_table(results)
