"""Tiny random EmbeddingGemma / EmbeddingGemma 2 folders laid out as the releases are, built with transformers.

EmbeddingGemma (google/embeddinggemma-300m): a sentence-transformers folder: the Gemma3TextModel (config.json with
use_bidirectional_attention, model.safetensors, tokenizer files wrapping texts in <bos> ... <eos>) at the root,
modules.json, 1_Pooling (mean, prompt included), 2_Dense (D -> 4D) and 3_Dense (4D -> D) without bias or activation,
4_Normalize, config_sentence_transformers.json with the task prompts, sentence_bert_config.json (max_seq_length).
EmbeddingGemma 2: the same kind of folder around an EmbeddingGemma2Model (multimodal config, text only here) or the
bare EmbeddingGemma2TextModel, with mean pooling and Normalize after the model's own projection.
The vocabulary is the real Gemma 3 one (texts tokenize as they would), so the embedding table is 262144 rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from reference import hf_gguf_tokenizer_dir

PROMPTS = {  # google/embeddinggemma-300m config_sentence_transformers.json (a subset)
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
}
MAX_SEQ = 64
ST = "sentence_transformers.models."


def _randomize(model: torch.nn.Module, seed: int, scale_norms: bool) -> None:
    """Non-trivial norm weights and embeddings (HF initialises norms to 0 or 1, which would hide norm bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if scale_norms else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _tokenizer(folder: Path) -> None:
    """The Gemma 3 vocabulary with EmbeddingGemma's wrapping: <bos> text <eos> (post-processor and config flags)."""
    src = hf_gguf_tokenizer_dir()
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<eos>", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<eos>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": "<eos>", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]},
                           "<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    model = src.parent / f"{src.name}.model"  # the release also ships tokenizer.model (loads faster than the json)
    if not model.exists():
        from gemmakit.tokenizer import Tokenizer

        Tokenizer.from_hf_json(src / "tokenizer.json").save(model)
    shutil.copyfile(model, folder / "tokenizer.model")
    conf = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    conf.update(add_bos_token=True, add_eos_token=True, model_max_length=MAX_SEQ, padding_side="right")
    (folder / "tokenizer_config.json").write_text(json.dumps(conf), encoding="utf-8")


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2), encoding="utf-8")


def _dense(folder: Path, n_in: int, n_out: int, seed: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    _write(folder / "config.json", {"in_features": n_in, "out_features": n_out, "bias": False,
                                    "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({"linear.weight": torch.randn(n_out, n_in, generator=g) * n_in**-0.5}, str(folder / "model.safetensors"))


def _st_files(folder: Path, dim: int, dense: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST + "Pooling"}]
    if dense:
        modules += [{"idx": 2, "name": "2", "path": "2_Dense", "type": ST + "Dense"},
                    {"idx": 3, "name": "3", "path": "3_Dense", "type": ST + "Dense"}]
        _dense(folder / "2_Dense", dim, 4 * dim, 1)
        _dense(folder / "3_Dense", 4 * dim, dim, 2)
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                    "type": ST + "Normalize"})
    (folder / modules[-1]["path"]).mkdir()
    _write(folder / "modules.json", modules)
    _write(folder / "1_Pooling" / "config.json", {
        "word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True})
    _write(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": PROMPTS, "default_prompt_name": None,
        "similarity_fn_name": "cosine"})
    _write(folder / "sentence_bert_config.json", {"max_seq_length": MAX_SEQ, "do_lower_case": False})


def embeddinggemma(folder: Path, seed: int = 0, layers: int = 4) -> Path:
    """EmbeddingGemma at tiny widths: 4 layers (sliding, sliding, full, sliding), window 8 (radius 4), MQA.
    layers=6: Gemma 3's default pattern (five sliding, one full), the one a GGUF implies."""
    import transformers

    shutil.rmtree(folder, ignore_errors=True)
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"] if layers == 4 else None
    cfg = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, layer_types=types,
        max_position_embeddings=128, use_bidirectional_attention=True, rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(seed)
    model = transformers.Gemma3TextModel(cfg).eval()
    _randomize(model, seed, scale_norms=False)
    model.save_pretrained(folder)
    _tokenizer(folder)
    _st_files(folder, 32, dense=True)
    return folder


def _eg2_text_config():
    from transformers.models.embedding_gemma2 import EmbeddingGemma2TextConfig

    return EmbeddingGemma2TextConfig(
        vocab_size=262144, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=3, hidden_size_per_layer_input=8, embedding_dim=24,
        sliding_window_pattern=2, global_head_dim=16, num_global_key_value_heads=1, max_position_embeddings=128)


def embeddinggemma2(folder: Path, seed: int = 0, text_only: bool = False) -> Path:
    """EmbeddingGemma 2 at tiny widths: sliding/full alternating, radius 3, full layers with 16-wide heads and one
    KV head, projection-only per-layer inputs, projection to 24. text_only: the bare embedding_gemma2_text model."""
    from transformers.models.embedding_gemma2 import (
        EmbeddingGemma2Config,
        EmbeddingGemma2Model,
        EmbeddingGemma2TextModel,
    )

    shutil.rmtree(folder, ignore_errors=True)
    tc = _eg2_text_config()
    torch.manual_seed(seed)
    if text_only:
        model = EmbeddingGemma2TextModel(tc).eval()
    else:
        model = EmbeddingGemma2Model(EmbeddingGemma2Config(text_config=tc.to_dict())).eval()
    _randomize(model, seed, scale_norms=True)
    model.save_pretrained(folder)
    _tokenizer(folder)
    _st_files(folder, 24, dense=False)
    return folder



def write_gemma_embedding_gguf(folder: Path, path: Path) -> Path:
    """The folder as llama.cpp's converter writes it (float32), by gemmakit's writer (embed/export.py)."""
    from gemmakit.embed.export import write_gemma_embedding_gguf as write

    return write(folder, path)
