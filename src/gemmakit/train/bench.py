"""Fine-tuning benchmark: gemmakit vs transformers + PEFT, same model, data and LoRA settings, side by side.

Each side runs in its own subprocess (so peak RSS is its own) on the same HF folder (written once from `source`)
and the same token rows: `batch_size` rows of exactly `seq_len` tokens, every token a target. gemmakit runs its
trainer (chunked cross-entropy, fused head gradient); transformers + PEFT runs the textbook loop
(`model(input_ids, labels=...)`, AdamW). The first step is warm-up and not timed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def run_finetune_bench(
    source: str | None = None,
    *,
    steps: int = 4,
    seq_len: int = 256,
    batch_size: int = 2,
    rank: int = 8,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train `steps` LoRA steps on each side; returns tokens/s, peak RSS (MB) and the ratios gemmakit / peer."""
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
            "out": str(Path(tmp) / "out"),
        }
        ours = _spawn("gemmakit", args)
        peer = _spawn("transformers", args)
    return {
        "source": source or "embedded",
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lora_rank": rank,
        "targets": list(TARGETS),
        "gemmakit": ours,
        "transformers_peft": peer,
        "tokens_per_s_ratio": ours["tokens_per_s"] / peer["tokens_per_s"],
        "peak_rss_ratio": ours["peak_rss_mb"] / peer["peak_rss_mb"],
    }


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
    code = f"import json,sys; from gemmakit.train.bench import _worker; print(json.dumps(_worker({side!r}, json.loads(sys.argv[1]))))"
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the {side} benchmark failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _worker(side: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    from ..tokenizer import Tokenizer
    from .data import collate, load_jsonl

    tok = Tokenizer.from_file(Path(a["folder"]) / "tokenizer.model")
    rows, _ = load_jsonl(a["data"], tok, "gemma3", max_len=a["seq_len"] + 1)
    bs = a["batch_size"]
    batches = [collate(rows[i * bs : (i + 1) * bs], tok.pad_id) for i in range(a["steps"] + 1)]
    step = _gemmakit_step(a) if side == "gemmakit" else _peer_step(a)
    first = step(batches[0])  # warm-up, untimed; B = 0, so both sides see the base model: the same loss
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
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def _gemmakit_step(a: dict[str, Any]):
    import torch

    from ..loader import load
    from ..lora.adapter import LoRAConfig
    from .trainer import CausalLMLoss, TrainConfig, prepare_model

    m = load(a["folder"], dtype="float32", device="cpu", quant=None, progress=False)
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

    return step


def _peer_step(a: dict[str, Any]):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        a["folder"], dtype=torch.float32, attn_implementation="sdpa"
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
