"""Perplexity (against transformers' guide), the chunked scorer, and the lm-eval model type on local tasks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemmakit.embedded import embedded_path
from gemmakit.errors import GemmaError
from gemmakit.evaluate import perplexity, score, score_batch
from gemmakit.evaluate.perplexity import windows
from reference import texts

DATA = Path(__file__).parent / "data" / "lm_eval"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1 from one full forward (Model.logits): the scorer's reference."""
    logits = model.logits(ids)[:-1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_window_plan_is_the_guides_loop():
    assert windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert windows(3, 8, 4) == [(0, 3, 3)]


def test_perplexity_equals_transformers_guide(embedded_model, fast_model):
    """The reference path gives the guide's number (rel <= 1e-4) with window < text (several windows); the fast
    path's number is reported and stays within the fast path's quality budget."""
    from eval_reference import guide_perplexity

    text = texts()["prose"] + "\n\n" + texts()["code"]
    hf = guide_perplexity(embedded_path(progress=False), text, 256, 128)
    ref = perplexity(embedded_model, text, window=256, stride=128)
    fast = perplexity(fast_model, text, window=256, stride=128)
    print(f"\nguide {hf['perplexity']:.5f}, reference {ref.perplexity:.5f}, fast {fast.perplexity:.5f}")
    assert ref.windows > 3
    assert abs(ref.perplexity - hf["perplexity"]) <= 1e-4 * hf["perplexity"]
    assert ref.tokens == hf["n_tokens"] + ref.windows - 1  # the guide counts one token less per later window
    assert abs(fast.perplexity / ref.perplexity - 1) < 0.02


def test_one_window_is_the_plain_definition(embedded_model):
    """A window covering the text scores every token after <bos> once: exp(mean NLL) of the full forward,
    bits per byte from the same sum; progress reaches the total."""
    text = texts()["multilingual"]
    ids = embedded_model.tokenizer.encode(text)
    nll = -direct_logprobs(embedded_model, ids)
    seen = []
    r = perplexity(embedded_model, text, window=1024, on_progress=lambda d, t: seen.append((d, t)))
    assert r.windows == 1 and r.tokens == len(ids) - 1
    assert math.isclose(r.perplexity, math.exp(nll.mean().item()), rel_tol=1e-4)
    assert math.isclose(r.bits_per_byte, nll.sum().item() / math.log(2) / len(text.encode()), rel_tol=1e-4)
    assert seen[-1][0] == seen[-1][1] == len(ids) - 1


def test_chunked_and_batched_scoring_equal_the_full_forward(embedded_model):
    """Chunks through the KV cache (including a chunk short enough for the native decode step) and a
    right-padded batch give the full forward's log-probabilities; greedy flags are the argmax."""
    ids = embedded_model.tokenizer.encode(texts()["code"])[:80]
    full = direct_logprobs(embedded_model, ids)
    chunked = score(embedded_model, ids, 1, chunk=32)  # 32 + 32 + 15 tokens
    assert torch.allclose(chunked.logprobs, full, atol=1e-4, rtol=1e-5)
    rows, starts = [ids[:20], ids[:80], ids[:7]], [5, 60, 1]
    for r, s, got in zip(rows, starts, score_batch(embedded_model, rows, starts, chunk=32), strict=True):
        want = direct_logprobs(embedded_model, r)[s - 1:]
        assert torch.allclose(got.logprobs, want, atol=1e-4, rtol=1e-5)
        argmax = embedded_model.logits(r)[s - 1:-1].argmax(-1) == torch.tensor(r[s:])
        assert torch.equal(got.greedy, argmax)


class _Request:
    def __init__(self, *args):
        self.args = args


def test_adapter_loglikelihoods_equal_direct_computation(embedded_model):
    pytest.importorskip("lm_eval")
    from gemmakit.evaluate.harness import GemmakitLM

    lm = GemmakitLM(pretrained=embedded_model, batch_size=2)
    tok = embedded_model.tokenizer
    pairs = [("Question: What is the capital of France?\nAnswer:", " Paris"),
             ("The quick brown fox", " jumps over the lazy dog"), ("", "Hello world")]
    got = lm.loglikelihood([_Request(c, x) for c, x in pairs], disable_tqdm=True)
    for (context, cont), (lp, greedy) in zip(pairs, got, strict=True):
        ctx = tok.encode(context) if context else [tok.bos_id]
        whole = tok.encode(context + cont) if context else [tok.bos_id, *tok.encode(cont, bos=False)]
        want = direct_logprobs(embedded_model, whole)[len(ctx) - 1:]
        assert math.isclose(lp, want.sum().item(), rel_tol=1e-4, abs_tol=1e-3), (context, lp, want.sum())
        assert greedy == bool((embedded_model.logits(whole)[len(ctx) - 1:-1].argmax(-1)
                               == torch.tensor(whole[len(ctx):])).all())
    doc = texts()["prose"][:300]
    (rolling,) = lm.loglikelihood_rolling([_Request(doc)], disable_tqdm=True)
    ids = tok.encode(doc)  # lm-eval's rolling windows: <bos> as the prefix of the first predicted token (<bos>)
    want = direct_logprobs(embedded_model, [tok.bos_id, *ids]).sum().item()
    assert math.isclose(rolling, want, rel_tol=1e-4)
    prompt = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert lm.tok_encode(prompt) == embedded_model.chat_ids([{"role": "user", "content": "Hi"}])
    prefill = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert lm.apply_chat_template(prefill, add_generation_prompt=False).endswith("model\nHello")
    lm.context = 24  # several rolling windows: each token still scored once, with the most context that fits
    (windowed,) = lm.loglikelihood_rolling([_Request(doc)], disable_tqdm=True)
    assert windowed < 0 and abs(windowed - want) > 1e-3


def _task_yamls(folder: Path) -> None:
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    (folder / "mc.yaml").write_text(
        "task: gk_mc\n" + common.format(path=DATA / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    (folder / "rolling.yaml").write_text(
        "task: gk_rolling\n" + common.format(path=DATA / "docs.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: gk_gen\n" + common.format(path=DATA / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


def test_lm_eval_cli_runs_the_gemmakit_model_on_local_tasks(tmp_path, embedded_model):
    """The plain `lm_eval` CLI finds --model gemmakit (installed hook), runs the three request types on JSONL
    tasks offline, and its per-sample log-likelihoods equal the adapter's scorer."""
    pytest.importorskip("lm_eval")
    _task_yamls(tmp_path)
    lm_eval = Path(sys.executable).with_name("lm_eval")
    cmd = [str(lm_eval), "--model", "gemmakit", "--model_args", "quant=none", "--tasks", "gk_mc,gk_rolling,gk_gen",
           "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "4", "--limit", "2",
           "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert set(results) == {"gk_mc", "gk_rolling", "gk_gen"}
    assert 0 < results["gk_rolling"]["bits_per_byte,none"] < 3
    sample = json.loads(next((tmp_path / "out").rglob("samples_gk_mc_*.jsonl")).read_text().splitlines()[0])
    context, choice = sample["arguments"]["gen_args_0"]["arg_0"], sample["arguments"]["gen_args_0"]["arg_1"]
    tok = embedded_model.tokenizer
    whole, ctx = tok.encode(context + choice), tok.encode(context)
    want = direct_logprobs(embedded_model, whole)[len(ctx) - 1:].sum().item()
    assert math.isclose(float(sample["resps"][0][0][0]), want, rel_tol=1e-4, abs_tol=1e-3)


def test_eval_perplexity_cli_json(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(texts()["prose"][:800])
    p = subprocess.run([sys.executable, "-m", "gemmakit", "eval", "perplexity", str(f), "--window", "128",
                        "--stride", "64", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["window"] == 128 and out["stride"] == 64 and out["tokens"] > 100
    assert 1 < out["perplexity"] < 100 and 0 < out["bits_per_byte"] < 3


def test_bad_windows_are_refused(fast_model):
    with pytest.raises(GemmaError, match="--stride"):
        perplexity(fast_model, "Some text to score.", window=64, stride=65)
    with pytest.raises(GemmaError, match="context"):
        perplexity(fast_model, "Some text.", window=fast_model.config.max_position_embeddings + 1)
    with pytest.raises(GemmaError, match="empty"):
        perplexity(fast_model, "")
