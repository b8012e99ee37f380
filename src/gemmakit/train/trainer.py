"""LoRA / QLoRA fine-tuning: one loop for one CPU, one GPU, or N processes under torchrun (DDP or FSDP).

Per optimizer step the global batch is batch_size x grad_accum x world_size rows, taken from a seeded endless
stream of shuffled epochs (data.step_rows). The loss is the mean over every target token of the step, whatever
rank or micro-batch it lands on, so N processes give the same update as one process with N x the accumulation.
AdamW on the adapter only, linear warm-up then cosine decay to min_lr_ratio x lr, gradient clipping, optional
gradient checkpointing per block, chunked cross-entropy (loss.py), atomic checkpoints, exact resume, and Ctrl-C
that finishes the current step and saves.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import GemmaError
from ..lora.adapter import LoRAConfig, inject, load_adapter_weights, read_adapter, save_adapter
from ..model import Gemma
from ..quant.kernels import native_bf16
from ..quant.weight_only import quantize_model
from . import dist as D
from .checkpoint import latest_checkpoint, load_state, save_checkpoint
from .data import Batch, DataStats, Example, collate, load_jsonl, pack, split, step_rows
from .loss import chunked_cross_entropy


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int | None = None  # default: epochs x steps per epoch
    epochs: float = 1.0
    batch_size: int = 4  # rows per micro-batch per process
    grad_accum: int = 1
    seq_len: int = 512  # examples are cut to this many tokens (counted in the data stats)
    pack: bool = False
    val_split: float = 0.0
    eval_every: int = 0  # 0: only at the end (when there is validation data)
    save_every: int = 0  # 0: no periodic checkpoints (Ctrl-C and the end still save)
    keep_checkpoints: int = 2
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quant: str | None = None  # None, "int8" or "int4": QLoRA on a weight-only quantized frozen base
    grad_checkpointing: bool = False
    fsdp: bool = False
    seed: int = 0
    dtype: str = "auto"  # train_dtype: bfloat16 where bf16 matmuls are native (CUDA, AVX512-BF16/AMX)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = {k: v for k, v in asdict(self.lora).items() if k != "extra"}
        return d


@dataclass
class TrainResult:
    out: Path
    steps: int
    history: list[dict[str, Any]]  # one record per step: step, loss, lr, tokens, tok_s (+ val_loss)
    data: DataStats
    interrupted: bool = False

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.history]


class CausalLMLoss(nn.Module):
    """(loss sum, -) of a batch: the module DDP/FSDP wrap, so their hooks run around the whole forward."""

    def __init__(self, model: Gemma) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, positions: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        h = self.model.hidden_states(ids, positions)
        return chunked_cross_entropy(
            h, self.model.head_weight, targets, mask, softcap=self.model.config.final_logit_softcapping
        )


def train_dtype(dtype: str | None, device: torch.device) -> str:
    """The frozen base's dtype for fine-tuning: "auto" is bfloat16 where native_bf16(device), else float32.

    LoRA A/B, their gradients and AdamW state stay fp32 whatever this is (prepare_model); the head matmul runs in
    this dtype, as in inference, and the log-softmax and loss in fp32 (loss.py).
    """
    if dtype in (None, "auto"):
        return "bfloat16" if native_bf16(device) else "float32"  # bf16 only pays where it is native
    names = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
    if dtype not in names:
        raise GemmaError(f"unknown training dtype {dtype!r}; use auto, float32 or bfloat16")
    return names[dtype]


def enable_grad_checkpointing(model: Gemma) -> None:
    """Recompute each block's activations in backward instead of storing them (parameter names unchanged)."""
    for block in model.model.layers:
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at step s: linear warm-up over `warmup` steps, then cosine down to min_ratio."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def prepare_model(model: Gemma, cfg: TrainConfig, *, adapter: Path | None = None) -> list[nn.Parameter]:
    """Quantize the frozen base (QLoRA), attach fresh adapters (seeded) or a saved one; returns trainable params."""
    if cfg.quant is not None:
        quantize_model(model, cfg.quant)
    lcfg = cfg.lora
    if cfg.quant is not None:
        lcfg = replace(lcfg, extra={**lcfg.extra, "base_quantization": model.quantization})
    torch.manual_seed(cfg.seed)
    if adapter is not None:
        saved, state = read_adapter(adapter)
        inject(model, saved)
        load_adapter_weights(model, state, adapter)
    else:
        inject(model, lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # adapters train in fp32, also on a bf16 base
    return params


def finetune(
    model: Gemma,
    tokenizer,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    world: D.World | None = None,
    resume: bool = False,
    val_data: str | Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    base_name: str = "",
) -> TrainResult:
    """Train LoRA adapters on `model` (a Gemma module, modified in place) from a JSONL file; write them to `out`.

    `progress` is called on the main rank after every step with the step record (the CLI draws its bar from it).
    """
    world = world or D.World(0, 1, 0, model.head_weight.device)
    out = Path(out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    examples, stats = load_jsonl(data, tokenizer, model.config.family, max_len=cfg.seq_len)
    train_ex, val_ex = split(examples, cfg.val_split, cfg.seed)
    if val_data is not None:
        val_ex, _ = load_jsonl(val_data, tokenizer, model.config.family, max_len=cfg.seq_len)
    if cfg.pack:
        train_ex = pack(train_ex, cfg.seq_len)
    per_step = cfg.batch_size * cfg.grad_accum * world.size
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_ex) / per_step))
    cfg = replace(cfg, lora=replace(cfg.lora, base_model=cfg.lora.base_model or base_name))
    params = prepare_model(model, cfg)
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(model)
    model.train()
    loss_mod: nn.Module = CausalLMLoss(model)
    if world.distributed and cfg.fsdp:
        D.shard_frozen(world, loss_mod, list(model.model.layers), params)
    elif world.distributed:
        loss_mod = D.wrap_ddp(world, loss_mod)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sched = lr_lambda(
        cfg.warmup_steps, total, cfg.min_lr_ratio
    )  # a pure function of the step: resumes exactly
    history: list[dict[str, Any]] = []
    start = 0
    torch.manual_seed(cfg.seed + 1 + world.rank)  # dropout streams differ per rank, reproducibly
    if resume:
        start, history = _restore(out, model, opt, world)
    stop = _StopFlag()
    step = start
    with stop:
        while step < total:
            rec = _train_step(
                loss_mod, model, params, opt, sched, train_ex, step, cfg, world, tokenizer.pad_id
            )
            step += 1
            rec["step"], rec["total"] = step, total
            if val_ex and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                rec["val_loss"] = evaluate(loss_mod, val_ex, cfg.batch_size, world, tokenizer.pad_id)
                model.train()
            history.append(rec)
            if progress is not None and world.main:
                progress(rec)
            if D.any_rank(world, stop.requested):
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                _save(out, step, model, opt, history, cfg, world)
    interrupted = step < total
    if step > start:
        _save(out, step, model, opt, history, cfg, world)
    if world.main:
        save_adapter(model, out)
        summary = {
            "steps": step,
            "total_steps": total,
            "interrupted": interrupted,
            "config": cfg.to_json(),
            "data": asdict(stats),
            "train_rows": len(train_ex),
            "val_examples": len(val_ex),
            "world_size": world.size,
        }
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        with (out / "log.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in history)
    D.barrier(world)
    return TrainResult(out, step, history, stats, interrupted)


def _train_step(
    loss_mod: nn.Module,
    model: Gemma,
    params: list[nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: Callable[[int], float],
    rows: list[Example],
    step: int,
    cfg: TrainConfig,
    world: D.World,
    pad_id: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    idx = step_rows(len(rows), step, cfg.batch_size * cfg.grad_accum * world.size, cfg.seed)
    micro = [idx[m * cfg.batch_size : (m + 1) * cfg.batch_size] for m in range(cfg.grad_accum * world.size)]
    mine = [collate([rows[i] for i in mb], pad_id) for mb in micro[world.rank :: world.size]]
    n_targets, n_tokens = D.all_sum(world, [sum(b.n_targets for b in mine), sum(b.n_tokens for b in mine)])
    # DDP averages gradients over ranks; scaling by world / N makes the result sum(grad) / N over everything.
    scale = world.size / max(n_targets, 1.0)
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    ddp = hasattr(loss_mod, "no_sync")
    for k, batch in enumerate(mine):
        b = batch.to(world.device)
        sync = nullcontext() if (not ddp or k == len(mine) - 1) else loss_mod.no_sync()
        with sync:
            loss = loss_mod(b.ids, b.positions, b.targets, b.mask)
            (loss * scale).backward()
        loss_sum += loss.item()
    if world.distributed and not ddp:
        D.average_grads(world, params)  # FSDP path: the adapters are replicated, not sharded
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    lr = cfg.lr * sched(step)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    (loss_total,) = D.all_sum(world, [loss_sum])
    dt = time.perf_counter() - t0
    rec = {
        "loss": loss_total / max(n_targets, 1.0),
        "lr": lr,
        "tokens": int(n_tokens),
        "targets": int(n_targets),
        "seconds": dt,
        "tok_s": n_tokens / dt,
    }
    if norm is not None:
        rec["grad_norm"] = float(norm)
    return rec


@torch.no_grad()
def evaluate(loss_mod: nn.Module, rows: list[Example], batch_size: int, world: D.World, pad_id: int) -> float:
    """Mean loss per target token over `rows` (split across ranks), dropout off."""
    loss_mod.eval()
    mine = rows[world.rank :: world.size]
    total = count = 0.0
    for i in range(0, len(mine), batch_size):
        b: Batch = collate(mine[i : i + batch_size], pad_id).to(world.device)
        total += loss_mod(b.ids, b.positions, b.targets, b.mask).item()
        count += b.n_targets
    total, count = D.all_sum(world, [total, count])
    return total / max(count, 1.0)


def _save(
    out: Path,
    step: int,
    model: Gemma,
    opt: Any,
    history: list[dict[str, Any]],
    cfg: TrainConfig,
    world: D.World,
) -> None:
    rng = D.gather_objects(world, _rng_state())
    if world.main:
        state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "rng": rng,
            "history": history,
            "config": cfg.to_json(),
        }
        save_checkpoint(out, step, model, state, cfg.keep_checkpoints)
    D.barrier(world)


def _restore(out: Path, model: Gemma, opt: Any, world: D.World) -> tuple[int, list[dict[str, Any]]]:
    ckpt = latest_checkpoint(out)
    state = load_state(ckpt)
    _, weights = read_adapter(ckpt)
    load_adapter_weights(model, weights, ckpt)
    opt.load_state_dict(state["optimizer"])
    rng = state["rng"]
    if len(rng) != world.size:
        raise GemmaError(
            f"{ckpt} was written by {len(rng)} process(es); resume it with the same number (now {world.size})"
        )
    _set_rng_state(rng[world.rank])
    return int(state["step"]), list(state["history"])


def _rng_state() -> dict[str, Any]:
    s = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


class _StopFlag:
    """First Ctrl-C (or SIGTERM): finish the current step, save, stop. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
