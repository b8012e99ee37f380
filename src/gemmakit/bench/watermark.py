"""How well the SynthID-Text detector separates watermarked from unwatermarked samples of the same model.

Each prompt is continued twice with the same sampling settings and seeds, once with the watermark and once
without, at two settings: plain sampling (temperature 1) and gemmakit chat's defaults (temperature 0.7, top_k 64),
where the lower entropy leaves the watermark less room. Every sample is scored from its generated token ids, from
its text re-tokenized (as `gemmakit watermark detect` sees a file), and cut to its first 16 and 32 tokens.
Reported: the AUC of the mean and weighted-mean scores, the detector's true-positive rate at its 1% false-positive
verdict (p-value <= 0.01, from the exact null distribution), and the false-positive rate observed on the
unwatermarked samples (with a few dozen samples, only a gross miscalibration would show). Not a speed benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import numpy as np

from ..api import Model
from ..watermark.detector import CALIBRATION_FILE, Detection, detect, score_ids
from ..watermark.synthid import Watermark, WatermarkConfig
from .common import machine, write_results

# Openings of many kinds of text, so the samples do not share their topics.
PROMPTS = [
    "The history of the bicycle begins", "My grandmother's kitchen always smelled of", "To install the package, first",
    "The city council voted on Tuesday to", "Photosynthesis is the process by which", "Dear hiring manager,",
    "The detective looked at the broken window and", "In the mountains of northern Spain, shepherds",
    "Here are five tips for sleeping better:", "The match ended in a draw after", "Once upon a time, in a village",
    "The stock market fell sharply today as", "A good cup of coffee depends on", "The spacecraft entered orbit",
    "When I was twelve years old, my father", "The recipe calls for two cups of flour and",
    "Climate scientists warn that the oceans", "Our quarterly results show that revenue",
    "The old lighthouse keeper had never", "Learning to play the guitar takes", "The museum's new exhibition",
    "Volcanoes form when molten rock", "She opened the letter and read", "The rules of chess are simple:",
    "Electric cars have become popular because", "The river flooded the valley in", "Welcome to our hotel! Your room",
    "The committee reviewed the proposal and", "Bees communicate with each other by",
    "The first thing you notice about Tokyo is", "In this tutorial we will build", "The storm arrived just after",
]


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a watermarked sample scores above an unwatermarked one), ties counting one half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def generate(model: Model, prompts: Sequence[str], tokens: int, *, seed: int, watermark: Watermark | None,
             temperature: float, top_k: int | None, batch: int = 8) -> list[tuple[list[int], str]]:
    """(generated token ids, text) per prompt, in batches; EOS ignored so every sample has `tokens` tokens."""
    out: list[tuple[list[int], str]] = []
    for start in range(0, len(prompts), batch):
        results = model.generate(list(prompts[start:start + batch]), tokens, temperature=temperature,
                                 top_k=top_k, seed=seed + start, ignore_eos=True, logits_processors=watermark)
        out += [(r.token_ids, r.text) for r in results]
    return out


SETTINGS = [(1.0, None), (0.7, 64)]  # plain sampling, and gemmakit chat's defaults (lower entropy: a weaker mark)
LENGTHS = (16, 32)  # the same samples cut shorter, scored again


def separation(marked: Sequence[Detection], plain: Sequence[Detection]) -> dict[str, Any]:
    """AUC of both scores, TPR at the detector's own verdict (p <= fpr), and the FPR it actually had."""
    return {
        "auc_weighted_mean": auc([d.weighted_mean for d in marked], [d.weighted_mean for d in plain]),
        "auc_mean": auc([d.mean for d in marked], [d.mean for d in plain]),
        "tpr_at_fpr": mean(d.watermarked for d in marked),
        "observed_fpr": mean(d.watermarked for d in plain),
        "weighted_mean_watermarked": [mean(d.weighted_mean for d in marked), pstdev(d.weighted_mean for d in marked)],
        "weighted_mean_unwatermarked": [mean(d.weighted_mean for d in plain), pstdev(d.weighted_mean for d in plain)],
        "median_p_watermarked": float(np.median([d.p_value for d in marked])),
        "scored_tokens": mean(d.scored for d in marked),
    }


def null_rates(model: Model, *, key_sets: int = 25, tokens: int = 64) -> dict[str, Any]:
    """How often unwatermarked text is called watermarked: the shipped unwatermarked samples (safety/data), each
    cut to `tokens`, tested against `key_sets` fresh key sets; the rates should sit at (or below) the nominal."""
    text = resources.files("gemmakit.watermark").joinpath("data", CALIBRATION_FILE).read_text(encoding="utf-8")
    samples = [ids[:tokens] for para in text.split("\n\n")
               if len(ids := model.tokenizer.encode(para, bos=False)) >= tokens * 5 // 8]
    p = np.array([score_ids(ids, WatermarkConfig.generate(depth=30, ngram_len=5)).p_value
                  for _ in range(key_sets) for ids in samples])
    return {"tests": int(p.size), "samples": len(samples), "key_sets": key_sets,
            **{f"fpr_at_{a}": float((p <= a).mean()) for a in (0.01, 0.05, 0.1)}}


def run(source: str | None = None, *, samples: int = 32, tokens: int = 64, keys: str | None = None,
        seed: int = 0, fpr: float = 0.01) -> dict[str, Any]:
    from ..loader import load

    model = load(source, progress=False)
    config = WatermarkConfig.load(keys) if keys else WatermarkConfig.generate(depth=30, ngram_len=5)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(samples)]
    eos = model.tokenizer.eos_id
    result: dict[str, Any] = {"machine": machine(), "model": model.source, "samples": samples, "tokens": tokens,
                              "depth": config.depth, "ngram_len": config.ngram_len, "fpr": fpr, "runs": []}
    for temperature, top_k in SETTINGS:
        sides = [generate(model, prompts, tokens, seed=seed, watermark=wm, temperature=temperature, top_k=top_k)
                 for wm in (Watermark(config), None)]
        by_ids = [[score_ids(ids, config, eos_id=eos, fpr=fpr) for ids, _ in side] for side in sides]
        by_text = [[detect(text, config, model=model, fpr=fpr) for _, text in side] for side in sides]
        rows = {f"ids, {tokens} tokens": separation(*by_ids), f"text, {tokens} tokens": separation(*by_text)}
        for n in LENGTHS:
            cut = [[score_ids(ids[:n], config, eos_id=eos, fpr=fpr) for ids, _ in side] for side in sides]
            rows[f"ids, first {n} tokens"] = separation(*cut)
        result["runs"].append({"temperature": temperature, "top_k": top_k, "scores": rows})
    result["null"] = null_rates(model, tokens=tokens)
    return result


def markdown(r: dict[str, Any]) -> str:
    rows = [f"# SynthID-Text separation: {r['model']}", "",
            f"{r['samples']} watermarked and {r['samples']} plain samples of {r['tokens']} tokens per setting "
            f"(same prompts and seeds), depth {r['depth']}, ngram_len {r['ngram_len']}, verdict at p <= "
            f"{r['fpr']}; {r['machine']}", "",
            "| sampling | scored | AUC weighted mean | AUC mean | TPR at p <= fpr | observed FPR | "
            "weighted mean wm / plain | median p (wm) |",
            "|---|---|---|---|---|---|---|---|"]
    for run_ in r["runs"]:
        label = f"T={run_['temperature']}, top_k={run_['top_k']}"
        for scored, x in run_["scores"].items():
            rows.append(f"| {label} | {scored} | {x['auc_weighted_mean']:.3f} | {x['auc_mean']:.3f} | "
                        f"{x['tpr_at_fpr']:.3f} | {x['observed_fpr']:.3f} | {x['weighted_mean_watermarked'][0]:.3f} "
                        f"/ {x['weighted_mean_unwatermarked'][0]:.3f} | {x['median_p_watermarked']:.2g} |")
    n = r["null"]
    rows += ["", f"Unwatermarked text against fresh keys ({n['tests']} tests: {n['samples']} shipped samples x "
                 f"{n['key_sets']} key sets): called watermarked at p <= 0.01 / 0.05 / 0.1 in "
                 f"{n['fpr_at_0.01']:.4f} / {n['fpr_at_0.05']:.4f} / {n['fpr_at_0.1']:.4f} of cases."]
    return "\n".join(rows) + "\n"


def save(result: dict[str, Any], out: Path, name: str | None = None) -> Path:
    return write_results(out, name, result, markdown(result), "watermark")


def write_calibration(path: Path, source: str | None = None, *, samples: int = 128, tokens: int = 96) -> None:
    """The unwatermarked text detect.py calibrates with (sampled from the model at temperature 1, no keys)."""
    from ..loader import load

    model = load(source, progress=False)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(samples)]
    texts = [text.strip() for _, text in generate(model, prompts, tokens, seed=1000, watermark=None,
                                                   temperature=1.0, top_k=None)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(t.replace("\n\n", "\n") for t in texts if t) + "\n", encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Watermark separation (AUC, TPR at 1% FPR) on the embedded model.")
    ap.add_argument("source", nargs="?", default=None, help="model (default: embedded)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--write-calibration", type=Path, help="instead: write the calibration text to this file")
    a = ap.parse_args()
    if a.write_calibration:
        write_calibration(a.write_calibration, a.source)
    else:
        res = run(a.source, samples=a.samples, tokens=a.tokens)
        print(json.dumps(res, indent=1))
        print(markdown(res))
