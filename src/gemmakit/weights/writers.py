"""Writers: a Hugging Face folder (config.json + model.safetensors + tokenizer.model) and a GGUF file.

Both take HF-named tensors (a Gemma module's state dict) and write atomically: to a temp file beside the target,
then os.replace, so an interrupted write never leaves a half file under the real name. The GGUF writer applies
llama.cpp's converter conventions in reverse of our reader (spec §4.3-4.5, §5.4): names via `hf_to_gguf`, +1 on
norm weights stored as F32, no embedding scaling, tokenizer as SentencePiece ("llama") fields.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as pb

from ..config import SLIDING, GemmaConfig
from ..errors import GemmaError
from ..tokenizer import Tokenizer
from .names import ROPE_FREQS, hf_to_gguf, stack_streams

GGUF_TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
}
_FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call write(tmp_path) on a temp file beside `path`, fsync it, then os.replace: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def float_state(state: dict[str, torch.Tensor], cfg: GemmaConfig) -> dict[str, torch.Tensor]:
    """The plain HF-named float tensors: no tied head, no LoRA or quantized layers left over."""
    odd = [k for k in state if ".lora_" in k or ".base_layer." in k or not _known(k, cfg.family)]
    if odd:
        raise GemmaError(
            f"cannot write {odd[0]}: merge LoRA adapters and dequantize the model before writing"
        )
    out = {k: v.detach() for k, v in state.items()}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _known(name: str, family: str) -> bool:
    """A tensor of the plain model (one GGUF can name), not a quantized layer's blocks or scales."""
    name = re.sub(r"^(model\.altup_(?:unembed_)?projections)\.\d+\.weight$", r"\1.weight", name)  # Gemma 3n streams
    try:
        hf_to_gguf(name, family)
    except KeyError:
        return False
    return True


def write_hf(
    folder: str | Path,
    state: dict[str, torch.Tensor],
    cfg: GemmaConfig,
    tokenizer: Tokenizer | None,
    *,
    dtype: str = "float32",
) -> Path:
    """A transformers-loadable folder: config.json, model.safetensors and (when known) tokenizer.model."""
    if dtype not in _HF_DTYPES:
        raise GemmaError(f"unknown dtype {dtype!r} for a Hugging Face folder; use {' or '.join(_HF_DTYPES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(_HF_DTYPES[dtype]).cpu().contiguous() for k, v in float_state(state, cfg).items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    hf_cfg = {**cfg.to_hf(), "torch_dtype": dtype}
    if cfg.name:
        hf_cfg["_name_or_path"] = cfg.name
    text = json.dumps(hf_cfg, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.model")
    return folder


def check_gguf_representable(cfg: GemmaConfig) -> None:
    """GGUF does not store the query scale or the local RoPE base; refuse configs readers would get wrong."""
    big = (cfg.family, cfg.num_hidden_layers) in (("gemma2", 46), ("gemma3", 62))
    inferred = float(cfg.hidden_size // cfg.num_attention_heads if big else cfg.head_dim)
    if cfg.family not in ("gemma", "gemma3n", "gemma4") and cfg.query_pre_attn_scalar != inferred:
        raise GemmaError(
            f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} cannot be written to GGUF: llama.cpp "
            f"and gemmakit infer {inferred} from the layer count (spec §4.5); write a Hugging Face "
            "folder instead"
        )
    if cfg.attn_logit_softcapping is not None and cfg.family != "gemma2":  # a keras-hub Gemma4Backbone may set one
        raise GemmaError(f"llama.cpp reads an attention soft-cap for Gemma 2 only; this {cfg.family} model has one: "
                         "keep it as a keras-hub preset")
    first = cfg.first_kv_shared_layer  # llama.cpp's KV reuse rule (llama-model.cpp): last layer global, one before
    if any(cfg.kv_source(i) != first - (2 if cfg.layer_types[i] == SLIDING else 1) for i in range(first, cfg.num_hidden_layers)):
        raise GemmaError("llama.cpp shares KV from the last unshared layer (global layers) and the one before it "
                         "(sliding layers); this config's KV sharing differs, so write a Hugging Face folder instead")
    if cfg.family == "gemma4" and (cfg.rope_scaling_factor != 1.0 or (
            cfg.hidden_size_per_layer_input and cfg.vocab_size_per_layer_input != cfg.vocab_size)):
        raise GemmaError("this Gemma 4 config has a RoPE scaling factor or a per-layer embedding vocabulary that "
                         "llama.cpp's gemma4 GGUF cannot express; write a Hugging Face folder instead")
    if cfg.family == "gemma3n" and not cfg.altup_correct_scale:
        raise GemmaError("llama.cpp's gemma3n always scales the corrected AltUp stream (altup_correct_scale); this "
                         "config does not, so write a Hugging Face folder instead")
    if cfg.family == "gemma3" and cfg.layer_types != tuple(
        SLIDING if i % 6 != 5 else "full_attention" for i in range(cfg.num_hidden_layers)
    ):
        raise GemmaError(
            "this Gemma 3 config has a non-standard sliding/global layer pattern, which GGUF readers "
            "assume to be 5:1; write a Hugging Face folder instead"
        )


def write_gguf(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: GemmaConfig,
    tokenizer: Tokenizer,
    *,
    qtype: str = "f16",
    on_tensor: Callable[[int, int], None] | None = None,
) -> Path:
    """A GGUF file llama.cpp and gemmakit read: f32, f16 or q8_0 matrices (norms always f32)."""
    if qtype not in GGUF_TYPES:
        raise GemmaError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(GGUF_TYPES)}")
    if tokenizer is None:
        raise GemmaError(
            "a GGUF file must carry its tokenizer; this model was loaded without one (pass tokenizer=)"
        )
    trim = cfg.family == "gemma3n" and tokenizer.vocab_size < cfg.vocab_size
    if tokenizer.vocab_size != cfg.vocab_size and not trim:
        raise GemmaError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model {cfg.vocab_size} rows"
        )
    check_gguf_representable(cfg)
    path = Path(path)
    tensors = float_state(state, cfg)
    if cfg.family == "gemma3n":
        tensors = _gemma3n_tensors(tensors, cfg, tokenizer.vocab_size if trim else None)

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, cfg.family)
        _write_metadata(writer, cfg, qtype)
        _write_tokenizer(writer, tokenizer)
        for i, (name, t) in enumerate(tensors.items()):
            if on_tensor is not None:
                on_tensor(i, len(tensors))
            data = t.float().cpu().numpy()
            if name.endswith("norm.weight") and cfg.family not in ("gemma3n", "gemma4"):  # 1 + w (spec §4.4)
                data = data + np.float32(1.0)
            _add_tensor(writer, hf_to_gguf(name, cfg.family), data, qtype)
        if cfg.family == "gemma4":
            writer.add_tensor(ROPE_FREQS, rope_freqs(cfg))
        finish_gguf(writer)

    atomic_write(path, write)
    return path


def finish_gguf(writer: GGUFWriter) -> None:
    """Write the header, the metadata and the tensors added to `writer`, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tensor(writer: GGUFWriter, name: str, data: np.ndarray, qtype: str) -> None:
    """1-D tensors stay F32 (as llama.cpp writes norms); matrices get the requested type, except the MoE router
    (`ffn_gate_inp`), which llama.cpp's converter and quantizer always keep in F32: routing is sensitive to it."""
    exact = data.ndim == 1 or name.endswith("ffn_gate_inp.weight")
    kind = GGMLQuantizationType.F32 if exact else GGUF_TYPES[qtype]
    if kind == GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        kind = GGMLQuantizationType.F16  # Q8_0 needs rows in blocks of 32 (llama.cpp falls back the same way)
    if kind == GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
    elif kind == GGMLQuantizationType.F16:
        writer.add_tensor(name, np.ascontiguousarray(data.astype(np.float16)))
    else:
        writer.add_tensor(name, quantize(np.ascontiguousarray(data, dtype=np.float32), kind), raw_dtype=kind)


def _gemma3n_tensors(tensors: dict[str, torch.Tensor], cfg: GemmaConfig, rows: int | None) -> dict[str, torch.Tensor]:
    """Gemma 3n as llama.cpp's converter lays it out (convert_hf_to_gguf Gemma3NModel): the AltUp projections stacked
    into one tensor each; the embedding cut to the tokenizer's `rows` (the Hub's 262400 rows hold 256 ids no text
    encodes to); and, because llama.cpp's loader requires attn_k/attn_v/attn_k_norm in every layer, zeros for the
    KV-shared layers, whose keys and values neither llama.cpp nor gemmakit ever computes."""
    out = stack_streams(tensors)
    if rows is not None:
        out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:rows]
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn"
        out[f"{prefix}.k_proj.weight"] = torch.zeros(kv, d)
        out[f"{prefix}.v_proj.weight"] = torch.zeros(kv, d)
        out[f"{prefix}.k_norm.weight"] = torch.zeros(cfg.head_dim)
    return out


def _write_gemma3n_metadata(w: GGUFWriter, cfg: GemmaConfig) -> None:
    """The gemma3n keys of convert_hf_to_gguf Gemma3NModel.set_gguf_parameters, plus the local RoPE base."""
    from ..altup import std_multiplier

    n = cfg.num_hidden_layers
    w.add_feed_forward_length([cfg.layer_intermediate(i) for i in range(n)])
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_altup_active_idx(cfg.altup_active_idx)
    w.add_altup_num_inputs(cfg.altup_num_inputs)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input)
    w.add_shared_kv_layers(cfg.num_kv_shared_layers)
    w.add_activation_sparsity_scale([std_multiplier(cfg.activation_sparsity(i)) for i in range(n)])
    w.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])
    w.add_rope_freq_base_swa(cfg.rope_local_base_freq)


def rope_freqs(cfg: GemmaConfig) -> np.ndarray:
    """Gemma 4's proportional RoPE as llama.cpp expresses it (LCPP conversion/gemma.py generate_extra_tensors):
    frequency factor 1 for the rotated pairs of a full-attention head, 1e30 (no rotation) for the rest."""
    half = (cfg.global_head_dim or cfg.head_dim) // 2
    rotated = int(cfg.partial_rotary_factor * half * 2 // 2)
    return np.array([1.0] * rotated + [1e30] * (half - rotated), dtype=np.float32)


def _write_gemma4_metadata(w: GGUFWriter, cfg: GemmaConfig, shared_kv_layers: int | None = None) -> None:
    """The gemma4 keys of LCPP conversion/gemma.py Gemma4Model.set_gguf_parameters (head dims, per-layer widths and
    KV heads as arrays, the sliding pattern, KV sharing, PLE width, experts). shared_kv_layers: the count to state
    instead of the config's (an assistant drafter's layers all read the target's keys)."""
    n = cfg.num_hidden_layers
    w.add_key_length(cfg.global_head_dim or cfg.head_dim)
    w.add_value_length(cfg.global_head_dim or cfg.head_dim)
    w.add_key_length_swa(cfg.head_dim)
    w.add_value_length_swa(cfg.head_dim)
    w.add_rope_dimension_count(cfg.global_head_dim or cfg.head_dim)  # proportional: rope_freqs masks the rest
    w.add_rope_dimension_count_swa(cfg.head_dim)
    w.add_feed_forward_length([cfg.layer_intermediate(i) for i in range(n)] if cfg.use_double_wide_mlp
                              else cfg.intermediate_size)
    w.add_head_count_kv([cfg.layer_kv_heads(i) for i in range(n)] if cfg.num_global_key_value_heads
                        else cfg.num_key_value_heads)
    w.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])
    w.add_shared_kv_layers(cfg.num_kv_shared_layers if shared_kv_layers is None else shared_kv_layers)
    w.add_embedding_length_per_layer_input(cfg.hidden_size_per_layer_input)
    w.add_rope_freq_base_swa(cfg.rope_local_base_freq)
    if cfg.enable_moe_block:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.top_k_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def _write_metadata(w: GGUFWriter, cfg: GemmaConfig, qtype: str, shared_kv_layers: int | None = None) -> None:
    """Keys and values as llama.cpp's Gemma converters write them (spec §4.5)."""
    w.add_name(cfg.name or cfg.family)
    w.add_file_type(_FILE_TYPES[qtype])
    w.add_quantization_version(2)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.family == "gemma4":
        _write_gemma4_metadata(w, cfg, shared_kv_layers)
    elif cfg.family == "gemma3n":
        _write_gemma3n_metadata(w, cfg)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.family == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping or 0.0)
    if cfg.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if cfg.sliding_window is not None:
        w.add_sliding_window(cfg.sliding_window)
    if cfg.family in ("gemma3", "gemma3n", "gemma4") or cfg.rope_theta != 10_000.0:
        w.add_rope_freq_base(cfg.rope_theta)
    if cfg.family == "gemma3" and cfg.rope_local_base_freq != 10_000.0:
        w.add_rope_freq_base_swa(cfg.rope_local_base_freq)
    if cfg.rope_scaling_factor != 1.0:
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling_factor)


def _write_tokenizer(w: GGUFWriter, tokenizer: Tokenizer) -> None:
    """SentencePiece fields (spec §5.4): pieces, scores (added tokens -1000), token types, special ids."""
    proto = tokenizer.model_proto()
    sp = pb.ModelProto.SentencePiece
    tokens, scores, types = [], [], []
    for i, p in enumerate(proto.pieces):
        if i in tokenizer.special_ids or p.type in (sp.CONTROL, sp.UNKNOWN):
            tokens.append(p.piece)
            scores.append(-1000.0)
            types.append(TokenType.CONTROL)
        elif p.type == sp.BYTE:
            tokens.append(p.piece)
            scores.append(0.0)
            types.append(TokenType.BYTE)
        elif p.type == sp.USER_DEFINED:  # llama.cpp re-spells user-defined space runs with " "
            tokens.append(p.piece.replace("\u2581", " "))
            scores.append(-1000.0)
            types.append(TokenType.USER_DEFINED)
        elif p.type == sp.UNUSED:
            tokens.append(p.piece)
            scores.append(p.score)
            types.append(TokenType.UNUSED)
        else:
            tokens.append(p.piece)
            scores.append(p.score)
            types.append(TokenType.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_sep_token(False)
    w.add_add_space_prefix(False)

