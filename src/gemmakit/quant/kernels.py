"""The native CPU kernels (blocks.c, decode.c): compiled once per machine with gcc, loaded with ctypes.

Why not a torch extension: this file compiles in ~1 s with no torch headers and no build isolation issues, and it
calls into the OpenMP runtime torch already loaded. Why native at all: on CPUs without a fast int8 GEMV in torch
(`_weight_int8pack_mm` measured 3 GB/s on the reference machine), reading the GGUF's blocks directly is the only way
to decode at memory bandwidth. When gcc is missing or the build fails, `available()` is False and the pure-PyTorch
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

from ..disk_cache import cache_dir, prune

SOURCES = [Path(__file__).with_name("blocks.c"), Path(__file__).with_name("decode.c")]
HEADERS = [Path(__file__).with_name("blocks.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm"]
KEEP_BUILDS = 8  # the kernels cache holds at most this many builds (other sources, flags or CPUs); oldest go first


def extra_flags() -> list[str]:
    """GEMMAKIT_CFLAGS, e.g. "-mno-avx512f" to build (and benchmark) the AVX2 path on an AVX-512 machine."""
    return os.environ.get("GEMMAKIT_CFLAGS", "").split()


def _cpu_fingerprint() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build(verbose: bool = False) -> Path | None:
    """Compile blocks.c and decode.c for this machine (cached by source, flags and CPU features); None if it cannot be
    built."""
    if os.environ.get("GEMMAKIT_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    flags = [*FLAGS, *extra_flags()]
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(flags).encode()).hexdigest()
    out = cache_dir() / "kernels" / f"kernels-{key[:12]}-{_cpu_fingerprint()}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    prune(out.parent, "*.so", KEEP_BUILDS)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True)
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
    torch.ones(1)  # torch (and its OpenMP runtime) is loaded first, so the kernels bind to the same libgomp
    lib = ctypes.CDLL(str(path))
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.qmatmul.argtypes = [ptr, long_, long_, long_, long_, ptr, long_, ptr, ptr, int_]
    lib.dequant_rows.argtypes = [ptr, long_, long_, long_, ptr, long_, ptr, int_]
    lib.dequant_rows_bf16.argtypes = [ptr, long_, long_, long_, long_, long_, ptr, int_]
    lib.rms_norm.argtypes = [ptr, ptr, ptr, long_, long_, ctypes.c_float]
    lib.decode_layers.argtypes = [ptr, long_, ptr, ptr, long_, long_, ptr, ptr, long_, int_]
    for f in (lib.qmatmul, lib.dequant_rows, lib.dequant_rows_bf16, lib.rms_norm, lib.decode_layers):
        f.restype = None
    lib.release_threads.argtypes = []
    lib.release_threads.restype = int_
    lib.act_bytes.argtypes = [long_, long_]
    lib.act_bytes.restype = long_
    lib.qtype_supported.argtypes = [long_]
    lib.qtype_supported.restype = int_
    return lib


def available() -> bool:
    return library() is not None


def release_threads() -> None:
    """Hand back the calling thread's OpenMP workers (blocks.c release_threads): for a thread done computing for
    now, e.g. the one that loaded a model another thread will run. A no-op until the native library is loaded (it
    is never built for this)."""
    if library.cache_info().currsize and (lib := library()) is not None:
        lib.release_threads()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether this device multiplies bf16 natively (CUDA, or a CPU with AVX512-BF16 or AMX tiles).

    Only there is bf16 a speed win (oneDNN's bf16 GEMM measured ~2x fp32 on AVX512-BF16/AMX, and 1.9x the int8
    kernels on a Zen 4): long prefills of the fast path and the frozen base of fine-tuning use it; CPUs without
    them emulate bf16 and keep the int8 kernels (prefill) or fp32 (fine-tuning).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
