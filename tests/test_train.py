"""The trainer on a tiny random model: loss goes down, resume replays the exact trajectory, Ctrl-C saves, QLoRA
and gradient checkpointing train, and torchrun (gloo, 2 processes; DDP and FSDP) equals one process with 2x
gradient accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemmakit
from finetune_helpers import records, tiny_model_folder, write_jsonl
from gemmakit.lora import LoRAConfig
from gemmakit.train.checkpoint import list_checkpoints
from gemmakit.train.trainer import TrainConfig, finetune, train_dtype

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    folder = tiny_model_folder(root / "model", "gemma3")
    data = write_jsonl(root / "data.jsonl", records(24))
    return folder, data


def _model(folder):
    return gemmakit.load(folder, dtype="float32", device="cpu", quant=None, progress=False)


def _cfg(**kw):
    base = dict(
        lr=5e-3,
        warmup_steps=2,
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        seq_len=64,
        seed=3,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "up_proj")),
    )
    base.update(kw)
    return TrainConfig(**base)


def _train(setup, out, **kw):
    folder, data = setup
    return _train_model(_model(folder), data, out, **kw)


def _train_model(m, data, out, **kw):
    resume = kw.pop("resume", False)
    progress = kw.pop("progress", None)
    return finetune(m.module, m.tokenizer, data, out, _cfg(**kw), resume=resume, progress=progress)


def test_loss_decreases_on_a_fixed_batch(setup, tmp_path):
    folder, _ = setup
    data = write_jsonl(tmp_path / "one.jsonl", records(4))
    m = _model(folder)
    r = finetune(
        m.module, m.tokenizer, data, tmp_path / "out", _cfg(max_steps=12, batch_size=4, grad_accum=1, lr=2e-2)
    )
    assert r.losses[-1] < 0.5 * r.losses[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    log = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, 13))
    # the saved adapter reproduces the trained model's logits
    ids = torch.arange(2, 30)[None]
    reloaded = gemmakit.load(folder, dtype="float32", quant=None, progress=False, adapter=tmp_path / "out")
    m.module.eval()
    with torch.no_grad():
        assert (m.module(ids) - reloaded.module(ids)).abs().max() < 1e-5


def test_auto_training_dtype_is_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    monkeypatch.delenv("GEMMAKIT_CFLAGS", raising=False)  # -mno-avx512f would stand for a CPU without bf16
    cpu = torch.device("cpu")
    for avx512_bf16, amx, want in (
        (False, False, "float32"),
        (True, False, "bfloat16"),
        (False, True, "bfloat16"),
    ):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert train_dtype("auto", cpu) == want
    assert train_dtype("fp32", cpu) == "float32" and train_dtype("bf16", cpu) == "bfloat16"
    with pytest.raises(gemmakit.GemmaError, match="float16"):
        train_dtype("float16", cpu)


def test_bf16_base_trains_fp32_adapters_and_tracks_the_fp32_loss_curve(setup, tmp_path):
    folder, data = setup
    runs = {}
    for dtype in ("float32", "bfloat16"):
        m = gemmakit.load(folder, dtype=dtype, device="cpu", quant=None, progress=False)
        runs[dtype] = _train_model(m, data, tmp_path / dtype, max_steps=8, lr=1e-2)
        lora = [p for n, p in m.module.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    fp32, bf16 = runs["float32"].losses, runs["bfloat16"].losses
    assert bf16[-1] < bf16[0]
    assert bf16 == pytest.approx(fp32, rel=0.03)


def test_hf_weights_are_converted_while_read_exactly_as_a_cast_and_truncation_is_named(setup, tmp_path):
    from safetensors.torch import load_file

    from gemmakit.weights.hf import read_hf_config, read_hf_state_dict

    folder, _ = setup
    cfg = read_hf_config(folder)
    ref = load_file(folder / "model.safetensors")
    got = read_hf_state_dict(folder, cfg, dtype=torch.bfloat16)
    assert got.keys() == ref.keys() - {"lm_head.weight"}
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in got)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((folder / "config.json").read_text())
    raw = (folder / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(gemmakit.GemmaError, match="truncated"):
        read_hf_state_dict(cut, cfg, dtype=torch.bfloat16)


def test_ctrl_c_saves_and_resume_continues_the_exact_trajectory(setup, tmp_path):
    def interrupt(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: finish this step, save, stop

    straight = _train(setup, tmp_path / "a")
    first = _train(setup, tmp_path / "b", progress=interrupt, save_every=2)
    assert first.interrupted and first.steps == 3
    assert [c.name for c in list_checkpoints(tmp_path / "b")] == ["step-000002", "step-000003"]
    assert json.loads((tmp_path / "b" / "training.json").read_text())["interrupted"]
    resumed = _train(setup, tmp_path / "b", resume=True)
    assert first.losses == straight.losses[:3]
    assert resumed.steps == 6 and resumed.losses == pytest.approx(straight.losses, rel=0, abs=1e-6)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_qlora_with_gradient_checkpointing_trains(setup, tmp_path, quant):
    r = _train(
        setup,
        tmp_path / quant,
        quant=quant,
        grad_checkpointing=True,
        max_steps=8,
        lr=2e-2,
        pack=True,
        val_split=0.2,
        eval_every=4,
    )
    assert r.losses[-1] < r.losses[0]
    assert "val_loss" in r.history[3] and "val_loss" in r.history[7]
    extra = json.loads((tmp_path / quant / "gemmakit_adapter.json").read_text())
    assert extra["base_quantization"]["mode"] == quant


def _cli(args, env_extra=None, nproc=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = (
        [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "gemmakit"]
        if nproc
        else [str(BIN / "gemmakit")]
    )
    p = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_equal_one_process_with_double_accumulation(setup, tmp_path):
    folder, data = setup
    common = [
        "finetune",
        str(data),
        "-m",
        str(folder),
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--lr",
        "5e-3",
        "--warmup",
        "1",
        "--targets",
        "q_proj,v_proj",
        "--device",
        "cpu",
    ]
    _cli(common + ["-o", str(tmp_path / "one"), "--grad-accum", "2"])
    _cli(common + ["-o", str(tmp_path / "ddp")], nproc=2)
    _cli(common + ["-o", str(tmp_path / "fsdp"), "--fsdp"], nproc=2)
    one, ddp, fsdp = (_losses(tmp_path / n) for n in ("one", "ddp", "fsdp"))
    assert len(one) == len(ddp) == len(fsdp) == 4
    assert one[-1] < one[0]
    assert ddp == pytest.approx(one, abs=1e-5)
    assert fsdp == pytest.approx(one, abs=1e-5)
    assert json.loads((tmp_path / "ddp" / "training.json").read_text())["world_size"] == 2


def test_finetune_bench_runs_every_side_on_the_same_model_and_tokens(setup, tmp_path):
    from gemmakit.bench.finetune import SIDES, markdown, run_finetune_bench, save

    folder, _ = setup
    r = run_finetune_bench(
        str(folder), steps=2, seq_len=16, batch_size=2, rank=4, threads=1, repeats=1, dtype="float32"
    )
    ours, fp32, bf16 = (r["runs"][s][0] for s in SIDES)
    assert ours["tokens"] == fp32["tokens"] == bf16["tokens"] == 2 * 2 * 16
    assert (ours["dtype"], fp32["dtype"], bf16["dtype"]) == ("float32", "float32", "bfloat16")
    assert ours["first_loss"] == pytest.approx(fp32["first_loss"], abs=1e-3)  # same base, same tokens
    assert bf16["first_loss"] == pytest.approx(fp32["first_loss"], rel=0.05)  # the same model, rounded
    assert r["tokens_per_s_ratio"] == r["ratios"]["transformers"]["tokens_per_s"] > 0
    assert r["peak_rss_ratio"] == r["ratios"]["transformers"]["peak_rss_mb"] > 0
    path = save(r, tmp_path)
    assert json.loads(path.read_text())["median"] == r["median"]
    assert path.with_suffix(".md").read_text() == markdown(r) and "(bf16)" in markdown(r)
