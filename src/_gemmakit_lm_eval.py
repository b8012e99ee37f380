"""Lets `lm_eval --model gemmakit` find gemmakit's model type on lm-eval versions without plugin discovery.

lm-eval 0.4.x (0.4.13 included) resolves --model only against its own registry, filled by lm_eval.models; the
`lm_eval.models` entry point in pyproject.toml serves the versions that discover plugins. This module is imported
at interpreter start by gemmakit-lm-eval.pth and imports nothing heavy: it waits in sys.meta_path until
lm_eval.models is imported, then registers "gemmakit" there as a lazy placeholder (gemmakit itself, and torch,
are imported only when an evaluation asks for the gemmakit model).
"""

import importlib.abc
import importlib.machinery
import sys

NAME, TARGET = "gemmakit", "gemmakit.evaluate.harness:GemmakitLM"


class _RegisterAfter(importlib.abc.Loader):
    """Runs lm_eval.models' own loader, then adds the placeholder (unless a plugin mechanism already did)."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        from lm_eval.api.registry import model_registry

        if NAME not in model_registry:
            model_registry.register(NAME, target=TARGET)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self.inner, name)


class _Watcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "lm_eval.models":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


if not any(isinstance(f, _Watcher) for f in sys.meta_path):
    sys.meta_path.insert(0, _Watcher())
