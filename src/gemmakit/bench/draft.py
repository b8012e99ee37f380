"""Benchmark of assistant drafting (speculative.py) at E4B widths with trimmed layers, random weights.

Run:  python -m gemmakit.bench.draft [--layers 6] [--vocab 32768] [--tokens 64] [--repeats 3] [-o benchmarks/results]

Two drafters against one target, each decoded plainly and with the drafter, alternating, medians of `repeats`:
- "agreeing" (the issue's recipe): the target's post-attention / post-feedforward norms scaled down so the residual
  stream stays near the token embedding; the drafter gets the target's embedding table (its tied head), an
  identity pre_projection on the embedding half, its own post norms scaled down too, and a centroid head whose
  centroids are the sums of their clusters' embeddings: both then predict the token they are given.
- "never agreeing": the same shapes with random weights (acceptance ~ 1/V).
The target runs on the fast path (Q8_0 blocks, native kernels); the drafter in fp32 PyTorch. A round's cost is
split into the drafter's steps and the verification forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from .. import speculative
from ..config import GLOBAL, SLIDING, preset
from ..draft import Drafter, DrafterConfig
from ..generate import generate_step
from ..model import Gemma
from ..quant import fast_path
from ..sampling import SamplingParams
from .common import isa, machine, peak_rss_mb, write_results


def target(layers: int, vocab: int, agree: bool) -> tuple[Gemma, torch.Tensor]:
    e4b = preset("gemma-4-e4b")
    half = layers // 2  # two sliding/global groups; the last two layers share KV as E4B's last 18 do
    types = (SLIDING,) * (half - 1) + (GLOBAL,) + (SLIDING,) * (layers - half - 1) + (GLOBAL,)
    cfg = e4b.replace(num_hidden_layers=layers, layer_types=types, vocab_size=vocab, vocab_size_per_layer_input=vocab,
                      num_kv_shared_layers=2, name=f"e4b-{layers}l")
    torch.manual_seed(0)
    m = Gemma(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 0.02 if "embed" not in name else 1.0)
        if agree:
            for b in m.model.layers:
                b.post_attention_layernorm.weight.fill_(1e-3)
                b.post_feedforward_layernorm.weight.fill_(1e-3)
                b.post_per_layer_input_norm.weight.fill_(1e-3)
    embed = m.model.embed_tokens.weight.detach().clone()
    return fast_path.to_q8(m), embed


def drafter(tcfg, embed: torch.Tensor, agree: bool) -> Drafter:
    text = tcfg.replace(num_hidden_layers=4, layer_types=(SLIDING,) * 3 + (GLOBAL,), intermediate_size=2048,
                        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=0,
                        use_double_wide_mlp=False, name="drafter")
    cfg = DrafterConfig(text, tcfg.hidden_size, True, num_centroids=2048, centroid_intermediate_top_k=32)
    torch.manual_seed(1)
    d = Drafter(cfg).eval()
    with torch.no_grad():
        for name, p in d.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
        d.model.embed_tokens.weight.normal_(0.0, 1.0)
        if agree:
            D = tcfg.hidden_size
            d.model.embed_tokens.weight.copy_(embed)
            d.pre_projection.weight.zero_()
            d.pre_projection.weight[:, :D] = torch.eye(D) / tcfg.hidden_size**0.5  # undo the sqrt(D) input scale
            for b in d.model.layers:
                b.post_attention_layernorm.weight.fill_(1e-3)
                b.post_feedforward_layernorm.weight.fill_(1e-3)
            d.masked_embedding.centroids.weight.copy_(embed.view(2048, -1, D).sum(1))
    return d


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure(module, d, prompt, tokens: int, k: int, repeats: int) -> dict:
    """Alternating plain / drafted runs: medians of tok/s, acceptance, and a round's split."""
    plain, drafted, acc, split = [], [], [], {"draft_s": [], "verify_s": [], "rounds": []}
    real_propose, real_hidden = speculative.propose, module.hidden_states
    for _ in range(repeats):
        dt, _ = _timed(lambda: list(generate_step(module, [prompt], SamplingParams(), tokens)))
        plain.append(tokens / dt)
        times = {"draft": 0.0, "verify": 0.0}

        def propose(*a, times=times, **kw):
            t = time.perf_counter()
            out = real_propose(*a, **kw)
            times["draft"] += time.perf_counter() - t
            return out

        def hidden(*a, times=times, **kw):
            t = time.perf_counter()
            out = real_hidden(*a, **kw)
            times["verify"] += time.perf_counter() - t
            return out

        rounds = [[]]
        speculative.propose, module.hidden_states = propose, hidden
        try:
            dt, _ = _timed(lambda rounds=rounds: list(speculative.speculative_step(
                module, d, [prompt], SamplingParams(), tokens, k, rounds=rounds)))
        finally:
            speculative.propose = real_propose
            del module.hidden_states
        drafted.append(tokens / dt)
        n_drafted = sum(len(r.drafted) for r in rounds[0])
        acc.append(sum(r.accepted for r in rounds[0]) / max(1, n_drafted))
        split["draft_s"].append(times["draft"])
        split["verify_s"].append(times["verify"])
        split["rounds"].append(len(rounds[0]))
    med = statistics.median
    return {"plain_tok_s": med(plain), "draft_tok_s": med(drafted), "ratio": med(drafted) / med(plain),
            "ratios": [b / a for a, b in zip(plain, drafted, strict=True)], "acceptance": med(acc),
            "rounds": med(split["rounds"]), "draft_ms_per_round": 1e3 * med(split["draft_s"]) / max(1, med(split["rounds"])),
            "verify_ms_per_round": 1e3 * med(split["verify_s"]) / max(1, med(split["rounds"])),
            "plain": plain, "drafted": drafted}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    prompt = [2, *range(1000, 1030)]
    result = {"machine": machine(), "isa": isa(), "threads": 2, "layers": a.layers, "vocab": a.vocab,
              "tokens": a.tokens, "draft_tokens": a.draft_tokens, "note": "shared machine: other jobs ran"}
    for kind, agree in (("agreeing", True), ("never_agreeing", False)):
        module, embed = target(a.layers, a.vocab, agree)
        d = drafter(module.config, embed, agree)
        result[kind] = measure(module, d, prompt, a.tokens, a.draft_tokens, a.repeats)
        del module, d, embed
    result["peak_rss_mb"] = peak_rss_mb()
    rows = [f"| {k} | {v['plain_tok_s']:.2f} | {v['draft_tok_s']:.2f} | {v['ratio']:.2f}x | {v['acceptance']:.0%} | "
            f"{v['draft_ms_per_round']:.0f} | {v['verify_ms_per_round']:.0f} |"
            for k, v in ((k, result[k]) for k in ("agreeing", "never_agreeing"))]
    table = (f"# Assistant drafter, E4B widths, {a.layers} layers, vocab {a.vocab} ({machine()}, "
             "2 threads, shared machine)\n\n| drafter | plain tok/s | drafted tok/s | ratio | accepted | draft ms/round "
             "| verify ms/round |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    out = write_results(a.out, a.name, result, table, kind="draft")
    print(table)
    return out


if __name__ == "__main__":
    main()
