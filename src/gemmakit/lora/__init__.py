"""LoRA as module swaps: LoRALinear.from_base / merge, inject, and adapters saved in the PEFT file format."""

from .adapter import (
    TARGETS,
    LoRAConfig,
    adapter_state_dict,
    inject,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    unload,
)
from .linear import LoRALinear

__all__ = [
    "TARGETS",
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "inject",
    "load_adapter",
    "merge",
    "read_adapter",
    "save_adapter",
    "unload",
]
