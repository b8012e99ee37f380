"""Load test: start `gemmakit serve` on a free loopback port and drive it with concurrent streaming clients.

Every client streams /v1/completions with `ignore_eos`, so each request generates exactly `max_tokens` tokens and
rounds with different client counts do the same work per request. Aggregate tok/s = all completion tokens of a
round / the round's wall time. The clients are the standard library's HTTP (client="http": runs without dev
extras) or the official `openai` package (client="openai": as a user's app would, its parsing included).

The yardstick for the server's batching is `Model.generate` doing the same work in one process: the same prompts as
one batch, the same tokens, timed end to end (prefill included, as a server round is). It runs in a worker process
of its own, alive beside the server, and each server round is followed by its generate round, so that the two are
measured minutes apart at most on a machine whose speed drifts (GenerateWorker). The server can at best equal it:
the clients and the server's event loop share its cores.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import GemmaError

PROMPTS = [
    "The history of the printing press begins",
    "A good recipe for bread needs",
    "In the middle of the ocean there is",
    "The most important rule of programming is",
    "Once upon a time, in a small village,",
    "The theory of relativity explains",
    "My favourite way to spend a Sunday is",
    "The city at night looks like",
]
MODEL_NAME = "bench"
# The mixed workload (workload="mixed"): requests as a chat app's users send them, prompts of 16 to 400 words and
# 32 to 128 new tokens, through a queue every client takes its next request from as soon as its last one ends. The
# prompts' prefill does not batch the way decode steps do, so this measures how much of one client's pace the
# server keeps for many, where the default workload measures the decode batching alone.
MIXED_WORDS = (16, 64, 200, 400)
MIXED_TOKENS = (32, 64, 128)
MIXED_REQUESTS = 24
_TEXT = ("the river runs past the old mill where the miller keeps his stones and his dog sleeps in the sun while "
         "children walk to school along the road that climbs the hill toward the church and the market square ").split()


def mixed_jobs() -> list[tuple[str, int]]:
    """MIXED_REQUESTS (prompt, max_tokens) pairs, the same on every run: every length with every budget."""
    jobs = []
    for k in range(MIXED_REQUESTS):
        n = MIXED_WORDS[k % len(MIXED_WORDS)]
        words = [_TEXT[(k + i) % len(_TEXT)] for i in range(n)]
        jobs.append((" ".join(words), MIXED_TOKENS[(k // len(MIXED_WORDS) + k) % len(MIXED_TOKENS)]))
    return jobs

# Before each timed round with a generate reference, both sides first generate this many tokens untimed. The two
# processes hold a copy of the weights each, and the one that runs reads its own back into the CPU caches: on a
# 480 MB L3, two 270M copies do not fit, and the first round after the other side's took 330 instead of 170 ms for
# its 8-row prefill and ~10% longer for its first steps. A user's server has no such neighbour.
WARM_TOKENS = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(port: int, prompt: str, max_tokens: int, timeout: float = 600.0) -> dict:
    """One streaming request; -> tokens, time to first token, total time (seconds)."""
    body = json.dumps(
        {
            "model": MODEL_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise GemmaError(f"load test request failed: HTTP {resp.status} {resp.read()[:300]!r}")
        first, tokens = None, 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise GemmaError(f"load test request failed: {chunk['error']['message']}")
            if first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    total = time.perf_counter() - t0
    return {"tokens": tokens, "ttft_s": first if first is not None else total, "total_s": total}


def stream_openai(port: int, prompt: str, max_tokens: int, timeout: float = 600.0) -> dict:
    """stream_completion through the official openai client: one per server, shared by the client threads as an
    app's threads would share it (made at the warm-up request: a client costs ~20 ms of CPU to make)."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = _openai(port, timeout).completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if first is None and any(c.text for c in chunk.choices):
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - t0
    return {"tokens": tokens, "ttft_s": first if first is not None else total, "total_s": total}


_openai_clients: dict[int, Any] = {}


def _openai(port: int, timeout: float) -> Any:
    if port not in _openai_clients:
        try:
            from openai import OpenAI
        except ImportError:
            raise GemmaError("the load test's openai client needs the openai package: pip install openai "
                             "(or use the standard library's client)") from None
        _openai_clients[port] = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=timeout,
                                       max_retries=0)
    return _openai_clients[port]


CLIENTS = {"http": stream_completion, "openai": stream_openai}


def run_round(port: int, clients: int, max_tokens: int, requests_per_client: int = 1, client: str = "http",
              jobs: Sequence[tuple[str, int]] | None = None) -> dict:
    """`clients` threads, each sending requests_per_client streaming requests back to back; with `jobs` ((prompt,
    max_tokens) pairs), each takes the next job of the queue until none is left."""
    stream = CLIENTS[client]
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    # each client's own list of jobs, or one queue that all of them share
    queues = ([[(PROMPTS[(k + j) % len(PROMPTS)], max_tokens) for j in range(requests_per_client)]
               for k in range(clients)] if jobs is None else [list(jobs)] * clients)

    def next_job(k: int) -> tuple[str, int] | None:
        with lock:
            return queues[k].pop(0) if queues[k] else None

    def client(k: int) -> None:
        while (job := next_job(k)) is not None:
            try:
                r = stream(port, *job)
            except BaseException as e:  # reported after the round; a thread must not die silently
                with lock:
                    errors.append(e)
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise GemmaError(f"{len(errors)} load test request(s) failed; first: {errors[0]}")
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "aggregate_tok_s": round(tokens / wall, 2),
        "per_request_tok_s": round(statistics.mean(r["tokens"] / r["total_s"] for r in results), 2),
        "ttft_s_mean": round(statistics.mean(ttfts), 3),
        "ttft_s_max": round(max(ttfts), 3),
    }


def run_load_test(
    source: str | None,
    clients: Sequence[int] = (1, 4, 8),
    max_tokens: int = 64,
    *,
    requests_per_client: int = 1,
    max_batch: int | None = None,
    ctx_size: int = 1024,
    device: str = "auto",
    startup_timeout: float = 300.0,
    kernel_flags: str = "",
    reference: bool = True,
    repeats: int = 3,
    client: str = "http",
    workload: str = "fixed",
) -> dict:
    """Serve `source` (None: the embedded model) in a subprocess and measure aggregate decode throughput.

    -> {"model", "device", "max_tokens", "max_batch", "rounds": [{"clients", "aggregate_tok_s", ...}, ...]}.
    The server gets max_batch = the largest client count unless given, so every round fits in one batch;
    `kernel_flags` (GEMMAKIT_CFLAGS, e.g. -mno-avx512f) are the server's kernel build flags; `client` is "http"
    or "openai" (CLIENTS). With `reference`, each server round is followed by the same work through
    Model.generate in a worker process (GenerateWorker): each round gets `generate_tok_s` (the median of those
    runs) and `vs_generate` (the median of the paired ratios). Every client count runs `repeats` times, the counts
    alternating; each reported round is the median one by aggregate tok/s (its `aggregate_runs` lists them all).
    workload="mixed": every round serves the same queue of mixed_jobs() instead (max_tokens unused), without the
    generate reference: one batch of prompts from 16 to 400 words is not what a server facing such traffic does.
    """
    from .common import isa, machine

    if not clients or min(clients) < 1:
        raise GemmaError("clients must be a non-empty list of positive counts")
    if max_tokens < 1:
        raise GemmaError("max_tokens must be >= 1")
    if client not in CLIENTS:
        raise GemmaError(f"unknown load test client {client!r}; use one of {', '.join(CLIENTS)}")
    if workload not in ("fixed", "mixed"):
        raise GemmaError(f"unknown load test workload {workload!r}; use fixed or mixed")
    jobs = mixed_jobs() if workload == "mixed" else None
    reference = reference and jobs is None
    batch = max_batch or max(clients)
    port = free_port()
    cmd = [sys.executable, "-m", "gemmakit", "serve", "--host", "127.0.0.1", "--port", str(port), "--max-batch",
           str(batch), "--ctx-size", str(ctx_size), "--device", device, "--log-level", "warning",
           "-m", f"{MODEL_NAME}={source}" if source else f"{MODEL_NAME}=" + _embedded()]
    log = tempfile.NamedTemporaryFile("w+", prefix="gemmakit-loadtest-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kernel_flags:
        env["GEMMAKIT_CFLAGS"] = kernel_flags
        if "-mno-avx512f" in kernel_flags:  # torch's own GEMMs and oneDNN off AVX-512 and AMX too, as on AVX2 CPUs
            env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    worker = None
    try:
        _wait_ready(proc, port, startup_timeout, Path(log.name))
        CLIENTS[client](port, PROMPTS[0], min(8, max_tokens))  # warm-up: first-call allocations, kernels
        worker = GenerateWorker(source, max_tokens, device, env) if reference else None
        runs: dict[int, list[dict]] = {c: [] for c in clients}
        for _ in range(max(1, repeats)):
            for c in clients:
                if worker is not None:  # its run evicted the server's weights from the CPU caches (GenerateWorker)
                    CLIENTS[client](port, PROMPTS[0], WARM_TOKENS)
                r = run_round(port, c, max_tokens, requests_per_client, client, jobs)
                if worker is not None:
                    r["generate_tok_s"] = worker.run(c)
                runs[c].append(r)
        rounds = [_median_round(runs[c]) for c in clients]
    finally:
        if worker is not None:
            worker.close()
        shared = _openai_clients.pop(port, None)
        if shared is not None:
            shared.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        Path(log.name).unlink(missing_ok=True)
    return {
        "model": source or "embedded",
        "device": device,
        "max_tokens": max_tokens,
        "max_batch": batch,
        "ctx_size": ctx_size,
        "requests_per_client": requests_per_client,
        "repeats": max(1, repeats),
        "client": client,
        "workload": workload,
        "rounds": rounds,
        "machine": machine(),
        "isa": isa(),
        "kernel_flags": kernel_flags,
    }


def _median_round(runs: list[dict]) -> dict:
    """The median run by aggregate tok/s (the lower middle one for an even count), with every run's figure; with a
    generate reference, the median of its runs and of the paired ratios."""
    ordered = sorted(runs, key=lambda r: r["aggregate_tok_s"])
    out = {**ordered[(len(ordered) - 1) // 2], "aggregate_runs": [r["aggregate_tok_s"] for r in runs]}
    if all("generate_tok_s" in r for r in runs):
        out["generate_runs"] = [r["generate_tok_s"] for r in runs]
        out["generate_tok_s"] = round(statistics.median(out["generate_runs"]), 2)
        out["vs_generate"] = round(statistics.median(r["aggregate_tok_s"] / r["generate_tok_s"] for r in runs), 3)
    return out


class GenerateWorker:
    """Model.generate on the load test's prompts in a process of its own (the server's environment: kernel flags,
    ISA caps), alive beside the server: run(c) times one batch of the first c prompts, max_tokens each with
    ignore_eos, end to end (prefill included) -> aggregate tok/s."""

    def __init__(self, source: str | None, max_tokens: int, device: str, env: dict) -> None:
        cmd = [sys.executable, "-m", "gemmakit.bench.server", "--generate", "--max-tokens", str(max_tokens),
               "--device", device, *([source] if source else [])]
        self.log = tempfile.TemporaryFile("w+")  # its stderr: a pipe nobody reads could fill and stall it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        while self._read() != "ready":  # loaded and warmed up (anything printed before is not ours)
            pass

    def run(self, clients: int) -> float:
        self.proc.stdin.write(f"{clients}\n")
        self.proc.stdin.flush()
        return float(self._read())

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            raise GemmaError(f"the generate reference run failed (exit {self.proc.returncode}):\n"
                             f"{self.log.read()[-2000:]}")
        return line.strip()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def generate_serve(source: str | None, max_tokens: int, device: str = "auto") -> None:
    """GenerateWorker's side: load, warm up, print "ready"; then per line of stdin (a client count c) print the
    aggregate tok/s of Model.generate on the first c prompts as one batch."""
    import gemmakit

    model = gemmakit.load(source or _embedded(), device=device, progress=False)
    model.generate([PROMPTS[0]], min(8, max_tokens), ignore_eos=True)  # warm-up, as the server gets
    print("ready", flush=True)
    for line in sys.stdin:
        c = int(line)
        model.generate([PROMPTS[0]], WARM_TOKENS, ignore_eos=True)  # the server's round evicted our weights
        t0 = time.perf_counter()
        results = model.generate([PROMPTS[k % len(PROMPTS)] for k in range(c)], max_tokens, ignore_eos=True)
        wall = time.perf_counter() - t0
        print(round(sum(len(r.token_ids) for r in results) / wall, 2), flush=True)


def save(result: dict, folder: Path, name: str | None = None) -> Path:
    """Write server-<date>-<machine>.json (or name.json) and .md atomically; returns the .json path."""
    from .common import write_results

    return write_results(folder, name, result, markdown(result), "server")


def markdown(result: dict) -> str:
    """The rounds as a table, with each round's aggregate throughput relative to one client."""
    rounds = result["rounds"]
    one = next((r["aggregate_tok_s"] for r in rounds if r["clients"] == 1), None)
    referenced = any(r.get("generate_tok_s") for r in rounds)
    lines = [f"`gemmakit serve` load test on {result.get('machine', '?')}"
             + (f" (GEMMAKIT_CFLAGS={result['kernel_flags']})" if result.get("kernel_flags") else "")
             + (f", the mixed workload ({MIXED_REQUESTS} requests: prompts of {'/'.join(map(str, MIXED_WORDS))} "
                f"words, {'/'.join(map(str, MIXED_TOKENS))} new tokens, each client taking the next one)"
                if result.get("workload") == "mixed" else f", {result['max_tokens']} tokens per request")
             + f", --max-batch {result['max_batch']}"
             + (", clients: the official openai package" if result.get("client") == "openai" else "")
             + ".", "",
             "| clients | aggregate tok/s | vs 1 client | first token mean (s) |"
             + (" `generate`, same prompts as one batch (tok/s) | serve vs generate |" if referenced else ""),
             "|---|---|---|---|" + ("---|---|" if referenced else "")]
    for r in rounds:
        ratio = f"{r['aggregate_tok_s'] / one:.2f}x" if one else ""
        same = r.get("generate_tok_s")
        ratio_g = r.get("vs_generate") or (r["aggregate_tok_s"] / same if same else None)
        ref = (f" {same:.1f} | {ratio_g:.2f}x |" if same else "  |  |") if referenced else ""
        lines.append(f"| {r['clients']} | {r['aggregate_tok_s']:.1f} | {ratio} | {r['ttft_s_mean']:.3f} |{ref}")
    paired = any("vs_generate" in r for r in rounds)
    note = (("\n`generate`: Model.generate in one process on the same prompts as one batch, the same tokens each, "
             "timed end to end (prefill included) as a server round is"
             + ("; run after each server round, beside the server: the median of its runs, and the median of the "
                "paired ratios" if paired else "; median of 3") + ". " if referenced else "\n")
            + f"Server rounds: the median of {result.get('repeats', 1)} alternating runs.\n")
    return "\n".join(lines) + "\n" + note


def _embedded() -> str:
    from ..embedded import embedded_path

    return str(embedded_path())


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise GemmaError(f"the server exited with code {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.25)
    raise GemmaError(f"the server did not answer /health within {timeout:.0f} s")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Aggregate tok/s of `gemmakit serve` for several client counts.")
    ap.add_argument("source", nargs="?", default=None, help="model (default: embedded)")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--client", default="http", choices=sorted(CLIENTS))
    ap.add_argument("--generate", action="store_true", help="be the Model.generate reference (GenerateWorker)")
    a = ap.parse_args()
    if a.generate:
        generate_serve(a.source, a.max_tokens, a.device)
        raise SystemExit(0)
    out = run_load_test(a.source, [int(c) for c in a.clients.split(",")], a.max_tokens, device=a.device,
                        client=a.client)
    print(json.dumps(out, indent=2))
