"""The layout's one rule, checked: imports flow down the layers of docs/STYLE.md (L5 cli/bench -> L0 config), never
up; FastAPI only in serve/, typer only in cli/, torch.distributed only in train/. Function-level imports count too:
a lazy import upward is still a cycle waiting to happen."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gemmakit"

# the first part of a module's name under gemmakit/ -> its layer (docs/architecture.md draws the same picture)
LAYERS = {
    "errors": 0, "cpu_share": 0, "config": 0, "config_gemma3n": 0, "config_gemma4": 0, "disk_cache": 0, "embedded": 0,
    "model": 1, "kv_cache": 1, "moe": 1, "norm": 1, "altup": 1, "tokenizer": 1, "sampling": 1, "grammar": 1, "chat_templates": 1,
    "tool_calls": 2, "weights": 2, "quant": 2, "lora": 2,
    "loader": 3, "api": 3, "embed": 3, "generate": 3, "draft": 3, "draft_gguf": 3, "speculative": 3, "safety": 3, "watermark": 3,
    "evaluate": 3, "recipes": 3,
    "train": 4, "serve": 4,
    "bench": 5, "cli": 5, "__main__": 5,
}
ONLY_IN = {"fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "typer": "cli", "torch.distributed": "train"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved against its package."""
    package = ["gemmakit", *path.relative_to(SRC).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module) if p)
            out += [(node.lineno, f"{name}.{a.name}" if node.module is None else name) for a in node.names]
    return out


def _layer(parts: list[str]) -> int | None:
    return LAYERS.get(parts[0]) if parts else None


def test_every_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops - {"__init__"} <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS) - {'__init__'})}"


def test_imports_flow_down():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel == Path("__init__.py"):
            continue  # the package's front door re-exports the public API from every layer
        here = _layer(list(rel.with_suffix("").parts))
        for line, name in _imports(path):
            for lib, home in ONLY_IN.items():
                if (name == lib or name.startswith(lib + ".")) and rel.parts[0] != home:
                    wrong.append(f"{rel}:{line} imports {name}, which belongs in {home}/ only")
            if name.startswith("gemmakit."):
                there = _layer(name.split(".")[1:])
                if there is not None and here is not None and there > here:
                    wrong.append(f"{rel}:{line} (layer {here}) imports {name} (layer {there})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)
