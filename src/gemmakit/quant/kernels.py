"""The native CPU kernels (q8.c, decode.c): compiled once per machine with gcc, loaded with ctypes.

Why not a torch extension: this file compiles in ~1 s with no torch headers and no build isolation issues, and it
calls into the OpenMP runtime torch already loaded. Why native at all: on CPUs without a fast int8 GEMV in torch
(`_weight_int8pack_mm` measured 3 GB/s on the reference machine), reading Q8_0 blocks directly is the only way to
decode at memory bandwidth. When gcc is missing or the build fails, `available()` is False and the pure-PyTorch
path runs instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

from ..embedded import cache_dir

SOURCES = [Path(__file__).with_name("q8.c"), Path(__file__).with_name("decode.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm"]


def _cpu_fingerprint() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build(verbose: bool = False) -> Path | None:
    """Compile q8.c and decode.c for this machine (cached by source, flags and CPU features); None if it cannot be built."""
    if os.environ.get("GEMMAKIT_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + " ".join(FLAGS).encode()).hexdigest()[:12]
    out = cache_dir() / "kernels" / f"q8-{key}-{_cpu_fingerprint()}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    proc = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True)
    if proc.returncode != 0:
        if verbose:
            print(proc.stderr)
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, out)  # atomic: a concurrent or interrupted build never leaves a broken .so
    return out


@cache
def library() -> ctypes.CDLL | None:
    path = build()
    if path is None:
        return None
    torch.ones(1)  # torch (and its OpenMP runtime) is loaded first, so q8.so binds to the same libgomp
    lib = ctypes.CDLL(str(path))
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.q8_matmul.argtypes = [ptr, ptr, ptr, long_, long_, long_, int_]
    lib.q8_rows.argtypes = [ptr, ptr, long_, long_, ptr, int_]
    lib.q8_to_bf16.argtypes = [ptr, long_, long_, ptr, int_]
    lib.rms_norm.argtypes = [ptr, ptr, ptr, long_, long_, ctypes.c_float]
    lib.decode_layers.argtypes = [ptr, long_, ptr, ptr, long_, long_, ptr, ptr, long_, int_]
    for f in (lib.q8_matmul, lib.q8_rows, lib.q8_to_bf16, lib.rms_norm, lib.decode_layers):
        f.restype = None
    return lib


def available() -> bool:
    return library() is not None


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether this device multiplies bf16 natively (CUDA, or a CPU with AVX512-BF16 or AMX tiles).

    Only there is bf16 a speed win (oneDNN's bf16 GEMM measured ~2x fp32 on AVX512-BF16/AMX): long prefills of the
    Q8 path and the frozen base of fine-tuning use it; CPUs without them emulate bf16 and keep fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
