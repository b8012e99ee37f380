"""Constrained-decoding benchmark: the cost of grammar masks on decode tok/s, and llguidance vs xgrammar.

1. Overhead: greedy decode steps of the embedded model at batch 1 and 8, without and with a JSON-Schema grammar
   per row (GrammarProcessor), the next mask computed on the worker thread during the forward ("background") and
   inline in process() ("inline"; the default unless a core is free for the worker thread). Steps are timed only
   while every row is still inside its grammar; the plain
   run decodes the same number of steps. Runs alternate; medians. The target is <= 10 % fewer tok/s.
2. Engines, on gemmakit's own tokenizer: building the engine tokenizer, compiling a schema, and the mean time of
   one token mask along a real JSON document; xgrammar only when it is installed (it is not a dependency).

Run: `gemmakit bench --structured` (writes benchmarks/results/structured-<date>-<node>.json/.md).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import machine, peak_rss_mb, write_results

SCHEMA = {"type": "array", "maxItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120},
                   "tags": {"type": "array", "maxItems": 4, "items": {"enum": ["red", "green", "blue"]}}}}}
DOC = [{"name": f"person {i}", "age": 20 + i, "tags": ["red", "blue"][: i % 3]} for i in range(12)]
PROMPT = "A JSON list of people with their name, age and tags:\n"


def _steps(m: Any, batch: int, n: int, procs: Callable[[], list] | None) -> tuple[float, int]:
    """(seconds, steps) of greedy decode steps after the prefill, stopping when a row's grammar ends."""
    from ..generate import generate_step
    from ..sampling import SamplingParams

    prompts = [m.tokenizer.encode(PROMPT + "[" * (b % 2), bos=True) for b in range(batch)]
    rows = [procs() for _ in prompts] if procs else None
    stops = {m.config.eos_token_id, m.config.end_of_turn_id}
    steps = generate_step(m.module, prompts, SamplingParams(), n + 1, processors=rows, stop_ids=stops)
    next(steps)  # the prefill
    t0, done = time.perf_counter(), 0
    for token in steps:
        if any(int(t) in stops for t in token):
            break
        done += 1
    return time.perf_counter() - t0, done


def overhead(m: Any, batches: tuple[int, ...] = (1, 8), n: int = 32, repeats: int = 3) -> list[dict]:
    """Decode tok/s without and with grammar masks, per batch size and mask mode."""
    from ..grammar import GrammarProcessor

    constraint = m.constraint(json_schema=SCHEMA)
    out = []
    for batch in batches:
        times: dict[str, list[float]] = {"plain": [], "background": [], "inline": []}
        for _ in range(repeats):
            for mode in ("background", "inline"):
                bg = mode == "background"
                secs, steps = _steps(m, batch, n, lambda bg=bg: [GrammarProcessor(constraint.grammar,
                                                                                  constraint.tokenizer,
                                                                                  background=bg)])
                plain, _ = _steps(m, batch, steps, None)
                times[mode].append(batch * steps / secs)
                times["plain"].append(batch * steps / plain)
        row = {"batch": batch, **{f"{k}_tok_s": round(statistics.median(v), 1) for k, v in times.items()}}
        for mode in ("background", "inline"):
            row[f"{mode}_overhead_pct"] = round(100 * (1 - row[f"{mode}_tok_s"] / row["plain_tok_s"]), 1)
        out.append(row)
    return out


def _doc_tokens(tok: Any) -> list[int]:
    return tok.encode(json.dumps(DOC), bos=False)


def engines(m: Any) -> list[dict]:
    """llguidance vs xgrammar on our tokenizer: build, compile and per-token mask times."""
    from .. import grammar

    tok, cfg = m.tokenizer, m.config
    stops = [cfg.eos_token_id, cfg.end_of_turn_id]
    ids = _doc_tokens(tok)
    t0 = time.perf_counter()
    grammar._TOKENIZERS.clear()
    lt = grammar.engine_tokenizer(tok, cfg.vocab_size, stops)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = grammar.compile_grammar(json_schema=SCHEMA)
    proc = grammar.GrammarProcessor(g, lt, background=False)
    compile_s = time.perf_counter() - t0
    masks = []
    for t in ids:
        t0 = time.perf_counter()
        proc._fill()
        masks.append(time.perf_counter() - t0)
        proc.matcher.consume_token(t)
    rows = [{"engine": "llguidance", "tokenizer_s": round(build, 2), "compile_ms": round(compile_s * 1e3, 2),
             "mask_ms_mean": round(1e3 * statistics.mean(masks), 3), "mask_ms_max": round(1e3 * max(masks), 3)}]
    try:
        import xgrammar as xgr
    except ImportError:
        rows.append({"engine": "xgrammar", "note": "not installed (pip install xgrammar to compare)"})
        return rows
    pieces = [tok.piece(i) for i in range(tok.vocab_size)]  # SentencePiece pieces: U+2581, <0xNN> byte tokens
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=cfg.vocab_size, stop_token_ids=stops)
    compiler = xgr.GrammarCompiler(info)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False))
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, cfg.vocab_size)
    masks = []
    for t in ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        masks.append(time.perf_counter() - t0)
        matcher.accept_token(t)
    rows.append({"engine": "xgrammar", "tokenizer_s": round(build, 2), "compile_ms": round(compile_s * 1e3, 2),
                 "mask_ms_mean": round(1e3 * statistics.mean(masks), 3), "mask_ms_max": round(1e3 * max(masks), 3)})
    return rows


def run(model: str | None = None, *, n: int = 32, repeats: int = 3) -> dict:
    import gemmakit

    m = gemmakit.load(model, progress=False)
    return {"machine": machine(), "threads": torch.get_num_threads(), "model": m.source, "decode_steps": n,
            "repeats": repeats, "engines": engines(m), "overhead": overhead(m, n=n, repeats=repeats),
            "peak_rss_mb": peak_rss_mb()}


def markdown(result: dict) -> str:
    lines = [f"# Constrained decoding ({result['machine']}, {result['threads']} threads)", "",
             "| batch | plain tok/s | masks (background) tok/s | overhead | masks (inline) tok/s | overhead |",
             "|---|---|---|---|---|---|"]
    for r in result["overhead"]:
        lines.append(f"| {r['batch']} | {r['plain_tok_s']} | {r['background_tok_s']} | "
                     f"{r['background_overhead_pct']}% | {r['inline_tok_s']} | {r['inline_overhead_pct']}% |")
    lines += ["", "| engine | tokenizer build s | schema compile ms | mask ms (mean) | mask ms (max) |",
              "|---|---|---|---|---|"]
    for e in result["engines"]:
        if "note" in e:
            lines.append(f"| {e['engine']} | {e['note']} | | | |")
        else:
            lines.append(f"| {e['engine']} | {e['tokenizer_s']} | {e['compile_ms']} | {e['mask_ms_mean']} | "
                         f"{e['mask_ms_max']} |")
    return "\n".join(lines) + "\n"


def save(result: dict, folder: Path, name: str | None = None) -> Path:
    return write_results(folder, name, result, markdown(result), "structured")


if __name__ == "__main__":
    res = run()
    print(markdown(res))
    print(save(res, Path("benchmarks/results")))
