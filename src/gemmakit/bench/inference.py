"""Side-by-side inference benchmark: gemmakit, llama-cpp-python and transformers on the same GGUF and token ids.

Each measurement runs in a fresh process (`python -m gemmakit.bench.inference`, a job on stdin) so load time and peak
RSS are the engine's own; engines alternate within every repetition so a noisy machine hurts them alike; medians are
reported. Peers are optional (`pip install .[bench]`): a missing one is reported, never a crash.

Instruction sets: the results record the CPU's (bench.common.isa), the flags gemmakit's kernels were built with, and
llama.cpp's own system info. To measure the AVX2 path on an AVX-512 machine, pass `kernel_flags="-mno-avx512f"` and a
llama-cpp-python built without AVX-512 (`llama_path`: a folder holding its `llama_cpp` package, put first on the
peer's PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path

from .common import isa, machine, peak_rss_mb, write_results

ENGINES = ("gemmakit", "llama.cpp", "transformers")
PROMPT_TOKENS, DECODE_TOKENS = 512, 128
SUMMARY_PROMPT = "\n\nA summary of the text above, quoting its key sentences:\n"


def _token_ids(tokenizer, n: int) -> list[int]:
    """n real-text token ids (with <bos>), the same for every engine."""
    text = (Path(__file__).parent / "bench_text.txt").read_text()
    ids = tokenizer.encode(text, bos=True)
    while len(ids) < n:
        ids += ids[1:]
    return ids[:n]


# ---- workers: one engine, one process, JSON on stdout -----------------------------------------------------------


def _work_gemmakit(model: str, threads: int, prompt: list[int], n_decode: int, batches: Sequence[int]) -> dict:
    import torch

    import gemmakit
    from gemmakit.generate import generate_step
    from gemmakit.sampling import SamplingParams

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    m = gemmakit.load(model, progress=False)
    t_load = time.perf_counter() - t0
    from gemmakit.quant import kernels

    built = str(kernels.build()) if kernels.available() else "not built"
    greedy = SamplingParams()
    t0 = time.perf_counter()
    next(generate_step(m.module, [prompt[:16]], greedy, 1))
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    next(generate_step(m.module, [prompt], greedy, 1))  # prefill = the forward that yields the first token
    t_prefill = time.perf_counter() - t0
    steps = generate_step(m.module, [prompt[:16]], greedy, n_decode + 1)
    next(steps)
    t0 = time.perf_counter()
    n = sum(1 for _ in steps)
    decode = n / (time.perf_counter() - t0)
    out = {"load_s": t_load, "ttft_s": ttft, "prefill_tps": len(prompt) / t_prefill, "decode_tps": decode,
           "build": built}
    for b in batches:
        steps = generate_step(m.module, [prompt[i:i + 16] for i in range(b)], greedy, 33)
        next(steps)
        t0 = time.perf_counter()
        n = sum(1 for _ in steps)
        out[f"batch{b}_tps"] = n * b / (time.perf_counter() - t0)
    text = m.tokenizer.decode(prompt[1:400]) + SUMMARY_PROMPT
    for lookup in (0, 10):
        t0 = time.perf_counter()
        r = m.generate(text, n_decode, lookup=lookup, ignore_eos=True)
        out["summary_tps" if lookup == 0 else "summary_lookup_tps"] = len(r.token_ids) / (time.perf_counter() - t0)
    return out


def _work_llama(model: str, threads: int, prompt: list[int], n_decode: int, batches: Sequence[int]) -> dict:
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    t_load = time.perf_counter() - t0
    import llama_cpp

    built = llama_cpp.llama_print_system_info().decode().strip()

    def first_token(ids: list[int]) -> int:
        llm.reset()
        llm.eval(ids)
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    t0 = time.perf_counter()
    first_token(prompt[:16])
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_token(prompt)
    t_prefill = time.perf_counter() - t0
    tok = first_token(prompt[:16])
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = n_decode / (time.perf_counter() - t0)
    return {"load_s": t_load, "ttft_s": ttft, "prefill_tps": len(prompt) / t_prefill, "decode_tps": decode,
            "build": f"llama-cpp-python {llama_cpp.__version__} from {Path(llama_cpp.__file__).parent}: {built}"}


def _work_transformers(model: str, threads: int, prompt: list[int], n_decode: int, batches: Sequence[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    path = Path(model)
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    t_load = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(torch.tensor([prompt[:16]]))
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf(torch.tensor([prompt]))
        t_prefill = time.perf_counter() - t0
        out = hf(torch.tensor([prompt[:16]]), use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_decode):
            out = hf(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode = n_decode / (time.perf_counter() - t0)
    return {"load_s": t_load, "ttft_s": ttft, "prefill_tps": len(prompt) / t_prefill, "decode_tps": decode}


WORKERS: dict[str, Callable[..., dict]] = {"gemmakit": _work_gemmakit, "llama.cpp": _work_llama,
                                           "transformers": _work_transformers}
_REQUIRES = {"llama.cpp": "llama_cpp", "transformers": "transformers"}


def available(engine: str) -> bool:
    import importlib.util

    return engine not in _REQUIRES or importlib.util.find_spec(_REQUIRES[engine]) is not None


# ---- orchestration ----------------------------------------------------------------------------------------------


def run(model: str | None = None, *, engines: Sequence[str] = ENGINES, repeats: int = 3, threads: int | None = None,
        prompt_tokens: int = PROMPT_TOKENS, decode_tokens: int = DECODE_TOKENS, batches: Sequence[int] = (4, 8),
        kernel_flags: str = "", llama_path: str | None = None, busy_cpu: int | None = None,
        on_step: Callable[[str], None] | None = None) -> dict:
    """Run every available engine `repeats` times, alternating; return medians, ratios and the raw runs.

    kernel_flags: extra gcc flags for gemmakit's kernels (GEMMAKIT_CFLAGS), e.g. "-mno-avx512f" for the AVX2 path;
    llama_path: a folder with another llama-cpp-python build (e.g. one without AVX-512) for the llama.cpp side;
    busy_cpu: the core a spinning process kept busy during the run (bench.common.busy_core), recorded."""
    from ..embedded import embedded_path
    from ..weights.gguf import read_gguf, tokenizer_from_gguf

    path = str(embedded_path() if model is None else Path(model).expanduser())
    threads = threads or len(os.sched_getaffinity(0))
    prompt = _token_ids(tokenizer_from_gguf(read_gguf(path)), prompt_tokens)
    missing = [e for e in engines if not available(e)]
    active = [e for e in engines if e not in missing]
    runs: dict[str, list[dict]] = {e: [] for e in active}
    errors: dict[str, str] = {}
    for rep in range(repeats):
        for engine in active:
            if engine in errors:
                continue
            if on_step:
                on_step(f"{engine} (run {rep + 1}/{repeats})")
            job = json.dumps({"engine": engine, "model": path, "threads": threads, "prompt": prompt,
                              "n_decode": decode_tokens, "batches": list(batches)})
            proc = subprocess.run([sys.executable, "-m", "gemmakit.bench.inference"], input=job, capture_output=True,
                                  text=True, env=_worker_env(engine, kernel_flags, llama_path))
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
                how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
                errors[engine] = f"crashed ({how}): {last}"
                continue
            runs[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    medians = {e: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "build"} for e, rs in runs.items()
               if rs}
    ratios = {}
    if "gemmakit" in medians:
        for peer in ("llama.cpp", "transformers"):
            if peer in medians:
                g, p = medians["gemmakit"], medians[peer]
                ratios[f"vs {peer}"] = {k: g[k] / p[k] for k in ("decode_tps", "prefill_tps", "peak_rss_mb")}
    return {"date": date.today().isoformat(), "machine": machine(), "isa": isa(), "model": path,
            "model_mb": Path(path).stat().st_size / 2**20, "threads": threads,
            "builds": {e: rs[0]["build"] for e, rs in runs.items() if rs and "build" in rs[0]},
            "kernel_flags": kernel_flags, "busy_core": busy_cpu, "load_average_1min": os.getloadavg()[0],
            "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "repeats": repeats,
            "missing": {e: "not installed (pip install .[bench])" for e in missing}, "errors": errors,
            "median": medians, "ratios": ratios, "runs": runs}


def _worker_env(engine: str, kernel_flags: str, llama_path: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if engine == "gemmakit" and kernel_flags:
        env["GEMMAKIT_CFLAGS"] = kernel_flags
        if "-mno-avx512f" in kernel_flags:  # torch's own GEMMs and oneDNN off AVX-512 and AMX too, as on AVX2 CPUs
            env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    if engine == "llama.cpp" and llama_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(llama_path).resolve()), env.get("PYTHONPATH")) if p)
    return env


def markdown(result: dict) -> str:
    cols = [("decode_tps", "decode tok/s", "{:.1f}"), ("prefill_tps", f"prefill tok/s ({result['prompt_tokens']})",
            "{:.0f}"), ("ttft_s", "first token (s)", "{:.3f}"), ("load_s", "load (s)", "{:.2f}"),
            ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")]
    lines = [f"Benchmark {result['date']} on {result['machine']}, {result['threads']} threads, median of "
             f"{result['repeats']} alternating runs, model `{Path(result['model']).name}` "
             f"({result.get('model_mb', 0):.0f} MiB).", ""]
    if result.get("busy_core") is not None:
        lines[0] += f" Core {result['busy_core']} was kept busy by a spinning process for the whole run."
    if "load_average_1min" in result:
        lines[0] += f" Load average (1 min) at the end: {result['load_average_1min']:.2f}."
    for engine, build in result.get("builds", {}).items():
        flags = f" (GEMMAKIT_CFLAGS={result['kernel_flags']})" if engine == "gemmakit" and result.get("kernel_flags") \
            else ""
        lines.append(f"- {engine} build{flags}: {build}")
    lines += ["",
             "| engine | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for engine, m in result["median"].items():
        lines.append(f"| {engine} | " + " | ".join(c[2].format(m[c[0]]) for c in cols) + " |")
    for peer, r in result["ratios"].items():
        lines.append(f"| gemmakit {peer} | {r['decode_tps']:.2f}x | {r['prefill_tps']:.2f}x | | | "
                     f"{r['peak_rss_mb']:.2f}x |")
    if result.get("model_mb"):
        lines += ["", "peak RSS / model file size: " + ", ".join(
            f"{e} {m['peak_rss_mb'] / result['model_mb']:.2f}x" for e, m in result["median"].items()) + "."]
    g = result["median"].get("gemmakit", {})
    extra = [f"batch {k[5:-4]}: {v:.1f} tok/s aggregate ({v / g['decode_tps']:.2f}x one sequence)"
             for k, v in g.items() if k.startswith("batch")]
    if "summary_lookup_tps" in g:
        extra.append(f"summarization prompt: {g['summary_tps']:.1f} tok/s plain, {g['summary_lookup_tps']:.1f} "
                     f"tok/s with prompt lookup ({g['summary_lookup_tps'] / g['summary_tps']:.2f}x)")
    if extra:
        lines += ["", "gemmakit batched decode and speculation: " + "; ".join(extra) + "."]
    for e, why in {**result["missing"], **result["errors"]}.items():
        lines.append(f"\n{e}: {why}")
    return "\n".join(lines) + "\n"


def save(result: dict, folder: Path = Path("benchmarks/results"), name: str | None = None) -> Path:
    """Write <date>-<machine>.json and .md; returns the .json path."""
    return write_results(folder, name, result, markdown(result))


def _worker_main() -> None:
    job = json.loads(sys.stdin.read())
    res = WORKERS[job["engine"]](job["model"], job["threads"], job["prompt"], job["n_decode"], job["batches"])
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))


if __name__ == "__main__":
    _worker_main()
