"""Gemma 3n against transformers' Gemma3nForCausalLM on random tiny configs at the real 262144-row tables, through
the production load path; AltUp, LAuReL and the Gaussian top-k also one by one against transformers' own modules.

Errors are relative to the largest |logit| (as for Gemma 4, test_gemma4.py).
"""

from __future__ import annotations

import json

import pytest
import torch

import gemmakit
from gemmakit.altup import AltUp, Laurel, gaussian_topk, std_multiplier
from gemmakit.config import GLOBAL, PRESETS, SLIDING, GemmaConfig, from_hf
from gemmakit.errors import GemmaError
from gemmakit.generate import generate_step, lookup_step
from gemmakit.loader import GemmaNote
from gemmakit.model import KVCache
from gemmakit.sampling import SamplingParams
from helpers import BATCH_PROMPTS, batched_and_single, cached_logits, greedy_tokens

TOL = 1e-4  # against transformers, relative to max |logit|
EXACT = 1e-5  # the same model two ways (cache vs full forward, batch vs single): summation order only


def tiny3n(**overrides) -> GemmaConfig:
    """7 layers S S S S G | S G, W = 8; the last 2 layers reuse the keys/values of layers 3 (S) and 4 (G)."""
    base = dict(family="gemma3n", vocab_size=262400, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                sliding_window=8, layer_types=(SLIDING,) * 4 + (GLOBAL, SLIDING, GLOBAL), rope_theta=1e6,
                final_logit_softcapping=30.0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=262144,
                num_kv_shared_layers=2, altup_num_inputs=4, altup_coef_clip=120.0, altup_correct_scale=True,
                laurel_rank=8, activation_sparsity_pattern=(0.95, 0.95, 0.95, 0, 0, 0, 0),
                intermediate_sizes=(128, 96, 128, 64, 128, 128, 96), name="gemma3n")
    return GemmaConfig(**{**base, **overrides})


TINY3N = {
    # everything at once: sparse first layers, per-layer widths, KV sharing, PLE table shorter than the vocabulary
    "full": tiny3n(),
    # the 262144 vocabulary, dense MLPs of one width, no sharing, 3 streams, stream 1 active, no output scale
    "plain": tiny3n(vocab_size=262144, num_kv_shared_layers=0, activation_sparsity_pattern=(), intermediate_sizes=(),
                    altup_num_inputs=3, altup_active_idx=1, altup_correct_scale=False),
}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def hf_gemma3n(cfg: GemmaConfig, seed: int = 0):
    """A transformers Gemma 3n of this config with random weights everywhere (built without transformers' slow
    initialisation of the 262144-row tables): linears N(0, 1/fan_in), norms and the AltUp output scale
    1 + N(0, 0.3) (Gemma 3n norms scale by w itself), embeddings N(0, 0.5), AltUp coefficients N(0, 0.3)."""
    import transformers
    from transformers.initialization import no_init_weights

    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or name.endswith("correct_output_scale"):
                p.copy_(1.0 + 0.3 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            elif "coefs" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module", params=list(TINY3N))
def pair(request, tmp_path_factory):
    """(transformers model, gemmakit Model loaded from the HF folder that transformers saved, config)."""
    cfg = TINY3N[request.param]
    ref = hf_gemma3n(cfg)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, gemmakit.load(folder, dtype="float32", quant=None, progress=False), cfg


@pytest.fixture(scope="module")
def full_pair(pair):
    """The full config's pair; the generation checks run on it only (each step pays a 262400-column head)."""
    if pair[2] is not TINY3N["full"]:
        pytest.skip("generation checks run on the full config")
    return pair


def test_config_round_trips(pair):
    _, model, cfg = pair
    assert model.config.replace(name="") == cfg.replace(name="")


def test_logits_match_transformers(pair):
    """Ids beyond the per-layer table (262144..262399) read its row 0, as in transformers."""
    ref, model, cfg = pair
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ids[0, :4] = torch.tensor([262143, cfg.vocab_size - 1, 262144 % cfg.vocab_size, 0])
    with torch.no_grad():
        expected = ref(ids).logits
    got = model.logits(ids)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert rel_err(got, expected) <= TOL
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_cache_decoding_equals_full_forward(pair):
    """Prefill 5 tokens then one at a time, and a chunked prefill (chunks longer than the window W=8): sliding
    rings wrap, shared layers read their source's keys of the same step, AltUp streams never touch the cache."""
    _, model, cfg = pair
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model.logits(ids)
    steps, chunks = cached_logits(model.module, cfg, ids)
    assert rel_err(steps, full) <= EXACT
    assert rel_err(chunks, full) <= EXACT


def test_greedy_continuation_identical(full_pair):
    ref, model, _ = full_pair
    expected, got = greedy_tokens(ref, model.module)
    assert got == expected


def test_batched_equals_single(full_pair):
    _, model, _ = full_pair
    batched, single = batched_and_single(model.module)
    assert batched == single
    a, b = BATCH_PROMPTS[0], BATCH_PROMPTS[1]
    assert rel_err(model.logits([a, b])[1, :2], model.logits(b)) <= EXACT


def test_prompt_lookup_gives_plain_greedy_tokens(full_pair):
    _, model, _ = full_pair
    prompt = [2, 5, 9, 100, 7, 8, 9, 10, 11, 5, 9, 100, 7, 8, 9, 10, 11, 5, 9, 100]
    plain = [int(t) for t in generate_step(model.module, [prompt], SamplingParams(), 20)]
    drafted = [int(t) for t in lookup_step(model.module, prompt, 20, 6)]
    assert drafted == plain


def test_rows_join_at_different_times(full_pair):
    """Continuous batching: a sequence prefilled into a free cache row while another decodes gets its own logits."""
    _, model, cfg = full_pair
    m = model.module
    a, b = [2, 5, 9, 100, 7, 8, 9, 10, 11, 50, 60, 70], [2, 300, 301]
    cache = KVCache(cfg, 2, 40, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        m(torch.tensor([a]), cache=cache, rows=[0])
        got_b = m(torch.tensor([b]), cache=cache, rows=[1])[0]
        step = m(torch.tensor([[4], [5]]), torch.tensor([[len(a)], [len(b)]]), cache)
    assert rel_err(got_b, model.logits(b)) <= EXACT
    assert rel_err(step[0, 0], model.logits(a + [4])[-1]) <= EXACT
    assert rel_err(step[1, 0], model.logits(b + [5])[-1]) <= EXACT


# ---- components one by one, against transformers' modules ------------------------------------------------------


def _hf_text_config(cfg: GemmaConfig):
    from transformers import Gemma3nTextConfig

    return Gemma3nTextConfig(**{k: v for k, v in cfg.to_hf().items()
                                if k not in ("architectures", "model_type", "torch_dtype")})


@pytest.mark.parametrize("training", [False, True])
def test_altup_predict_and_correct_match_transformers(training):
    """Prediction and correction bit for bit; in training mode with the coefficient clip (weights beyond +-0.5
    here), as transformers clamps them."""
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAltUp

    cfg = tiny3n(altup_coef_clip=0.5)
    ref = Gemma3nTextAltUp(_hf_text_config(cfg))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours = AltUp(cfg)
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    streams = torch.randn(4, 2, 5, cfg.hidden_size, generator=gen)
    activated = torch.randn(2, 5, cfg.hidden_size, generator=gen)
    with torch.no_grad():
        pred_ref, pred = ref.predict(streams), ours.predict(streams)
        assert torch.equal(pred, pred_ref)
        assert torch.equal(ours.correct(pred, activated), ref.correct(pred_ref, activated))
        assert torch.equal(ours.scale_corrected(activated), ref.scale_corrected_output(activated))
    assert torch.equal(ours.prediction_coefs.weight, ref.prediction_coefs.weight)
    assert (ours.prediction_coefs.weight.abs().max() <= 0.5) == training


def test_laurel_and_gaussian_topk_match_transformers():
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextLaurelBlock, Gemma3nTextMLP

    cfg = tiny3n()
    hc = _hf_text_config(cfg)
    ref = Gemma3nTextLaurelBlock(hc)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ours = Laurel(cfg)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, cfg.hidden_size, generator=gen)
    gate = torch.randn(2, 5, 128, generator=gen) * 3
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        sparse = gaussian_topk(gate, std_multiplier(0.95))
        assert torch.equal(sparse, Gemma3nTextMLP(hc, layer_idx=0)._gaussian_topk(gate))
    kept = (sparse > 0).float().mean().item()
    assert 0.01 < kept < 0.12  # about the top 5% of a Gaussian row survives


def test_kv_cache_stores_shared_layers_once():
    cfg = TINY3N["full"]  # S S S S G | S G, the last two shared
    cache = KVCache(cfg, 2, 64, dtype=torch.float32, device="cpu")
    assert len(cache.stored) == 5
    assert cache.layers[5] is cache.layers[3] and cache.layers[6] is cache.layers[4]


# ---- presets and config -----------------------------------------------------------------------------------------


def _meta_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["gemma-3n-e2b", "gemma-3n-e4b"])
def test_presets_count_like_transformers(name):
    """Parameter counts equal transformers' at the real shapes (on the meta device); the per-layer table apart."""
    import transformers

    from gemmakit.model import Gemma

    cfg = PRESETS[name]
    hc = transformers.AutoConfig.for_model(**cfg.to_hf())
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hc)
        ours = Gemma(cfg)
    total = _meta_params(ref)
    assert _meta_params(ours) == total == cfg.num_params()
    table = cfg.vocab_size_per_layer_input * cfg.num_hidden_layers * cfg.hidden_size_per_layer_input
    assert ref.model.embed_tokens_per_layer.weight.numel() == table
    assert from_hf(cfg.to_hf()).replace(name=cfg.name) == cfg


def test_config_reads_hub_spellings():
    """A v4-style Hub text_config (rope_theta / rope_local_base_freq, one intermediate_size, no sparsity list)."""
    hub = {"model_type": "gemma3n", "text_config": {
        "model_type": "gemma3n_text", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 30,
        "num_kv_shared_layers": 10, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "vocab_size": 262400}}
    assert from_hf(hub).replace(name="gemma-3n-e2b") == PRESETS["gemma-3n-e2b"]


def test_config_errors_name_the_problem():
    with pytest.raises(GemmaError, match="activation_sparsity_pattern has 3 entries"):
        tiny3n(activation_sparsity_pattern=(0.95,) * 3)
    with pytest.raises(GemmaError, match="altup_active_idx"):
        tiny3n(altup_active_idx=4)
    with pytest.raises(GemmaError, match="Gemma 3n setting"):
        GemmaConfig(family="gemma3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, laurel_rank=4)


def test_multimodal_checkpoint_loads_its_text_decoder(tmp_path):
    """A Gemma3nForConditionalGeneration folder (config with text/vision/audio configs, tensors under
    model.language_model.* beside the towers'): the text decoder loads with a one-line note, the towers are skipped."""
    from safetensors.torch import save_file

    cfg = TINY3N["plain"]
    ref = hf_gemma3n(cfg, seed=3)
    state = {k.replace("model.", "model.language_model.", 1): v.contiguous() for k, v in ref.state_dict().items()
             if k != "lm_head.weight"}
    state.update({"model.vision_tower.timm_model.conv_stem.conv.weight": torch.zeros(8, 3, 3, 3),
                  "model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1.weight": torch.zeros(8, 8),
                  "model.embed_vision.embedding.weight": torch.zeros(4, 8),
                  "model.embed_audio.embedding_projection.weight": torch.zeros(64, 8)})
    save_file(state, tmp_path / "model.safetensors")
    text = {k: v for k, v in cfg.to_hf().items() if k != "architectures"}
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n", "text_config": text,
        "vision_config": {"model_type": "gemma3n_vision"}, "audio_config": {"model_type": "gemma3n_audio"}}))
    with pytest.warns(GemmaNote, match="vision and audio tower"):
        model = gemmakit.load(tmp_path, dtype="float32", quant=None, progress=False)
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel_err(model.logits(ids), ref(ids).logits) <= TOL
