"""Tiny keras-hub presets and gemma-library (Flax/Orbax) checkpoints, built and run by those libraries themselves.

`python tests/framework_fixtures.py` (with `pip install -e .[frameworks]`, Python 3.11: keras-hub on the torch
backend, gemma==3.3.0 with CPU jax) rewrites tests/data/frameworks/: each case folder holds what the library saved
(bf16 weights) and reference.npz = the library's own fp32 forward: `ids`, `logits` [T, V] and `greedy` (N tokens
appended by argmax). The default suite compares gemmakit against these files without keras or jax installed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

from gemmakit.config import GLOBAL, SLIDING, GemmaConfig

DATA = Path(__file__).parent / "data" / "frameworks"
PROMPT = [2, 310, 57, 402, 288, 91, 377, 301, 145, 260, 333, 480]  # BOS + 11 tokens: past the 4-token window
GREEDY = 8
_SHAPE = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)

# The GemmaConfig each case means; Keras cases must load to exactly this, Flax cases pass it as variant=.
CASES: dict[str, GemmaConfig] = {
    "keras-gemma1": GemmaConfig(family="gemma", num_hidden_layers=2, **{**_SHAPE, "num_key_value_heads": 1}),
    # Gemma 2 with post-norms, soft-caps and a sliding window. keras-hub 0.32's GemmaDecoderBlock builds its
    # attention with query_head_dim_normalize=True whatever the backbone says, so its own forward cannot be the
    # reference for the 27B-style scale: the Flax case below checks that one against the gemma library.
    "keras-gemma2": GemmaConfig(
        family="gemma2",
        num_hidden_layers=4,
        sliding_window=4,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=16.0,
        **_SHAPE,
    ),
    # Gemma 2 with the 27B-style query scale: (hidden / heads) ** -0.5 = 8 ** -0.5, not head_dim ** -0.5
    # Gemma 3: QK-norm, 5 sliding + 1 global + 1 sliding, global RoPE 1e6 with linear scaling 8
    "keras-gemma3": GemmaConfig(
        family="gemma3",
        num_hidden_layers=7,
        sliding_window=4,
        rope_theta=1e6,
        rope_scaling_factor=8.0,
        query_pre_attn_scalar=16.0,
        **_SHAPE,
    ),
    # Gemma 4 with every layer kind Gemma4Backbone has: sliding + global layers (global head dim 32, one KV head,
    # k=v, partial RoPE 0.25 with linear factor 8), per-layer embeddings, the last 2 layers sharing KV (one of each
    # kind, from layers 2 and 1) with a double-wide MLP, experts beside every dense MLP, and a final soft-cap.
    "keras-gemma4": GemmaConfig(
        family="gemma4",
        num_hidden_layers=5,
        sliding_window=4,
        layer_types=(SLIDING, GLOBAL, SLIDING, SLIDING, GLOBAL),
        rope_theta=1e6,
        rope_scaling_factor=8.0,
        final_logit_softcapping=30.0,
        global_head_dim=32,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        partial_rotary_factor=0.25,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=512,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=8,
        **{**_SHAPE, "intermediate_size": 32},  # narrow: the committed h5 stays small
    ),
    "flax-gemma2": GemmaConfig(
        family="gemma2",
        num_hidden_layers=4,
        sliding_window=4,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=8.0,
        **_SHAPE,
    ),
    "flax-gemma3": GemmaConfig(
        family="gemma3",
        num_hidden_layers=7,
        sliding_window=4,
        rope_theta=1e6,
        rope_scaling_factor=8.0,
        query_pre_attn_scalar=16.0,
        **_SHAPE,
    ),
}
assert CASES["keras-gemma3"].layer_types == (SLIDING,) * 5 + (GLOBAL, SLIDING)


def tokenizer_proto(vocab: int = 512) -> bytes:
    """The tests' tiny SentencePiece vocabulary with Gemma 3's image tokens in three normal slots (keras-hub's
    Gemma3Tokenizer insists on them)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    sys.path.insert(0, str(Path(__file__).parent))
    from finetune_helpers import tiny_tokenizer

    proto = tiny_tokenizer(vocab).model_proto()
    for i, name in zip((264, 265, 266), ("<start_of_image>", "<end_of_image>", "<img>"), strict=True):
        proto.pieces[i].piece = name
        proto.pieces[i].type = pb.ModelProto.SentencePiece.CONTROL
    return proto.SerializeToString()


def keras_gemma4_backbone(cfg: GemmaConfig, dtype: str):
    """A Gemma4Backbone with cfg's shape, built from the arguments keras-hub documents (not from our writer)."""
    import keras_hub

    return keras_hub.models.Gemma4Backbone(
        vocabulary_size=cfg.vocab_size,
        image_size=None,
        num_layers=cfg.num_hidden_layers,
        num_query_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_dim=cfg.hidden_size,
        intermediate_dim=cfg.intermediate_size,
        head_dim=cfg.head_dim,
        attention_logit_soft_cap=cfg.attn_logit_softcapping,
        final_logit_soft_cap=cfg.final_logit_softcapping,
        sliding_window_size=cfg.sliding_window,
        layer_types=list(cfg.layer_types),
        global_head_dim=cfg.global_head_dim,
        global_rope_scaling_factor=cfg.rope_scaling_factor,
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        num_global_key_value_heads=cfg.num_global_key_value_heads,
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        global_rope_partial_rotary_factor=cfg.partial_rotary_factor,
        use_double_wide_mlp=cfg.use_double_wide_mlp,
        enable_moe_block=cfg.enable_moe_block,
        num_experts=cfg.num_experts or None,
        expert_intermediate_dim=cfg.moe_intermediate_size or None,
        num_experts_per_token=cfg.top_k_experts or 8,
        dtype=dtype,
    )


def randomize_gemma4(backbone, seed: int = 1) -> None:
    """Gemma 4 norms multiply by w (init 1) and the experts start at zero: give every such weight values, so a
    swapped norm, a lost +1 or a dropped expert cannot pass unnoticed."""
    rng = np.random.default_rng(seed)
    for w in backbone.weights:
        if w.path.endswith(("scale", "layer_scalar")):
            w.assign((1.0 + 0.3 * rng.standard_normal(w.shape)).astype("float32"))
        elif "moe_expert_bank" in w.path:
            w.assign((0.2 * rng.standard_normal(w.shape)).astype("float32"))


def keras_backbone(cfg: GemmaConfig, dtype: str):
    import keras_hub

    if cfg.family == "gemma4":
        return keras_gemma4_backbone(cfg, dtype)

    common = dict(
        vocabulary_size=cfg.vocab_size,
        num_layers=cfg.num_hidden_layers,
        num_query_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_dim=cfg.hidden_size,
        head_dim=cfg.head_dim,
        dtype=dtype,
        query_head_dim_normalize=cfg.query_pre_attn_scalar == cfg.head_dim,
    )
    if cfg.family == "gemma3":
        return keras_hub.models.Gemma3Backbone(
            image_size=896,
            intermediate_dim=cfg.intermediate_size,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            use_sliding_window_attention=True,
            sliding_window_size=cfg.sliding_window,
            global_rope_scaling_factor=cfg.rope_scaling_factor,
            **common,
        )
    g2 = cfg.family == "gemma2"
    return keras_hub.models.GemmaBackbone(
        intermediate_dim=2 * cfg.intermediate_size,
        use_post_ffw_norm=g2,
        use_post_attention_norm=g2,
        attention_logit_soft_cap=cfg.attn_logit_softcapping,
        final_logit_soft_cap=cfg.final_logit_softcapping,
        use_sliding_window_attention=g2,
        sliding_window_size=cfg.sliding_window or 4096,
        **common,
    )


def keras_logits(backbone, ids: list[int]) -> np.ndarray:
    """[T, V] fp32 logits of keras-hub's own forward (ReversibleEmbedding applies the final soft-cap)."""
    import keras

    x = np.array([ids], dtype="int32")
    inputs = {"token_ids": x, "padding_mask": np.ones_like(x)}
    if "position_ids" in backbone.input:  # Gemma4Backbone takes the positions too
        inputs["position_ids"] = np.arange(len(ids), dtype="int32")[None]
    h = backbone(inputs)
    return keras.ops.convert_to_numpy(backbone.token_embedding(h, reverse=True))[0].astype(np.float32)


def save_keras(name: str, cfg: GemmaConfig, out: Path) -> None:
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_backbone(cfg, "bfloat16")
    rng = np.random.default_rng(1)
    for w in backbone.weights:  # norm scales start at zero: give them values so a swapped norm shows
        if w.path.endswith("scale") and cfg.family != "gemma4":
            w.assign((0.3 * rng.standard_normal(w.shape)).astype("float32"))
    if cfg.family == "gemma4":
        randomize_gemma4(backbone)
    proto = tokenizer_proto(cfg.vocab_size)
    if cfg.family == "gemma4":  # the tiny vocabulary has no image/audio/video tokens
        tok = keras_hub.models.Gemma4Tokenizer(proto=proto, has_vision_tokens=False, has_video_tokens=False)
        lm = keras_hub.models.Gemma4CausalLM(
            backbone=backbone, preprocessor=keras_hub.models.Gemma4CausalLMPreprocessor(tok)
        )
    elif cfg.family == "gemma3":
        tok = keras_hub.models.Gemma3Tokenizer(proto=proto)
        lm = keras_hub.models.Gemma3CausalLM(
            backbone=backbone, preprocessor=keras_hub.models.Gemma3CausalLMPreprocessor(tok)
        )
    else:
        tok = keras_hub.models.GemmaTokenizer(proto=proto)
        lm = keras_hub.models.GemmaCausalLM(
            backbone=backbone, preprocessor=keras_hub.models.GemmaCausalLMPreprocessor(tok)
        )
    lm.save_to_preset(str(out))
    ref = keras_hub.models.Backbone.from_preset(str(out), dtype="float32")
    save_reference(out, lambda ids: keras_logits(ref, ids))


def flax_config(cfg: GemmaConfig):
    from gemma.gm.nn import _config, _modules

    from gemmakit.weights.orbax import transposed_gating

    kinds = {SLIDING: _modules.AttentionType.LOCAL_SLIDING, GLOBAL: _modules.AttentionType.GLOBAL}
    q = _config.QueryPreAttentionNormalisation
    g3 = cfg.family == "gemma3"
    return _config.TransformerConfig(
        num_embed=cfg.vocab_size,
        embed_dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        num_kv_heads=cfg.num_key_value_heads,
        final_logit_softcap=cfg.final_logit_softcapping,
        use_post_attn_norm=cfg.post_norms,
        use_post_ffw_norm=cfg.post_norms,
        attention_types=tuple(kinds[t] for t in cfg.layer_types),
        query_pre_attn_norm=(
            q.BY_ONE_OVER_SQRT_HEAD_DIM
            if cfg.query_pre_attn_scalar == cfg.head_dim
            else q.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
        ),
        attn_logits_soft_cap=cfg.attn_logit_softcapping,
        sliding_window_size=cfg.sliding_window,
        transpose_gating_einsum=transposed_gating(cfg),
        use_qk_norm=g3,
        local_base_frequency=int(cfg.rope_local_base_freq),
        global_base_frequency=int(cfg.rope_theta),
        global_scale_factor=cfg.rope_scaling_factor,
    )


def flax_logits_fn(cfg: GemmaConfig, params):
    """The gemma library's own forward in fp32 (params cast up from the checkpoint's bf16)."""
    import jax
    import jax.numpy as jnp
    from gemma import gm

    model = gm.nn.Transformer(config=flax_config(cfg), dtype=jnp.float32)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

    def run(ids: list[int]) -> np.ndarray:
        out = model.apply({"params": params}, jnp.array([ids], dtype=jnp.int32))
        return np.asarray(out.logits[0], dtype=np.float32)

    return run


def save_flax(name: str, cfg: GemmaConfig, out: Path) -> None:
    import jax
    import jax.numpy as jnp
    from gemma import gm
    from gemma.gm.ckpts import _checkpoint

    model = gm.nn.Transformer(config=flax_config(cfg))
    params = model.init(jax.random.PRNGKey(0), jnp.array([PROMPT], dtype=jnp.int32))["params"]
    # Flax initialises the norm scales to zero: give them values so a swapped norm cannot pass unnoticed.
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 4096))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if "scale" in str(p[-1]) else x, params
    )
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out.mkdir(parents=True)
    gm.ckpts.save_params(_checkpoint._nested_to_flat(params), out / "ckpt", wait_until_finished=True)
    (out / "tokenizer.model").write_bytes(tokenizer_proto(cfg.vocab_size))
    save_reference(out, flax_logits_fn(cfg, gm.ckpts.load_params(out / "ckpt")))


def save_reference(out: Path, logits_fn) -> None:
    ids = list(PROMPT)
    logits = logits_fn(ids)
    greedy = []
    for _ in range(GREEDY):
        greedy.append(int(logits_fn(ids + greedy)[-1].argmax()))
    np.savez_compressed(out / "reference.npz", ids=np.array(ids), logits=logits, greedy=np.array(greedy))


def main(names: list[str]) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    for name, cfg in CASES.items():
        if names and name not in names:
            continue
        out = DATA / name
        shutil.rmtree(out, ignore_errors=True)
        (save_keras if name.startswith("keras") else save_flax)(name, cfg, out)
        print(name, sum(f.stat().st_size for f in out.rglob("*") if f.is_file()), "bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
