"""The fast CPU path for GGUF files: Q8_0 weight-only layers, converted once and cached, loaded by memory map.

Q8_0 tensors (the 270M's tied embedding/LM head) are used from the GGUF's own mapping. Other quantized types
(Q4_K, Q5_0, Q6_K, ...) are dequantized and re-quantized to Q8_0 on the first load, behind a progress bar, and
written atomically to the cache (~/.cache/gemmakit/q8/), so a warm load only maps files: no tensor is read
until it is used. Norms stay float (they are tiny and need the exact 1 + w of the reference path).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from .config import GemmaConfig
from .embedded import cache_dir
from .model import Gemma, RMSNorm
from .quant.fused import attach as attach_fused_decode
from .quant.q8 import fuse_blocks, quantize_q8, swap_in_fast_norms, swap_in_q8
from .weights.gguf import GGMLQuantizationType, GGUFFile, hf_name, hf_tensor

CACHE_VERSION = "2"
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


def is_quantized(g: GGUFFile) -> bool:
    return any(t.qtype not in _FLOAT_TYPES for t in g.tensors.values())


def _cache_path(g: GGUFFile) -> Path:
    st = g.path.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}|{g.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "q8" / f"{g.path.stem}-{key[:16]}"


def _convert(g: GGUFFile, names: dict[str, str], target: Path, progress: bool) -> None:
    """Q8_0 blocks of the GGUF tensors `names` (GGUF -> HF name), q/k/v and gate/up fused, written to
    target.bin + target.json atomically (temp files, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    blocks: dict[str, torch.Tensor] = {}
    with Progress(TextColumn("converting weights for the fast path (once)"), BarColumn(), MofNCompleteColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task("convert", total=len(names))
        for name, hf in names.items():
            t = g.tensors[name]
            raw = g.raw(name).reshape(t.shape[0], -1) if t.qtype == GGMLQuantizationType.Q8_0 else None
            blocks[hf] = torch.from_numpy(raw.copy() if raw is not None else quantize_q8(g.dequantize(name)))
            bar.advance(task)
    index: dict[str, list[int]] = {}
    tmp_bin = target.with_suffix(f".bin.tmp{os.getpid()}")
    with tmp_bin.open("wb") as f:
        for hf, b in fuse_blocks(blocks).items():
            index[hf] = [f.tell(), *b.shape]
            f.write(b.numpy().tobytes())
    tmp_json = target.with_suffix(f".json.tmp{os.getpid()}")
    tmp_json.write_text(json.dumps(index))
    os.replace(tmp_bin, target.with_suffix(".bin"))
    os.replace(tmp_json, target.with_suffix(".json"))  # the index last: its presence means the cache is complete


def load_gguf_q8(g: GGUFFile, cfg: GemmaConfig, *, dtype: torch.dtype, progress: bool) -> Gemma:
    """A CPU Gemma whose linears and tied embedding are Q8Linear/Q8Embedding over mapped Q8_0 blocks."""
    quantized, floats = {}, {}
    for name, t in g.tensors.items():
        hf = hf_name(g, name, cfg.family)
        (floats if t.qtype in _FLOAT_TYPES or name.endswith("norm.weight") else quantized)[name] = hf
    # Q8_0 matrices outside the layers (the tied embedding) are used from the GGUF's own mapping; layer
    # matrices go through the cache, where they are stored fused.
    direct = {n: hf for n, hf in quantized.items()
              if g.tensors[n].qtype == GGMLQuantizationType.Q8_0 and not n.startswith("blk.")}
    cached = {n: hf for n, hf in quantized.items() if n not in direct}
    blocks: dict[str, torch.Tensor] = {}
    if cached:
        target = _cache_path(g)
        if not target.with_suffix(".json").exists():
            _convert(g, cached, target, progress)
        index = json.loads(target.with_suffix(".json").read_text())
        data = np.memmap(target.with_suffix(".bin"), dtype=np.uint8, mode="c")
        for hf, (off, rows, width) in index.items():
            blocks[hf] = torch.from_numpy(data[off:off + rows * width].reshape(rows, width))
    for name, hf in direct.items():
        blocks[hf] = torch.from_numpy(g.raw(name).reshape(g.tensors[name].shape[0], -1))
    with torch.device("meta"):
        module = Gemma(cfg)
    swap_in_q8(module, blocks)
    state = {}
    for name, hf in floats.items():
        state[hf] = hf_tensor(g, name).to(dtype)
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise ValueError(f"{g.path}: no tensor for {sorted(missing)[0]}")
    module.load_state_dict(state, strict=True, assign=True)
    if dtype == torch.float32:
        swap_in_fast_norms(module, RMSNorm)
        attach_fused_decode(module)
    return module.eval()


def to_q8(module: Gemma) -> Gemma:
    """Quantize a float Gemma's linears and embedding to Q8_0 in place (quant="q8" on any source)."""
    swap_in_q8(module, fuse_blocks({k: torch.from_numpy(quantize_q8(v.float()))
                                    for k, v in module.state_dict().items()
                                    if k.endswith("proj.weight") or k == "model.embed_tokens.weight"}))
    attach_fused_decode(module)
    return module
