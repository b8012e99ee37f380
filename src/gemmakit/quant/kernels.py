"""The native CPU kernels (the C files beside this one): compiled once per machine with gcc or clang, loaded with
ctypes.

Why not a torch extension: this file compiles in ~1 s with no torch headers and no build isolation issues, and it
calls into the OpenMP runtime torch already loaded. Why native at all: on CPUs without a fast int8 GEMV in torch
(`_weight_int8pack_mm` measured 3 GB/s on the reference machine), reading the GGUF's blocks directly is the only way
to decode at memory bandwidth. When no compiler is found or the build fails, `available()` is False and the
pure-PyTorch path runs instead.

The first build probes, in order, the compiler's OpenMP (`-fopenmp`), libomp through `-Xpreprocessor -fopenmp`
(Apple's clang with Homebrew's libomp), and a build without OpenMP whose regions run on team.c's pthread pool; the
first that compiles is cached and one line says which it is. Results do not depend on the choice (team.c).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .. import sampling
from ..disk_cache import cache_dir, prune

HERE = Path(__file__).parent
SOURCES = sorted(HERE.glob("*.c"))  # every C file here is part of the library
HEADERS = sorted(HERE.glob("*.h"))
# -ffp-contract=off: a * b + c is never fused behind the code's back (clang fuses by default, gcc does not in C11),
# so every compiler computes the products with the same roundings (blocks.c: bit-identical across CPUs).
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off"]
LIBS = ["-lm"]
KEEP_BUILDS = 8  # the kernels cache holds at most this many builds (other sources, flags or CPUs); oldest go first
LIBOMP_PREFIXES = ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp")  # Homebrew's on Apple Silicon, on Intel


def extra_flags() -> list[str]:
    """GEMMAKIT_CFLAGS, e.g. "-mno-avx512f" to build (and benchmark) the AVX2 path on an AVX-512 machine."""
    return os.environ.get("GEMMAKIT_CFLAGS", "").split()


def _cpu_fingerprint() -> str:
    """The CPU's feature list (x86 `flags`, ARM `Features`; on macOS the CPU's name), hashed: a build for one CPU is
    never loaded on another."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor() + platform.machine()
        if sys.platform == "darwin":
            proc = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            flags += proc.stdout
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def arch_flags() -> list[list[str]]:
    """Target flags to try, best first: this CPU's own (-march=native on x86; -mcpu=native on ARM64, where it
    brings dotprod, and i8mm where present), then a safe baseline where a compiler lacks the native probe."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return [["-march=native"], []]
    if machine in ("arm64", "aarch64"):
        return [["-mcpu=native"], *([["-mcpu=apple-m1"]] if sys.platform == "darwin" else []), []]
    return [["-march=native"], []]


def threading_flags() -> list[tuple[str, list[str]]]:
    """How the kernels' regions get their threads, best first: (label, compile flags)."""
    options: list[tuple[str, list[str]]] = []
    if "-fno-openmp" not in extra_flags():  # GEMMAKIT_CFLAGS=-fno-openmp: the pthread team, e.g. to test it
        options.append(("OpenMP", ["-fopenmp"]))
    for prefix in map(Path, LIBOMP_PREFIXES):
        if options and (prefix / "include" / "omp.h").exists():
            # torch's wheel for macOS bundles its own libomp: link to that one where present, so one OpenMP
            # runtime serves torch and the kernels (two copies abort with "OMP: Error #15")
            torch_lib = Path(torch.__file__).parent / "lib"
            lib = torch_lib if (torch_lib / "libomp.dylib").exists() else prefix / "lib"
            options.append((f"OpenMP (libomp, {lib})",
                            ["-Xpreprocessor", "-fopenmp", f"-I{prefix / 'include'}", f"-L{lib}", "-lomp",
                             f"-Wl,-rpath,{lib}"]))
    options.append(("a pthread team (no OpenMP; on macOS `brew install libomp` adds it)", ["-pthread"]))
    return options


def build(verbose: bool = False) -> Path | None:
    """Compile the C files here for this machine (cached by source, compiler, flags and CPU features); None if it
    cannot be built. The first build probes the target and threading flags (arch_flags, threading_flags) and prints
    one line saying what it chose."""
    if os.environ.get("GEMMAKIT_NO_NATIVE"):
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        return None
    extra = extra_flags()
    libomp = [p for p in LIBOMP_PREFIXES if Path(p).exists()]  # installing libomp later rebuilds with OpenMP
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS)
                         + " ".join([cc, *FLAGS, *extra, *libomp]).encode()).hexdigest()
    out = cache_dir() / "kernels" / f"kernels-{key[:12]}-{_cpu_fingerprint()}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    prune(out.parent, "*.so", KEEP_BUILDS)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    errors = ""
    for arch in arch_flags():
        for label, threads in threading_flags():
            cmd = [cc, *FLAGS, *arch, *threads, *extra, *map(str, SOURCES), "-o", str(tmp), *LIBS]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)  # atomic: a concurrent or interrupted build never leaves a broken .so
                target = " ".join(arch) or "the compiler's default target"
                print(f"gemmakit: native kernels built with {Path(cc).name} for {target}, threads: {label}",
                      file=sys.stderr)
                return out
            errors = proc.stderr
            tmp.unlink(missing_ok=True)
    if verbose:
        print(errors)
    return None


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
    lib.rms_norm_many.argtypes = [ptr, ptr, ptr, long_, long_, ctypes.c_float, int_]
    lib.rope_many.argtypes = [ptr, ptr, ptr, ptr, long_, long_, long_, long_, int_]
    lib.geglu_many.argtypes = [ptr, ptr, ptr, long_, int_]
    lib.decode_layers.argtypes = [ptr, long_, ptr, ptr, long_, long_, ptr, ptr, long_, int_]
    lib.decode_gemma4.argtypes = [ptr, long_, ptr, ptr, ptr, long_, long_, ptr, ptr, long_, int_]
    lib.decode_gemma3n.argtypes = [ptr, ptr, long_, ptr, ptr, ptr, ptr, long_, long_, ptr, ptr, long_, int_]
    for f in (lib.qmatmul, lib.dequant_rows, lib.dequant_rows_bf16, lib.rms_norm_many, lib.rope_many,
              lib.geglu_many, lib.decode_layers, lib.decode_gemma4, lib.decode_gemma3n):
        f.restype = None
    lib.argmax_rows.argtypes = [ptr, long_, long_, long_, ptr, ptr, int_]
    lib.argmax_rows.restype = None
    lib.argmax_vectorized.argtypes = []
    lib.argmax_vectorized.restype = int_
    lib.argmax_work.argtypes = [long_, long_]
    lib.argmax_work.restype = long_
    # greedy tokens by argmax.c from now on (sampling.first_max); its scalar loop is slower than torch's
    sampling.native_first_max = first_max if lib.argmax_vectorized() else None
    lib.release_threads.argtypes = []
    lib.release_threads.restype = int_
    lib.act_bytes.argtypes = [long_, long_]
    lib.act_bytes.restype = long_
    lib.qtype_supported.argtypes = [long_]
    lib.qtype_supported.restype = int_
    lib.kernels_threading.argtypes = []
    lib.kernels_threading.restype = ctypes.c_char_p
    return lib


def available() -> bool:
    return library() is not None


def threading() -> str | None:
    """"openmp" or "pthreads": what runs the kernels' parallel regions (None without the kernels)."""
    lib = library()
    return lib.kernels_threading().decode() if lib is not None else None


def release_threads() -> None:
    """Hand back the calling thread's OpenMP workers (blocks.c release_threads): for a thread done computing for
    now, e.g. the one that loaded a model another thread will run. A no-op until the native library is loaded (it
    is never built for this)."""
    if library.cache_info().currsize and (lib := library()) is not None:
        lib.release_threads()


def first_max(logits: Tensor) -> Tensor | None:
    """Each row's index of its first maximum (B, V) -> (B,) int64, as logits.max(-1).indices, by argmax.c: for
    float32 CPU rows with unit stride; None where it does not apply. library() hands it to sampling.first_max once
    the kernels are loaded (a quantized model loaded them), so it never builds them."""
    if not (logits.dim() == 2 and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and logits.stride(-1) == 1 and logits.shape[1] > 0):
        return None
    lib = library()
    if lib is None:
        return None
    rows, n = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    work = torch.empty(lib.argmax_work(rows, n), dtype=torch.float32)
    lib.argmax_rows(logits.data_ptr(), rows, n, logits.stride(0), out.data_ptr(), work.data_ptr(),
                    torch.get_num_threads())
    return out


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether this device multiplies bf16 natively (CUDA, or a CPU with AVX512-BF16 or AMX tiles).

    Only there is bf16 a speed win (oneDNN's bf16 GEMM measured ~2x fp32 on AVX512-BF16/AMX, and 1.9x the int8
    kernels on a Zen 4): long prefills of the fast path and the frozen base of fine-tuning use it; CPUs without
    them emulate bf16 and keep the int8 kernels (prefill) or fp32 (fine-tuning).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if "-mno-avx512f" in extra_flags():  # the AVX2 path asked for: an AVX2 laptop has neither (its benchmarks too)
        return False
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
