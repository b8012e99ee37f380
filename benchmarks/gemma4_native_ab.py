"""A/B of Gemma 4 decode steps: the native step (quant/decode_gemma4.c) against the module path it replaced, on
one model in one process, alternating, medians of per-step times.

    PYTHONPATH=src python benchmarks/gemma4_native_ab.py gemma-4-e2b 10 65536 3 [BATCH]

Writes (once) a random Q8_0 GGUF of the preset's real widths, trimmed to LAYERS layers and VOCAB rows (gemmakit's
own Q8_0 writer: no llama.cpp needed), then decodes 8 steps after a 32-token prompt per run.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

import gemmakit
from gemmakit.bench.shapes import random_state, shortened, sized_tokenizer
from gemmakit.config import preset
from gemmakit.model import KVCache
from gemmakit.weights.writers import write_gguf

name, layers, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 1
path = Path(f"/tmp/{name}-{layers}l.q8_0.gguf")
if not path.exists():
    cfg = shortened(preset(name), layers, vocab)
    write_gguf(path, random_state(cfg), cfg, sized_tokenizer(cfg.vocab_size), qtype="q8_0")
torch.set_num_threads(2)
module = gemmakit.load(path, progress=False).module
fused = module.fused_decode


def run(native: bool, steps: int = 8) -> float:
    """Decode tok/s (batch rows per step over the median step time)."""
    module.fused_decode = fused if native else None
    cache = KVCache(module.config, batch, 256, dtype=torch.float32, device="cpu")
    times = []
    with torch.inference_mode():
        module(torch.randint(0, 1000, (batch, 32)), cache=cache, last_only=True)
        for i in range(steps):
            t = time.perf_counter()
            module(torch.randint(0, 1000, (batch, 1)), torch.full((batch, 1), 32 + i), cache)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


res: dict[bool, list[float]] = {True: [], False: []}
for _ in range(repeats):
    for native in (True, False):
        res[native].append(run(native))
        print("native" if native else "modules", round(res[native][-1], 2), flush=True)
print(name, f"{layers} layers, batch {batch}: native", [round(x, 2) for x in res[True]], "modules",
      [round(x, 2) for x in res[False]], "ratio", round(statistics.median(res[True]) / statistics.median(res[False]), 2))
