"""Real-shape test GGUFs from random weights, for speed and memory benchmarks at the sizes users run.

No real checkpoint can be downloaded here, and speed does not depend on the weights' values: a random model of a
preset's exact shapes (gemmakit.PRESETS, e.g. gemma-2b), written as an f16 GGUF by gemmakit's converter and then
quantized by llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`), reads the same bytes per token as the
real file of that type. The tokenizer is the embedded Gemma 3 vocabulary cut (or padded) to the preset's size.

    python -m gemmakit.bench.shapes gemma-2b -o gemma-2b.Q4_K_M.gguf            # Q4_K_M, as llama.cpp makes it
    python -m gemmakit.bench.shapes gemma-2b -o gemma-2b.Q6_K.gguf --type Q6_K

The same by hand: write a random HF folder, `gemmakit convert -m FOLDER -o f16.gguf --type f16`, then
`llama_cpp.llama_model_quantize(b"f16.gguf", b"out.gguf", params)` with params.ftype = LLAMA_FTYPE_MOSTLY_Q4_K_M.
"""

from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

import torch

from ..config import GemmaConfig, preset
from ..errors import GemmaError
from ..tokenizer import Tokenizer

FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def sized_tokenizer(vocab_size: int) -> Tokenizer:
    """The embedded Gemma 3 tokenizer with exactly `vocab_size` pieces (cut, or padded with <unusedN> pieces)."""
    from ..embedded import embedded_path
    from ..weights.gguf import read_gguf, tokenizer_from_gguf

    proto = tokenizer_from_gguf(read_gguf(embedded_path(progress=False))).model_proto()
    if len(proto.pieces) > vocab_size:
        del proto.pieces[vocab_size:]
    while len(proto.pieces) < vocab_size:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{len(proto.pieces)}>", 0.0, 4  # USER_DEFINED
    return Tokenizer(proto)


def random_state(cfg: GemmaConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """HF-named random bf16 weights of `cfg`, built shape by shape; norms scale by 1 (weights 0 where the norm adds
    1, as Gemma 1-3 do; 1 for Gemma 4, whose norms and router scales multiply by the weight itself)."""
    from ..model import Gemma

    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Gemma(cfg).state_dict().items()}
    one = 1.0 - cfg.norm_offset
    return {k: torch.full(s, one, dtype=torch.bfloat16) if _is_scale(cfg, k)
            else torch.randn(s, dtype=torch.bfloat16) * std for k, s in shapes.items()}


def _is_scale(cfg: GemmaConfig, name: str) -> bool:
    return name.endswith("norm.weight") or (cfg.family in ("gemma3n", "gemma4") and (name.endswith("scale")
                                                                          or name.endswith("layer_scalar")))


def shortened(cfg: GemmaConfig, layers: int | None = None, vocab: int | None = None) -> GemmaConfig:
    """`cfg` with only its first `layers` layers (Gemma 4: the last made global, as transformers does) and a `vocab`-row
    vocabulary: every matrix keeps its real width, so per-layer speed carries over to the full model at a fraction
    of the file. Gemma 4 KV sharing is scaled down and starts after a global layer, as llama.cpp requires; Gemma 3n
    keeps llama.cpp's fixed 20 layers that compute keys/values (fewer layers: none shared), its per-layer lists cut,
    and a vocabulary of its per-layer table's rows (llama.cpp needs both tables of one height)."""
    changes: dict = {}
    if layers is not None and layers < cfg.num_hidden_layers:
        types = list(cfg.layer_types[:layers])
        if cfg.family == "gemma4":  # Gemma 1-3 GGUFs imply the layer pattern from the index: keep the prefix
            types[-1] = "full_attention"
        changes.update(num_hidden_layers=layers, layer_types=tuple(types))
        if cfg.family == "gemma3n":
            changes.update(num_kv_shared_layers=max(0, layers - 20), intermediate_sizes=cfg.intermediate_sizes[:layers],
                           activation_sparsity_pattern=cfg.activation_sparsity_pattern[:layers])
        elif cfg.num_kv_shared_layers:
            target = round(layers * cfg.num_kv_shared_layers / cfg.num_hidden_layers)
            changes["num_kv_shared_layers"] = max(
                (k for k in range(1, target + 1) if types[layers - k - 1] == "full_attention"), default=0)
    if vocab is None and cfg.family == "gemma3n":
        vocab = cfg.vocab_size_per_layer_input
    if vocab is not None:
        changes["vocab_size"] = vocab
        if cfg.vocab_size_per_layer_input:
            changes["vocab_size_per_layer_input"] = vocab
    return cfg.replace(**changes) if changes else cfg


def quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer, through llama-cpp-python (the `bench` extra)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise GemmaError("quantizing needs llama-cpp-python: pip install -e '.[bench]'") from e
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[ftype], threads
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        tmp.unlink(missing_ok=True)
        raise GemmaError(f"llama.cpp could not quantize {src} to {ftype}")
    os.replace(tmp, dst)


def make(name: str, out: Path, ftype: str = "Q4_K_M", *, seed: int = 0, threads: int | None = None,
         layers: int | None = None, vocab: int | None = None) -> Path:
    """Write `out`: a random model of preset `name` (optionally `shortened`) as a GGUF of llama.cpp type `ftype`
    (or F16)."""
    from ..weights.writers import write_gguf

    if ftype not in FTYPES and ftype != "F16":
        raise GemmaError(f"unknown type {ftype!r}; choose F16 or one of {', '.join(FTYPES)}")
    cfg = shortened(preset(name), layers, vocab)
    out = Path(out)
    f16 = out if ftype == "F16" else out.with_name(f".{out.stem}.f16.gguf")
    write_gguf(f16, random_state(cfg, seed), cfg, sized_tokenizer(cfg.vocab_size), qtype="f16")
    if ftype != "F16":
        try:
            quantize(f16, out, ftype, threads or len(os.sched_getaffinity(0)))
        finally:
            f16.unlink(missing_ok=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help="a gemmakit preset, e.g. gemma-2b, gemma-2-2b, gemma-3-1b")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--type", default="Q4_K_M", help=f"F16 or one of {', '.join(FTYPES)} (default Q4_K_M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, help="only the first N layers (real widths; a smaller file)")
    p.add_argument("--vocab", type=int, help="a vocabulary of N rows instead of the preset's")
    a = p.parse_args()
    print(make(a.preset, a.out, a.type.upper(), seed=a.seed, layers=a.layers, vocab=a.vocab))


if __name__ == "__main__":
    main()
