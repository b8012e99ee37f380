"""Assistant drafters (MTP) against transformers' Gemma4AssistantForCausalLM and its assisted generation on random
tiny target/assistant pairs, greedy exactness at batch 1, 4 and 8, and the speculative-sampling distribution."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.config import GLOBAL, SLIDING
from gemmakit.draft import DrafterConfig
from gemmakit.errors import GemmaError
from gemmakit.generate import generate_step
from gemmakit.sampling import SamplingParams
from gemmakit.speculative import Round, speculative_step
from helpers import TINY4, TINY4_UNIFIED, hf_model, tiny_config

PROMPT = [2, 17, 99, 240, 3, 77, 401, 12, 9, 300, 45]


def assistant_config(target, *, ordered: bool = True, unified: bool = False) -> DrafterConfig:
    """A 2-layer drafter (sliding, global) of width 32 with the target's head dims."""
    text = tiny_config("gemma4", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       layer_types=(SLIDING, GLOBAL), unified=unified, attention_k_eq_v=target.attention_k_eq_v,
                       num_global_key_value_heads=target.num_global_key_value_heads)
    return DrafterConfig(text, target.hidden_size, ordered, num_centroids=16, centroid_intermediate_top_k=4,
                         model_type="gemma4_unified_assistant" if unified else "gemma4_assistant")


def hf_assistant(dcfg: DrafterConfig, seed: int = 1):
    import transformers

    torch.manual_seed(seed)
    hc = transformers.AutoConfig.for_model(**dcfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.normal_(0.0, 0.5)
        if dcfg.use_ordered_embeddings:
            model.masked_embedding.token_ordering.copy_(torch.randperm(dcfg.text.vocab_size))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model


KINDS = {"e": TINY4["gemma4-e"], "dense-keqv": TINY4["gemma4-dense-keqv"], "moe": TINY4["gemma4-moe"],
         "unified": TINY4_UNIFIED}


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request, tmp_path_factory):
    """(hf target, hf assistant, gemmakit target Model, gemmakit Drafter), each loaded from saved folders."""
    cfg = KINDS[request.param]
    ref = hf_model(cfg)
    asst = hf_assistant(assistant_config(cfg, unified=request.param == "unified"))
    root = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(root / "target")
    asst.save_pretrained(root / "assistant")
    model = gemmakit.load(root / "target", dtype="float32", quant=None, progress=False)
    drafter = gemmakit.load(root / "assistant", dtype="float32", quant=None, progress=False)
    return ref, asst, model, drafter


def hf_rounds(ref, asst, prompt, n, k):
    """transformers' assisted greedy generation: (tokens, drafts of each round)."""
    from transformers.generation import candidate_generator as cg

    drafts = []
    original = cg.SinglePositionMultiTokenCandidateGenerator.get_candidates

    def spy(self, input_ids, *a, **kw):
        out, logits = original(self, input_ids, *a, **kw)
        if logits is not None:
            drafts.append(out[0, input_ids.shape[1]:].tolist())
        return out, logits

    asst.generation_config.num_assistant_tokens = k
    cg.SinglePositionMultiTokenCandidateGenerator.get_candidates = spy
    try:
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), assistant_model=asst, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0, eos_token_id=None)
    finally:
        cg.SinglePositionMultiTokenCandidateGenerator.get_candidates = original
    return out[0, len(prompt):].tolist(), drafts


def test_drafter_logits_match_transformers(pair):
    """One drafter step on the target's prefill KV: the same logits and projected hidden state."""
    from gemmakit.draft import first_step_inputs, sliding_window_span, target_kv
    from gemmakit.model import KVCache

    ref, asst, model, drafter = pair
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True, return_shared_kv_states=True, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        emb = ref.get_input_embeddings()(token[:, None])
        expected = asst(inputs_embeds=torch.cat([emb, out.hidden_states[-1][:, -1:]], -1),
                        position_ids=torch.tensor([[len(PROMPT)]]), shared_kv_states=out.shared_kv_states)
        cache = KVCache(model.config, 1, 32, dtype=torch.float32, device="cpu", slack=1)
        h = model.module.hidden_states(ids, None, cache)[:, -1]
        pos = torch.tensor([len(PROMPT)])
        span = sliding_window_span(model.config.sliding_window, 0, len(PROMPT) - 1, len(PROMPT), True)
        kv = target_kv(model.config, cache, [0], pos, torch.tensor([span]))
        logits, hidden = drafter(first_step_inputs(model.module, token, h), pos, kv)
    scale = expected.logits.abs().max()
    assert ((logits - expected.logits[:, 0]).abs().max() / scale).item() <= 1e-4
    assert torch.allclose(hidden, expected.last_hidden_state[:, 0], atol=1e-4, rtol=1e-4)


def test_rounds_match_transformers_assisted_generation(pair, k=3):
    """Tokens and every round's drafts equal transformers' (fixed draft length, as transformers drafts)."""
    ref, asst, model, drafter = pair
    n = 14
    tokens, drafts = hf_rounds(ref, asst, PROMPT, n, k)
    rounds: list[list[Round]] = [[]]
    ours = [int(t) for t in speculative_step(model.module, drafter, [PROMPT], SamplingParams(), n, k,
                                              rounds=rounds, adaptive=False)]
    assert ours == tokens
    assert [r.drafted for r in rounds[0]] == drafts


@pytest.mark.parametrize("batch", [1, 4, 8])
def test_greedy_with_a_drafter_is_plain_greedy(pair, batch):
    _, _, model, drafter = pair
    prompts = [PROMPT[: 3 + 2 * i] + [100 + i] for i in range(batch)]
    plain = torch.stack(list(generate_step(model.module, prompts, SamplingParams(), 14)), 1).tolist()
    spec = torch.stack(list(speculative_step(model.module, drafter, prompts, SamplingParams(), 14, 4)), 1).tolist()
    assert spec == plain


def test_wrong_target_is_refused(pair):
    _, _, _, drafter = pair
    other = gemmakit.Model(__import__("gemmakit.model", fromlist=["Gemma"]).Gemma(tiny_config("gemma3")), None, "", "")
    with pytest.raises(GemmaError, match="Gemma 4 targets"):
        list(speculative_step(other.module, drafter, [PROMPT], SamplingParams(), 3, 2))


def test_speculative_sampling_rule_keeps_the_target_distribution():
    """Drafts x ~ q, kept with min(1, p/q), else resampled from (p - q)+: the emitted token is distributed as p
    (chi-square over 20000 draws; the 0.999 quantile for 5 degrees of freedom is 20.5)."""
    from gemmakit.speculative import _accept_sampled

    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    q = torch.tensor([0.05, 0.1, 0.5, 0.05, 0.2, 0.1])
    n, counts = 20000, torch.zeros(6)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen))
        kept, nxt = _accept_sampled(torch.stack([p, p]), q[None], [x], gen)
        counts[x if kept else nxt] += 1
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 20.5


@pytest.mark.slow  # 300 generations per kind: minutes on a shared 2-core machine
def test_sampling_with_a_drafter_gives_the_target_distribution(pair):
    """End to end, top-k 3 at temperature 1: the second token (the first one a round decides) follows the target's
    processed distribution given the first (chi-square, 2 degrees of freedom, 0.999 quantile 13.8)."""
    _, _, model, drafter = pair
    params = SamplingParams(temperature=1.0, top_k=3, seed=5)
    first = int(next(iter(speculative_step(model.module, drafter, [PROMPT], params, 1, 2))))
    from gemmakit.sampling import process_logits

    p = process_logits(model.logits(PROMPT + [first])[-1:], params).softmax(-1)[0]
    top = p.topk(3).indices.tolist()
    counts, n = {t: 0 for t in top}, 0
    for seed in range(300):
        toks = [int(t) for t in speculative_step(model.module, drafter, [PROMPT], params.__class__(
            temperature=1.0, top_k=3, seed=seed), 2, 2)]
        if toks[0] == first:
            counts[toks[1]] += 1
            n += 1
    assert n > 50
    chi2 = sum((counts[t] - n * p[t].item()) ** 2 / (n * p[t].item()) for t in top)
    assert chi2 < 13.8


def test_api_generate_stream_chat_with_a_drafter(pair):
    _, _, model, drafter = pair
    if not model.config.hidden_size_per_layer_input:
        pytest.skip("the API wiring is the same for every kind: tested on the E-style one")
    from finetune_helpers import tiny_tokenizer

    model.tokenizer = tiny_tokenizer(512)
    plain = model.generate(PROMPT, 12, ignore_eos=True)
    spec = model.generate(PROMPT, 12, ignore_eos=True, draft=drafter, draft_tokens=3)
    assert spec.token_ids == plain.token_ids and plain.speculation is None
    assert spec.speculation and all(len(r.drafted) <= 3 and 0 <= r.accepted <= len(r.drafted)
                                    for r in spec.speculation)
    assert "".join(model.stream(PROMPT, 12, ignore_eos=True, draft=drafter)) == plain.text
    with pytest.raises(GemmaError, match="pass one of them"):
        model.generate(PROMPT, 4, draft=drafter, lookup=3)


def test_server_engine_drafts_for_greedy_and_sampling_rows(pair):
    """Continuous batching with a drafter: 4 jobs on 3 rows (one joins when a row frees), greedy rows drafted and
    verified together, a sampling row riding along undrafted: each greedy job gets plain greedy's tokens, and the
    seeded sampling job the tokens it gets without a drafter."""
    import threading

    from gemmakit.serve.engine import Engine, Job, wait_idle

    _, _, model, drafter = pair
    if model.config.enable_moe_block or model.config.unified:
        pytest.skip("the engine's drafting is the same for every kind: tested on two")
    from finetune_helpers import tiny_tokenizer

    model.tokenizer = tiny_tokenizer(512)
    prompts = [PROMPT, PROMPT[:4], [2, 40, 41, 42, 43, 44], PROMPT[:7] + [5]]
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams()]

    def run(draft):
        engine = Engine(model, max_batch=3, context=64, draft=draft, draft_tokens=3)
        got: list[list[int]] = [[] for _ in prompts]
        done = threading.Event()

        def sink(i):
            def put(ev):
                got[i] += ev.ids
                if ev.finish_reason is not None and all(len(g) == 12 for g in got):
                    done.set()
            return put

        engine.start()
        try:
            engine.submit([Job(p, 12, sink(i), params=s, ignore_eos=True)
                           for i, (p, s) in enumerate(zip(prompts, params, strict=True))])
            assert done.wait(120) and wait_idle(engine)
        finally:
            engine.stop()
        return got, engine

    plain, _ = run(None)
    drafted, engine = run(drafter)
    greedy = [0, 1, 3]
    assert [drafted[i] for i in greedy] == [plain[i] for i in greedy]
    assert engine.peak_batch == 3 and engine.draft_stats[0] > 0
    # The sampling row drafts too (speculative sampling with its own seeded generator): the same tokens again.
    again, _ = run(drafter)
    assert len(drafted[2]) == 12 and again == drafted
    expected = [int(t) for t in generate_step(model.module, [PROMPT], SamplingParams(), 12)]
    assert drafted[0] == expected


def test_draft_length_backs_off_a_drafter_that_never_agrees():
    """Never agreeing: 6 draft tokens in the first 64 steps (4, then probes after 16 and 32); agreeing: the most."""
    from gemmakit.speculative import DraftLength

    for agree, most_drafted in ((False, 6), (True, 4 * 64)):
        length, drafted = DraftLength(4), 0
        for _ in range(64):
            k = length.next()
            drafted += k
            length.update(k, k if agree else 0)
        assert drafted == most_drafted


class _BanRecent(__import__("gemmakit.sampling", fromlist=["LogitsProcessor"]).LogitsProcessor):
    """A stateful mask: forbids the last two accepted tokens; logs every call, to check the contract."""

    def __init__(self) -> None:
        self.recent: list[int] = []
        self.log: list[tuple[str, int]] = []

    def begin(self, prompt) -> None:
        self.log.append(("begin", len(prompt)))

    def process(self, logits):
        self.log.append(("process", len(self.recent)))
        out = logits.clone()
        out[self.recent[-2:]] = float("-inf")
        return out

    def accept(self, token: int) -> None:
        self.log.append(("accept", token))
        self.recent.append(token)


def oracle(plain: list[list[int]], prompts: list[list[int]], wrong: int = 2):
    """A stand-in for draft.propose that drafts the plain run's own continuation, with its `wrong`-th draft token
    changed every other round: most drafts are kept, some rejected midway, so the verification walk runs over kept
    drafts (any drafts would do for exactness; a random tiny drafter almost never agrees)."""
    calls = [0]

    def propose(drafter, target, token, hidden, position, kv, k, pick):
        calls[0] += 1
        out = torch.zeros(len(token), k, dtype=torch.long)
        for i, (t, pos) in enumerate(zip(token.tolist(), position.tolist(), strict=True)):
            for b, prompt in enumerate(prompts):
                at = pos - len(prompt)
                if 0 <= at < len(plain[b]) and plain[b][at] == t:
                    nxt = plain[b][at + 1 : at + 1 + k]
                    out[i, : len(nxt)] = torch.tensor(nxt, dtype=torch.long)
                    break
            if calls[0] % 2 and wrong < k:
                out[i, wrong] = (out[i, wrong] + 1) % 500
        return out, []
    return propose


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_with_a_drafter_keeps_processors_and_penalties_exact(pair, batch, monkeypatch):
    """Rows with processors and a repetition penalty draft too: greedy tokens equal plain greedy's, and each
    processor sees exactly the calls plain steps make (begin, then process and accept once per token)."""
    _, _, model, drafter = pair
    if model.config.enable_moe_block:
        pytest.skip("the verification walk is the same for every kind")
    prompts = [PROMPT[: 3 + 2 * i] + [100 + i] for i in range(batch)]
    params = SamplingParams(repetition_penalty=1.3)
    procs = [[_BanRecent()] for _ in prompts], [[_BanRecent()] for _ in prompts]
    plain = torch.stack(list(generate_step(model.module, prompts, params, 14, processors=procs[0])), 1).tolist()
    monkeypatch.setattr("gemmakit.speculative.propose", oracle(plain, prompts))
    rounds = [[] for _ in prompts]
    spec = torch.stack(list(speculative_step(model.module, drafter, prompts, params, 14, 4, rounds=rounds,
                                             processors=procs[1])), 1).tolist()
    assert spec == plain
    assert [p[0].log for p in procs[1]] == [p[0].log for p in procs[0]]
    kept = sum(r.accepted for row in rounds for r in row)
    assert kept >= 4 * batch and kept < sum(len(r.drafted) for row in rounds for r in row)


def test_sampling_rule_under_a_mask_and_penalties_keeps_the_processed_distribution():
    """verify_row on a row with a bias, a presence penalty and a mask processor: a draft drawn from the drafter's
    distribution without the mask is kept or replaced so that the emitted token follows the target's fully
    processed distribution (chi-square over 20000 draws, 5 degrees of freedom, 0.999 quantile 20.5)."""
    from gemmakit.sampling import RowRules
    from gemmakit.speculative import DraftPicker, verify_row

    class BanZero(_BanRecent):
        def process(self, logits):
            out = logits.clone()
            out[0] = float("-inf")
            return out

    gen = torch.Generator().manual_seed(0)
    target = torch.tensor([[1.0, 0.5, 0.2, -0.3, 0.9, 0.0, -1.0]] * 2)
    drafter = torch.tensor([[2.0, -0.5, 0.8, 0.1, 0.0, 0.3, -0.2]])
    counts = torch.zeros(1, 7)
    counts[0, 4] = 2
    params = SamplingParams(temperature=1.0)
    rules = RowRules(params, [BanZero()], None, counts, 0.0, 0.7, (torch.tensor([2]), torch.tensor([0.5])), gen)
    p = rules.distribution(target[:1], None, counts, processors=True).softmax(-1)[0]
    n, got = 20000, torch.zeros(7)
    for _ in range(n):
        picker = DraftPicker([rules])
        x = int(picker(drafter)[0])
        kept, nxt = verify_row(target, [x], rules, picker.q[0])
        got[x if kept else nxt] += 1
    assert got[0] == 0
    live = p > 0
    chi2 = ((got[live] - n * p[live]) ** 2 / (n * p[live])).sum().item()
    assert chi2 < 20.5


def test_server_engine_drafts_for_rows_with_penalties_bias_and_processors(pair, monkeypatch):
    """The server's rows with a logit bias, frequency/presence/repetition penalties or a processor draft and are
    verified position by position: each gets the tokens it gets without a drafter, and its processor the same
    calls."""
    import threading

    from gemmakit.serve.engine import Engine, Job, wait_idle

    _, _, model, drafter = pair
    if model.config.enable_moe_block or model.config.unified:
        pytest.skip("the engine's drafting is the same for every kind: tested on two")
    from finetune_helpers import tiny_tokenizer

    model.tokenizer = tiny_tokenizer(512)
    prompts = [PROMPT, PROMPT[:4], [2, 40, 41, 42, 43, 44], PROMPT[:7] + [5]]
    extra = [dict(logit_bias={7: 2.5, 11: -100.0}), dict(frequency_penalty=0.8, presence_penalty=0.4),
             dict(params=SamplingParams(repetition_penalty=1.5)), {}]

    def run(draft):
        engine = Engine(model, max_batch=4, context=64, draft=draft, draft_tokens=4)
        got: list[list[int]] = [[] for _ in prompts]
        procs = [_BanRecent() for _ in prompts]
        done = threading.Event()

        def sink(i):
            def put(ev):
                got[i] += ev.ids
                if ev.finish_reason is not None and all(len(g) == 12 for g in got):
                    done.set()
            return put

        engine.start()
        try:
            engine.submit([Job(p, 12, sink(i), ignore_eos=True, processors=[procs[i]] if i >= 2 else [], **x)
                           for i, (p, x) in enumerate(zip(prompts, extra, strict=True))])
            assert done.wait(120) and wait_idle(engine)
        finally:
            engine.stop()
        return got, engine, [p.log for p in procs]

    plain, _, plain_logs = run(None)
    monkeypatch.setattr("gemmakit.serve.drafting.propose", oracle(plain, prompts))
    drafted, engine, logs = run(drafter)
    assert drafted == plain and logs == plain_logs
    assert 0 < engine.draft_stats[1] < engine.draft_stats[0]
