"""gemmakit info: what a model file is, without loading its weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..config import GemmaConfig
from ..loader import sniff
from ..weights.gguf import config_from_gguf, read_gguf, tokenizer_from_gguf
from ..weights.hf import read_hf_config
from ..weights.keras import read_keras_config
from ..weights.orbax import orbax_config, read_orbax_shapes


def info(model: Annotated[str | None, typer.Option("--model", "-m", help="GGUF file, HF folder, keras-hub preset or "
                                                                         "Orbax checkpoint")] = None,
         variant: Annotated[str | None, typer.Option(help="Variant of an Orbax checkpoint whose shapes match no "
                                                          "single preset, e.g. gemma-2-2b.")] = None) -> None:
    """Print architecture, sizes, quantization types, context and tokenizer facts.

    Example:  gemmakit info -m gemma-3-270m-q4_k_m.gguf
    """
    if model is None:
        from ..embedded import embedded_path

        path = embedded_path()
    else:
        path = Path(model).expanduser()
    fmt = sniff(path)
    rows: list[tuple[str, str]] = [("file", str(path)), ("format", fmt)]
    if fmt == "gguf":
        g = read_gguf(path)
        cfg = config_from_gguf(g)
        types = Counter(t.qtype.name for t in g.tensors.values())
        size = sum(t.n_bytes for t in g.tensors.values())
        rows += [("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
                 ("weights on disk", f"{size / 2**20:.1f} MiB")]
        tok = tokenizer_from_gguf(g)
        rows += [("tokenizer", f"SentencePiece BPE, {tok.vocab_size} pieces, bos={tok.bos_id} eos={tok.eos_id}, "
                               "byte fallback, no dummy prefix")]
    elif fmt == "hf":
        cfg = read_hf_config(path)
    elif fmt == "keras":
        cfg = read_keras_config(path)
    elif fmt == "orbax":
        cfg = orbax_config(read_orbax_shapes(path), variant, path)
    else:
        raise typer.BadParameter("info reads GGUF files, HF folders, keras-hub presets and Orbax checkpoints; a .ckpt "
                                 "carries no config")
    Console().print(_table(cfg, rows))


def _table(cfg: GemmaConfig, rows: list[tuple[str, str]]) -> Table:
    t = Table(show_header=False, box=None)
    sliding = sum(1 for x in cfg.layer_types if x == "sliding_attention")
    arch = [
        ("architecture", f"{cfg.family} ({cfg.name})"),
        ("parameters", f"{cfg.num_params() / 1e6:.1f} M"),
        ("layers", f"{cfg.num_hidden_layers} ({sliding} sliding-window, {cfg.num_hidden_layers - sliding} global)"),
        ("hidden / ffn", f"{cfg.hidden_size} / {cfg.intermediate_size}"),
        ("heads (q / kv) x dim", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} x {cfg.head_dim}"),
        ("context", str(cfg.max_position_embeddings)),
        ("sliding window", str(cfg.sliding_window or "-")),
        ("rope base (global / local)", f"{cfg.rope_theta:g} / {cfg.rope_local_base_freq:g}"
                                       + (f", linear x{cfg.rope_scaling_factor:g}" if cfg.rope_scaling_factor != 1 else "")),
        ("soft-caps (attn / final)", f"{cfg.attn_logit_softcapping or '-'} / {cfg.final_logit_softcapping or '-'}"),
        ("vocab", str(cfg.vocab_size)),
    ]
    if cfg.family in ("gemma3n", "gemma4"):
        replaced = dict(gemma4_rows(cfg) if cfg.family == "gemma4" else gemma3n_rows(cfg))
        arch = [(k, replaced.pop(k, v)) for k, v in arch]
        arch[5:5] = list(replaced.items())  # after parameters, layers, hidden / ffn and heads
    for k, v in rows[:2] + arch + rows[2:]:
        t.add_row(f"[bold]{k}[/]", v)
    return t


def gemma4_rows(cfg: GemmaConfig) -> list[tuple[str, str]]:
    """Gemma 4's per-layer facts: head dims and KV heads by layer type, MLP widths, PLE, KV sharing, experts."""
    n, first = cfg.num_hidden_layers, cfg.first_kv_shared_layer
    kinds = {t: next(i for i in range(n) if cfg.layer_types[i] == t) for t in dict.fromkeys(cfg.layer_types)}
    heads = ", ".join(f"{cfg.num_attention_heads} / {cfg.layer_kv_heads(i)} x {cfg.layer_head_dim(i)} "
                      f"({'sliding' if t == 'sliding_attention' else 'global'}"
                      f"{', k=v' if cfg.k_eq_v(i) else ''})" for t, i in kinds.items())
    ffn = f"{cfg.hidden_size} / {cfg.intermediate_size}"
    if cfg.use_double_wide_mlp and cfg.num_kv_shared_layers:
        ffn += f" ({2 * cfg.intermediate_size} on KV-shared layers)"
    total, notes = cfg.num_params(), []
    if cfg.hidden_size_per_layer_input:  # "E2B": effective parameters, the PLE table is a lookup
        notes.append(f"{(total - cfg.vocab_size_per_layer_input * cfg.hidden_size_per_layer_input * n) / 1e6:.1f} M "
                     "without the per-layer embedding table")
    if cfg.enable_moe_block:  # "A4B": parameters a token runs through
        idle = n * (cfg.num_experts - cfg.top_k_experts) * 3 * cfg.moe_intermediate_size * cfg.hidden_size
        notes.append(f"{(total - idle) / 1e6:.1f} M active per token")
    rows = [("parameters", f"{total / 1e6:.1f} M" + (f" ({'; '.join(notes)})" if notes else "")),
            ("hidden / ffn", ffn), ("heads (q / kv) x dim", heads),
            ("rope (global)", f"proportional, {cfg.partial_rotary_factor:g} of the pairs rotate")]
    ple = cfg.hidden_size_per_layer_input
    rows.append(("per-layer embeddings", f"{ple} per layer, table {cfg.vocab_size_per_layer_input} x {ple * n}"
                 if ple else "-"))
    if cfg.num_kv_shared_layers:
        sources = sorted({cfg.kv_source(i) for i in range(first, n)})
        rows.append(("KV sharing", f"layers {first}-{n - 1} reuse the keys/values of layer(s) "
                     f"{', '.join(map(str, sources))} ({len(set(cfg.kv_source(i) for i in range(n)))} caches)"))
    else:
        rows.append(("KV sharing", "-"))
    rows.append(("experts", f"{cfg.num_experts} x {cfg.moe_intermediate_size}, top {cfg.top_k_experts} per token, "
                 "beside the dense MLP" if cfg.enable_moe_block else "-"))
    return rows


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out: list[str] = []
    for i in layers:
        if out and int(out[-1].split("-")[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def gemma3n_rows(cfg: GemmaConfig) -> list[tuple[str, str]]:
    """Gemma 3n's facts: AltUp streams, LAuReL, sparse layers, per-layer MLP widths, PLE, KV sharing."""
    n, first = cfg.num_hidden_layers, cfg.first_kv_shared_layer
    table = cfg.vocab_size_per_layer_input * cfg.hidden_size_per_layer_input * n
    widths = sorted(set(cfg.intermediate_sizes))
    ffn = f"{cfg.hidden_size} / " + (str(widths[0]) if len(widths) == 1 else f"{', '.join(map(str, widths))} by layer")
    sparse: dict[float, list[int]] = {}
    for i in range(n):
        if cfg.activation_sparsity(i) > 0:
            sparse.setdefault(cfg.activation_sparsity(i), []).append(i)
    rows = [
        ("parameters", f"{cfg.num_params() / 1e6:.1f} M ({(cfg.num_params() - table) / 1e6:.1f} M without the "
                       "per-layer embedding table)"),
        ("hidden / ffn", ffn),
        ("AltUp", f"{cfg.altup_num_inputs} streams, stream {cfg.altup_active_idx} active"),
        ("LAuReL", f"rank {cfg.laurel_rank}"),
        ("activation sparsity", "; ".join(f"{s:g} in layers {_ranges(ls)}" for s, ls in sparse.items()) or "-"),
        ("per-layer embeddings", f"{cfg.hidden_size_per_layer_input} per layer, table "
                                 f"{cfg.vocab_size_per_layer_input} x {cfg.hidden_size_per_layer_input * n}"),
    ]
    if cfg.num_kv_shared_layers:
        sources = sorted({cfg.kv_source(i) for i in range(first, n)})
        rows.append(("KV sharing", f"layers {first}-{n - 1} reuse the keys/values of layer(s) "
                     f"{', '.join(map(str, sources))}"))
    return rows
