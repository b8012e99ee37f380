"""SynthID-Text: g-values, processed scores, sampling and detection masks equal to transformers'
(SynthIDTextWatermarkLogitsProcessor, generate with a watermarking_config); the exact null distribution; the keys
file; watermarked text from the embedded model detected, batched and single; `gemmakit run --watermark` scored by
transformers equals `gemmakit watermark detect`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import SynthIDTextWatermarkingConfig
from transformers.generation.logits_process import SynthIDTextWatermarkLogitsProcessor

import gemmakit
from gemmakit import GemmaError
from gemmakit.loader import load_tokenizer
from gemmakit.watermark import detector as det
from gemmakit.watermark.synthid import GValues, Watermark, WatermarkConfig, WatermarkState
from helpers import TINY, hf_model
from reference import hf_gguf_tokenizer_dir

KEYS = [654, 400, 836, 123, 340, 443, 597, 160, 57, 2**62 + 5, -7]


def hf_processor(cfg: WatermarkConfig) -> SynthIDTextWatermarkLogitsProcessor:
    return SynthIDTextWatermarkingConfig(**cfg.to_dict()).construct_processor(0, torch.device("cpu"))


def hf_mean_scores(cfg: WatermarkConfig, ids: list[int], eos_id: int) -> tuple[float, float]:
    """Mean and weighted-mean scores the way a reader of transformers + SynthID's detector_mean.py computes them."""
    proc = hf_processor(cfg)
    x = torch.tensor([ids])
    g = proc.compute_g_values(x).double()
    mask = proc.compute_context_repetition_mask(x) * proc.compute_eos_token_mask(x, eos_id)[:, cfg.ngram_len - 1:]
    mask = mask.double()
    depth = g.shape[-1]
    mean = (g * mask[..., None]).sum() / (depth * mask.sum())
    w = torch.linspace(10, 1, depth, dtype=torch.double)
    w = w * depth / w.sum()
    weighted = (g * w * mask[..., None]).sum() / (depth * mask.sum())
    return mean.item(), weighted.item()


@pytest.mark.parametrize("size", [2**16, 1000, 2**10])
def test_g_values_equal_transformers(size):
    cfg = WatermarkConfig(ngram_len=5, keys=KEYS, sampling_table_size=size, sampling_table_seed=3)
    ids = torch.randint(0, 262144, (3, 40), generator=torch.Generator().manual_seed(0))
    hf = hf_processor(cfg)
    assert torch.equal(GValues(cfg).table, hf.sampling_table)
    assert torch.equal(GValues(cfg).of_ngrams(ids), hf.compute_g_values(ids))


@pytest.mark.parametrize("settings", [{}, {"sampling_table_size": 1000}, {"skip_first_ngram_calls": True},
                                      {"debug_mode": True}], ids=["default", "table-1000", "skip-first", "debug"])
def test_processed_scores_bitwise_equal_transformers(settings):
    """Several steps of a batch of 3 with -inf entries (as after top-k) and repeated contexts: same float32 bits."""
    cfg = WatermarkConfig(ngram_len=4, keys=KEYS[:6], context_history_size=5, **settings)
    hf, ours = hf_processor(cfg), WatermarkState(GValues(cfg), 3)
    rows = [Watermark(cfg)()[0] for _ in range(3)]  # the per-row processors of the generation hook
    gen = torch.Generator().manual_seed(1)
    V = 3000
    ids, last = torch.randint(0, V, (3, 4), generator=gen), None
    for step in range(12):
        scores = torch.randn(3, V, generator=gen) * 3
        scores[0, :100] = float("-inf")
        expected = hf(ids, scores.clone())
        assert torch.equal(ours(scores.clone(), last), expected), step
        for b, proc in enumerate(rows):
            assert torch.equal(proc.process(scores[b].clone()), expected[b]), (step, b)
        token = torch.multinomial(torch.softmax(expected, -1), 1, generator=gen)[:, 0]
        if step in (5, 6, 7, 8):
            token = torch.full((3,), 5)  # the same context again: left unwatermarked
        for b, proc in enumerate(rows):
            proc.accept(int(token[b]))
        ids, last = torch.cat([ids, token[:, None]], 1), token


def test_generation_equals_transformers_generate(tmp_path: Path):
    """Same tiny weights, keys, temperature, top_k and seed: gemmakit's tokens equal transformers' generate with
    a watermarking_config, and the watermark changed them."""
    cfg = TINY["gemma3"]
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    model = gemmakit.load(tmp_path, progress=False)
    model.tokenizer = load_tokenizer()  # ids < 512 are real pieces of the embedded vocabulary: text to decode
    wm = WatermarkConfig(ngram_len=3, keys=KEYS[:4])
    prompts = torch.randint(3, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    expected = ref.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=0.7,
                            top_k=20, top_p=1.0, max_new_tokens=16, min_new_tokens=16, pad_token_id=0,
                            eos_token_id=None, watermarking_config=SynthIDTextWatermarkingConfig(**wm.to_dict()))
    got = model.generate(prompts.tolist(), 16, temperature=0.7, top_k=20, seed=11, ignore_eos=True,
                         logits_processors=Watermark(wm))
    assert [r.token_ids for r in got] == expected[:, 6:].tolist()
    plain = model.generate(prompts.tolist(), 16, temperature=0.7, top_k=20, seed=11, ignore_eos=True)
    assert [r.token_ids for r in plain] != [r.token_ids for r in got]


def test_masks_and_scores_equal_transformers():
    cfg = WatermarkConfig(ngram_len=4, keys=KEYS[:9], context_history_size=7)
    ids = torch.randint(0, 60, (150,), generator=torch.Generator().manual_seed(0))
    ids[40:50], ids[80:92], ids[120] = ids[10:20], 7, 1  # repeated contexts, a run, an EOS
    ids = ids.tolist()
    hf = hf_processor(cfg)
    x = torch.tensor([ids])
    repeated = det.repetition_mask(GValues(cfg), ids)
    assert (repeated == hf.compute_context_repetition_mask(x)[0].numpy()).all() and not repeated.all()
    assert (det.eos_mask(ids, 4, 1) == hf.compute_eos_token_mask(x, 1)[0, 3:].numpy().astype(bool)).all()
    d = det.score_ids(ids, cfg, eos_id=1)
    mean, weighted = hf_mean_scores(cfg, ids, 1)
    assert d.mean == pytest.approx(mean, abs=1e-12) and d.weighted_mean == pytest.approx(weighted, abs=1e-12)
    assert d.scored == int((det.g_values(GValues(cfg), ids, 1)[1]).sum()) < len(ids) - 3


def test_tail_probability_is_exact():
    pmf = np.array([0.2, 0.5, 0.3])
    direct = np.array([1.0])
    for _ in range(12):
        direct = np.convolve(direct, pmf)
    for s in (0, 5, 12, 18, 23, 24):
        assert det.tail_probability(pmf, 12, s) == pytest.approx(direct[s:].sum(), rel=1e-9)
    assert det.tail_probability(pmf, 12, 25) == 0.0
    # far tails keep their precision (tilting): 2000 windows, 30 above the mean by 12 standard deviations
    tiny = det.tail_probability(np.array([0.5, 0.5]), 2000, 1268)
    log_exact = np.logaddexp.reduce([_log_binom(2000, k) for k in range(1268, 2001)]) - 2000 * np.log(2)
    assert np.log(tiny) == pytest.approx(log_exact, rel=1e-6)


def _log_binom(n: int, k: int) -> float:
    from math import lgamma

    return lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1)


def test_exact_null_matches_random_text():
    """Text that never saw the keys (random tokens): per-window scores follow the enumerated distribution, and
    the detector's p-values are (conservatively) uniform."""
    cfg = WatermarkConfig(ngram_len=5, keys=list(range(30)))
    weights = det.layer_weights(30)
    pmf, null = det.window_pmf(GValues(cfg), weights, None)
    assert null == "exact" and pmf.sum() == pytest.approx(1.0)
    rng = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 262144, (20000,), generator=rng).tolist()
    g, mask = det.g_values(GValues(cfg), ids)
    observed = np.bincount(g[mask] @ weights, minlength=len(pmf)) / mask.sum()
    cdf_gap = np.abs(np.cumsum(observed) - np.cumsum(pmf)).max()
    assert cdf_gap < 0.015  # Kolmogorov-Smirnov distance; 1% critical value at n=20000 is 0.0115
    p = np.array([det.score_ids(ids[i:i + 64], cfg).p_value for i in range(0, 12800, 64)])
    assert 0.0 <= (p <= 0.05).mean() <= 0.09 and 0.4 <= (p <= 0.5).mean() <= 0.6


def test_calibrated_null_for_other_table_sizes():
    """A table size that is not a power of two has no enumeration: one window's null distribution is measured on
    the shipped unwatermarked text, and agrees with random text's."""
    cfg = WatermarkConfig(ngram_len=5, keys=list(range(30)), sampling_table_size=1000)
    tok = load_tokenizer()
    weights = det.layer_weights(30)
    pmf, null = det.window_pmf(GValues(cfg), weights, tok)
    assert null == "calibrated" and len(det.calibration_ids(tok)) > 4000
    ids = torch.randint(0, 262144, (20000,), generator=torch.Generator().manual_seed(3)).tolist()
    g, mask = det.g_values(GValues(cfg), ids)
    observed = np.bincount(g[mask] @ weights, minlength=len(pmf)) / mask.sum()
    assert np.abs(np.cumsum(observed) - np.cumsum(pmf)).max() < 0.035  # two-sample KS, 5k vs 20k windows
    d = det.score_ids(ids[:200], cfg, tokenizer=tok)
    assert d.null == "calibrated" and d.p_value > 1e-3
    with pytest.raises(GemmaError, match="tokenizer"):
        det.score_ids(ids[:200], cfg)


def test_keys_file(tmp_path: Path):
    path = tmp_path / "keys.json"
    cfg = WatermarkConfig.generate(depth=9, ngram_len=4)
    cfg.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert WatermarkConfig.load(path) == cfg
    data = json.loads(path.read_text())
    assert SynthIDTextWatermarkingConfig(**data).keys == list(cfg.keys)  # transformers reads it as is
    nested = tmp_path / "detector_config.json"
    nested.write_text(json.dumps({"watermarking_config": data, "model_name": "x"}))
    assert WatermarkConfig.load(nested) == cfg
    for bad, message in [({"keys": [1]}, "missing ngram_len"), ({**data, "colour": 1}, "unknown field"),
                         ({**data, "keys": []}, "non-empty"), ({**data, "sampling_table_size": 2**25}, "2\\*\\*24"),
                         ({**data, "ngram_len": 1}, "ngram_len")]:
        with pytest.raises(GemmaError, match=message):
            WatermarkConfig.from_dict(bad)
    with pytest.raises(GemmaError, match="keygen"):
        WatermarkConfig.load(tmp_path / "missing.json")


def test_embedded_model_batched_sampling_is_detected(fast_model):
    keys = WatermarkConfig(ngram_len=5, keys=list(range(1, 31)))
    prompts = ["The history of the bicycle begins", "Dear hiring manager,"]
    marked = fast_model.generate(prompts, 32, temperature=1.0, seed=3, ignore_eos=True,
                                 logits_processors=Watermark(keys))
    plain = fast_model.generate(prompts, 32, temperature=1.0, seed=3, ignore_eos=True)
    for m, p in zip(marked, plain, strict=True):
        wm = det.detect(m.token_ids, keys, model=fast_model)
        assert wm.watermarked and wm.p_value < 1e-4 and wm.weighted_mean > 0.58
        assert det.detect(p.token_ids, keys, model=fast_model).p_value > 1e-3


def test_embedded_model_greedy_batch_equals_single(fast_model):
    """Greedy decoding with a watermark is deterministic: a batch gives each row's single-run tokens."""
    keys = WatermarkConfig(ngram_len=3, keys=[7, 8, 9])
    prompts = ["The capital of France is", "Water boils at"]
    batch = fast_model.generate(prompts, 8, ignore_eos=True, logits_processors=Watermark(keys))
    for prompt, row in zip(prompts, batch, strict=True):
        single = fast_model.generate(prompt, 8, ignore_eos=True, logits_processors=Watermark(keys))
        assert single.token_ids == row.token_ids
    plain = fast_model.generate(prompts, 8, ignore_eos=True)
    assert [r.token_ids for r in batch] != [r.token_ids for r in plain]


def test_run_output_scored_by_transformers_equals_detect(tmp_path: Path):
    """The independent check: `gemmakit run --watermark` output, scored with transformers' own g-values and
    masks, gives `gemmakit watermark detect`'s scores."""
    from transformers import AutoTokenizer

    keys = tmp_path / "keys.json"
    # keys as `gemmakit watermark keygen` writes them, but fixed: with fresh random keys, 32 tokens fell short of
    # p < 1e-3 once in a while (p = 0.002 in one run)
    rng = random.Random(4)
    WatermarkConfig(ngram_len=5, keys=tuple(rng.randrange(2**53) for _ in range(30)),
                    sampling_table_seed=rng.randrange(2**53)).save(keys)
    cli = [sys.executable, "-m", "gemmakit"]
    run = subprocess.run([*cli, "run", "Write about the tides:", "--watermark", str(keys), "-t", "1.0", "--seed",
                          "4", "-n", "64", "--no-stats"], check=True, capture_output=True, text=True)
    (tmp_path / "out.txt").write_text(run.stdout)
    out = json.loads(subprocess.run([*cli, "watermark", "detect", str(tmp_path / "out.txt"), "--keys", str(keys),
                                     "--json"], check=True, capture_output=True, text=True).stdout)
    tok = AutoTokenizer.from_pretrained(str(hf_gguf_tokenizer_dir()))
    ids = tok(run.stdout, add_special_tokens=False)["input_ids"]
    mean, weighted = hf_mean_scores(WatermarkConfig.load(keys), ids, tok.eos_token_id)
    assert out["mean"] == pytest.approx(mean, abs=1e-9) and out["weighted_mean"] == pytest.approx(weighted, abs=1e-9)
    assert out["tokens"] == len(ids) and out["watermarked"] and out["p_value"] < 1e-3
    bad = subprocess.run([*cli, "watermark", "detect", str(tmp_path / "out.txt"), "--keys",
                          str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and "keygen" in bad.stderr and "Traceback" not in bad.stderr
