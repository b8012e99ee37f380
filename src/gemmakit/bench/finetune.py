"""Fine-tuning benchmark: gemmakit vs transformers + PEFT, same model, data and LoRA settings, side by side.

Each run is its own subprocess (so peak RSS is its own) on the same HF folder (written once, fp32, from `source`)
and the same token rows: `batch_size` rows of exactly `seq_len` tokens, every token a target. gemmakit runs its
trainer as `gemmakit finetune` would (frozen base in train_dtype("auto"): bf16 on CPUs with AVX512-BF16/AMX;
fp32 adapters, optimizer and loss; chunked cross-entropy with the fused head gradient). The peers run the textbook
loop (`model(input_ids, labels=...)`, AdamW): once as a user gets it by default (fp32), once loaded in bf16
(`dtype=torch.bfloat16`; PEFT then keeps the adapters in fp32), so the bf16 gain of gemmakit is not hidden in the
ratio. Sides alternate within every repetition (a noisy machine hurts them alike); medians are reported. The first
step of every run is warm-up and not timed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SIDES = ("gemmakit", "transformers", "transformers_bf16")
PEERS = {"transformers": "transformers + PEFT (fp32)", "transformers_bf16": "transformers + PEFT (bf16)"}
_KEYS = ("tokens_per_s", "peak_rss_mb", "seconds")


def run_finetune_bench(
    source: str | None = None,
    *,
    steps: int = 4,
    seq_len: int = 256,
    batch_size: int = 2,
    rank: int = 8,
    threads: int | None = None,
    repeats: int = 3,
    dtype: str = "auto",
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train `steps` LoRA steps per run on each side, `repeats` alternating runs; medians and gemmakit / peer ratios.

    `dtype` is gemmakit's frozen-base dtype ("auto" as in `gemmakit finetune`); the peers are fixed (fp32, bf16).
    """
    from .common import machine

    with tempfile.TemporaryDirectory(prefix="gemmakit-bench-") as tmp:
        folder, data = Path(tmp) / "model", Path(tmp) / "data.jsonl"
        _prepare(source, folder, data, seq_len=seq_len, rows=batch_size * (steps + 1))
        args = {
            "folder": str(folder),
            "data": str(data),
            "steps": steps,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "rank": rank,
            "threads": threads,
            "dtype": dtype,
        }
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
        for rep in range(repeats):
            for side in SIDES[rep % len(SIDES) :] + SIDES[: rep % len(SIDES)]:  # rotate who goes first
                if on_step:
                    on_step(f"{side} (run {rep + 1}/{repeats})")
                runs[side].append({**_spawn(side, args), "load_avg_1m": os.getloadavg()[0]})
    median = {s: {k: statistics.median(r[k] for r in rs) for k in _KEYS} for s, rs in runs.items()}
    ours = median["gemmakit"]
    ratios = {p: {k: ours[k] / median[p][k] for k in ("tokens_per_s", "peak_rss_mb")} for p in PEERS}
    return {
        "date": date.today().isoformat(),
        "machine": machine(),
        "source": source or "embedded",
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lora_rank": rank,
        "targets": list(TARGETS),
        "repeats": repeats,
        "gemmakit_dtype": runs["gemmakit"][0]["dtype"],
        "threads": runs["gemmakit"][0]["threads"],
        "median": median,
        "ratios": ratios,
        "runs": runs,
        # the headline, against the peer as a user runs it by default (fp32):
        "tokens_per_s_ratio": ratios["transformers"]["tokens_per_s"],
        "peak_rss_ratio": ratios["transformers"]["peak_rss_mb"],
    }


def markdown(r: dict[str, Any]) -> str:
    """The result as a markdown table: medians per side, then gemmakit's ratio against each peer."""
    lines = [
        f"Fine-tuning benchmark {r['date']} on {r['machine']}, {r['threads']} threads, median of {r['repeats']} "
        f"alternating runs. Model {r['source']}; LoRA r={r['lora_rank']} on {', '.join(r['targets'])}; "
        f"{r['steps']} timed steps of {r['batch_size']} x {r['seq_len']} tokens; gemmakit base in "
        f"{r['gemmakit_dtype']}.",
        "",
        "| side | tokens/s | peak RSS (MB) | last loss |",
        "|---|---|---|---|",
    ]
    names = {"gemmakit": f"gemmakit ({r['gemmakit_dtype']})", **PEERS}
    for side, m in r["median"].items():
        last = statistics.median(run["losses"][-1] for run in r["runs"][side])
        lines.append(f"| {names[side]} | {m['tokens_per_s']:.1f} | {m['peak_rss_mb']:.0f} | {last:.4f} |")
    for peer, q in r["ratios"].items():
        lines.append(f"| gemmakit vs {PEERS[peer]} | {q['tokens_per_s']:.2f}x | {q['peak_rss_mb']:.2f}x | |")
    return "\n".join(lines) + "\n"


def save(result: dict[str, Any], folder: Path = Path("benchmarks/results"), name: str | None = None) -> Path:
    """Write finetune-<date>-<machine>.json (or name.json) and .md atomically; returns the .json path."""
    from .common import write_results

    return write_results(folder, name, result, markdown(result), "finetune")


def _prepare(source: str | None, folder: Path, data: Path, *, seq_len: int, rows: int) -> None:
    """The model as an fp32 HF folder, and `rows` text lines long enough to be cut to seq_len tokens."""
    from ..loader import load
    from ..weights.writers import write_hf

    m = load(source, dtype="float32", device="cpu", quant=None, progress=False)
    write_hf(folder, m.module.state_dict(), m.config, m.tokenizer)
    words = (
        "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
    )
    with data.open("w") as f:
        for i in range(rows):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(seq_len * 2))
            f.write(json.dumps({"text": text}) + "\n")


def _spawn(side: str, args: dict[str, Any]) -> dict[str, Any]:
    code = f"import json,sys; from gemmakit.bench.finetune import _worker; print(json.dumps(_worker({side!r}, json.loads(sys.argv[1]))))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the {side} benchmark failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _worker(side: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    from ..tokenizer import Tokenizer
    from ..train.data import collate, load_jsonl
    from .common import peak_rss_mb

    tok = Tokenizer.from_file(Path(a["folder"]) / "tokenizer.model")
    rows, _ = load_jsonl(a["data"], tok, "gemma3", max_len=a["seq_len"] + 1)
    bs = a["batch_size"]
    batches = [collate(rows[i * bs : (i + 1) * bs], tok.pad_id) for i in range(a["steps"] + 1)]
    if side == "gemmakit":
        step, dtype = _gemmakit_step(a)
    else:
        dtype = "bfloat16" if side == "transformers_bf16" else "float32"
        step = _peer_step(a, getattr(torch, dtype))
    first = step(batches[0])  # warm-up, untimed; B = 0, so every side sees the base model: the same loss
    t0 = time.perf_counter()
    losses = [step(b) for b in batches[1:]]
    dt = time.perf_counter() - t0
    tokens = sum(b.n_tokens for b in batches[1:])
    return {
        "tokens_per_s": tokens / dt,
        "seconds": dt,
        "tokens": tokens,
        "first_loss": first,
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "dtype": dtype,
    }


def _gemmakit_step(a: dict[str, Any]) -> tuple[Callable[[Any], float], str]:
    import torch

    from ..loader import load
    from ..lora.adapter import LoRAConfig
    from ..train.trainer import CausalLMLoss, TrainConfig, prepare_model, train_dtype

    dtype = train_dtype(a["dtype"], torch.device("cpu"))
    m = load(a["folder"], dtype=dtype, device="cpu", quant=None, progress=False)
    params = prepare_model(
        m.module, TrainConfig(lora=LoRAConfig(r=a["rank"], alpha=2 * a["rank"], targets=TARGETS))
    )
    m.module.train()
    loss_mod = CausalLMLoss(m.module)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b) -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_mod(b.ids, b.positions, b.targets, b.mask) / b.n_targets
        loss.backward()
        opt.step()
        return loss.item()

    return step, dtype


def _peer_step(a: dict[str, Any], dtype: Any) -> Callable[[Any], float]:
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        a["folder"], dtype=dtype, attn_implementation="sdpa"
    )
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=a["rank"], lora_alpha=2 * a["rank"], target_modules=list(TARGETS), task_type="CAUSAL_LM"
        ),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(b) -> float:
        opt.zero_grad(set_to_none=True)
        labels = torch.cat([b.ids[:, :1], b.targets], dim=1).masked_fill(
            torch.cat([torch.zeros_like(b.mask[:, :1]), b.mask], dim=1) == 0, -100
        )
        ids = torch.cat([b.ids, b.targets[:, -1:]], dim=1)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step
