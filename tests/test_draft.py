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


@pytest.mark.parametrize("k", [2, 4])
def test_rounds_match_transformers_assisted_generation(pair, k):
    """Tokens and every round's drafts equal transformers' (fixed draft length, as transformers drafts)."""
    ref, asst, model, drafter = pair
    n = 16
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
