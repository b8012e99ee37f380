"""load(source) -> Model: sniff the format from the path itself, read config + weights + tokenizer, load strictly."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from . import cpu_share
from .api import Model
from .config import GemmaConfig, preset
from .draft import Drafter, build_drafter, drafter_on_blocks, is_drafter_folder, load_drafter_state
from .draft_gguf import ARCH as DRAFTER_ARCH
from .draft_gguf import load_drafter_gguf
from .errors import GemmaError
from .model import Gemma
from .quant import fast_path as fast
from .quant.kernels import release_threads
from .tokenizer import Tokenizer
from .weights.ckpt import read_ckpt
from .weights.gguf import config_from_gguf, read_gguf, state_dict_from_gguf, tokenizer_from_gguf
from .weights.hf import multimodal_note, read_hf_config, read_hf_state_dict
from .weights.keras import (
    is_keras_preset,
    keras_tokenizer,
    keras_vision_note,
    read_keras_config,
    read_keras_state_dict,
)
from .weights.orbax import is_orbax_checkpoint, orbax_config, orbax_to_hf, read_orbax_state_dict

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GemmaError("device='cuda' was asked for but PyTorch sees no CUDA GPU; use device='cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on CUDA by default; never float16 (Gemma activations overflow it, spec §3)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype in (torch.float16, "float16", "fp16", "half"):
        raise GemmaError("Gemma overflows in float16 (activations exceed its range); use dtype='bfloat16' or "
                         "'float32'")
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise GemmaError(f"unknown dtype {dtype!r}; use 'float32' or 'bfloat16'")


def sniff(path: Path) -> str:
    """'gguf', 'hf', 'keras', 'orbax' or 'ckpt', decided by the file's content and layout, never by its name."""
    if not path.exists():
        raise GemmaError(f"{path} does not exist; pass a .gguf file, a Hugging Face model folder, a keras-hub "
                         "preset, a Flax/Orbax checkpoint or a gemma_pytorch .ckpt")
    if path.is_dir():
        if (path / "config.json").exists():
            return "keras" if is_keras_preset(path) else "hf"
        if (path / "pytorch_model.bin.index.json").exists():
            return "ckpt"
        if is_orbax_checkpoint(path):
            return "orbax"
        inner = [p for p in path.iterdir() if p.is_dir() and is_orbax_checkpoint(p)]
        if inner:
            raise GemmaError(f"{path} holds the Orbax checkpoint {inner[0].name}/; pass that folder (its "
                             "tokenizer.model is found beside it)")
        raise GemmaError(f"{path} is a folder without config.json; a Hugging Face model folder needs "
                         "config.json and *.safetensors (a keras-hub preset config.json + model.weights.h5, an "
                         "Orbax checkpoint _METADATA + manifest.ocdbt)")
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return "gguf"
    if head[:2] == b"PK" or path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return "ckpt"
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise GemmaError(f"{path} is one file of a Hugging Face model; pass the folder that holds it instead")
    raise GemmaError(f"{path} is not a model file gemmakit knows: expected a GGUF file, a Hugging Face folder "
                     "(config.json + *.safetensors) or a gemma_pytorch .ckpt")


def _with_progress(label: str, enabled: bool) -> tuple[Progress, Callable[[int, int], None]]:
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), disable=not enabled, transient=True)
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _strict_load(module: Gemma, state: dict[str, torch.Tensor], source: Path) -> None:
    """Every expected tensor present with the right shape, nothing unexpected; names the key and the fix."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise GemmaError(f"{source} lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}; "
                         "the file is incomplete or its config does not match its weights")
    if extra:
        raise GemmaError(f"{source} has {len(extra)} unexpected tensor(s), e.g. {extra[0]}; it is not a plain "
                         "Gemma text decoder of this config (wrong variant?)")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise GemmaError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, the config expects "
                             f"{shape}; wrong variant for these weights?")
    module.load_state_dict(state, strict=True, assign=True)


def _tokenizer_near(folder: Path) -> Tokenizer | None:
    if (folder / "tokenizer.model").exists():
        return Tokenizer.from_file(folder / "tokenizer.model")
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_hf_json(folder / "tokenizer.json")
    return None


def load(source: str | Path | None = None, *, dtype: str | torch.dtype | None = "auto",
         device: str | torch.device = "auto", quant: str | None = "auto", variant: str | GemmaConfig | None = None,
         tokenizer: str | Path | None = None, progress: bool = True, adapter: str | Path | None = None,
         ) -> Model | Drafter:
    """Load a Gemma text model for inference, or a Gemma 4 assistant drafter (pass it as generate(draft=...)).

    source: None for the embedded Gemma 3 270M, a GGUF file, a Hugging Face folder, a keras-hub preset folder, a
    Flax/Orbax checkpoint of the gemma library (variant inferred from the shapes where unambiguous), or a
    gemma_pytorch .ckpt (which carries no config: name its `variant`, e.g. "gemma-2b" (gemmakit.PRESETS), or pass
    a GemmaConfig).
    dtype: "auto" = float32 on CPU, bfloat16 on CUDA.
    quant: "auto" runs a GGUF on the CPU from its own weight blocks (the fast path: native kernels over the mapped
    file); None dequantizes everything to `dtype`, the exact reference path; "q8" puts any source on the fast path
    (float weights quantized to Q8_0; a GGUF keeps its own blocks).
    tokenizer: a tokenizer.model/tokenizer.json to use instead of the one found with the weights.
    adapter: a LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors) to attach.
    """
    cpu_share.adapt()  # a first sample of what other programs use, so the first prompt fits the free cores
    model = _load(source, dtype=dtype, device=device, quant=quant, variant=variant, tokenizer=tokenizer,
                  progress=progress, adapter=adapter)
    release_threads()  # loading is done here: the thread that generates may be another one (generate.py)
    return model


def _load(source: str | Path | None, *, dtype: str | torch.dtype | None, device: str | torch.device,
          quant: str | None, variant: str | GemmaConfig | None, tokenizer: str | Path | None, progress: bool,
          adapter: str | Path | None) -> Model | Drafter:
    if adapter is not None:  # a LoRA adapter folder (PEFT format), injected into the float linears
        from .lora.adapter import load_adapter

        model = load(source, dtype=dtype, device=device, quant=None if quant == "auto" else quant, variant=variant,
                     tokenizer=tokenizer, progress=progress)
        load_adapter(model.module, adapter)
        return model
    if quant not in (None, "auto", "q8"):
        raise GemmaError(f"unknown quant={quant!r}; use 'auto', 'q8' or None (weights dequantized to dtype)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if source is None:
        from .embedded import NAME, embedded_path

        path, label = embedded_path(progress=progress), NAME
    else:
        path = Path(source).expanduser()
        label = str(path)
    fmt = sniff(path)
    if fmt == "hf" and is_drafter_folder(path):  # gemma4_assistant / gemma4_unified_assistant
        drafter = build_drafter(*load_drafter_state(path, dt), path, dt).to(dev)
        return drafter_on_blocks(drafter) if quant == "q8" and dev.type == "cpu" and fast.available() else drafter
    tok: Tokenizer | None = None
    int8_rows = False
    if fmt == "gguf":
        g = read_gguf(path)
        if g.architecture == DRAFTER_ARCH:  # llama.cpp's gemma4-assistant layout (draft_gguf.py)
            blocks = dev.type == "cpu" and quant in ("auto", "q8") and fast.available()
            return load_drafter_gguf(g, dt, blocks=blocks).to(dev)
        cfg = _refuse_encoder(config_from_gguf(g), path)
        tok = tokenizer_from_gguf(g)
        if dev.type == "cpu" and quant in ("auto", "q8") and fast.available():
            return Model(fast.load_gguf_fast(g, cfg, dtype=dt, progress=progress), tok, label, fmt)
        if dev.type == "cpu" and quant == "auto":  # no native kernels: never a silent fp32 copy of the file
            from .quant.int8_ref import reference_plan

            kind, size = reference_plan(g, None if dtype in (None, "auto") else dt)
            _note(f"native kernels unavailable (they need gcc or clang at first use): {label} runs on the reference "
                  f"path with {kind} weights, ~{size / 1e9:.1f} GB in memory (file: {path.stat().st_size / 1e9:.1f} "
                  "GB)")
            int8_rows = kind == "int8"  # read as bf16, each matrix then rounded to int8 rows
            dt = torch.bfloat16 if kind in ("bfloat16", "int8") else dt
        bar, update = _with_progress("loading weights", progress)
        with bar:
            state = state_dict_from_gguf(g, cfg.family, on_tensor=update, dtype=dt)
    elif fmt == "hf":
        cfg = _refuse_encoder(read_hf_config(path), path)
        if (note := multimodal_note(path)) is not None:
            _note(note)
        state = read_hf_state_dict(path, cfg, dtype=dt)
        tok = _tokenizer_near(path)
    elif fmt == "keras":
        cfg = read_keras_config(path)
        if (note := keras_vision_note(path)) is not None:
            _note(note)
        state = read_keras_state_dict(path, cfg, dtype=dt)
        tok = keras_tokenizer(path)
    elif fmt == "orbax":
        raw = read_orbax_state_dict(path)
        cfg = orbax_config(raw, variant, path)
        state = orbax_to_hf(raw, cfg, path, dtype=dt)
        tok = _tokenizer_near(path) or _tokenizer_near(path.parent)
    else:
        if variant is None:
            raise GemmaError(f"{path} is a gemma_pytorch checkpoint, which carries no config; pass variant= "
                             "(e.g. 'gemma-2b', 'gemma-7b', 'gemma-2-2b', 'gemma-3-1b')")
        cfg = variant if isinstance(variant, GemmaConfig) else preset(variant)
        state = read_ckpt(path, cfg)
        tok = _tokenizer_near(path if path.is_dir() else path.parent)
    if tokenizer is not None:
        tpath = Path(tokenizer)
        tok = Tokenizer.from_hf_json(tpath) if tpath.suffix == ".json" else Tokenizer.from_file(tpath)
    module = build(cfg, state, path, dtype=dt, device=dev)
    if int8_rows:
        from .quant.int8_ref import to_int8_rows

        del state
        to_int8_rows(module)
    if quant == "q8":
        if dev.type != "cpu":
            raise GemmaError("quant='q8' is a CPU path; on CUDA use quant=None (bfloat16)")
        if not fast.available():
            raise GemmaError("quant='q8' needs the native kernels, which need a C compiler (gcc) at first use; "
                             "install gcc, or use quant=None")
        else:
            fast.to_q8(module)
    return Model(module, tok, label, fmt)


def _refuse_encoder(cfg: GemmaConfig, path: Path) -> GemmaConfig:
    if cfg.use_bidirectional_attention:
        raise GemmaError(f"{path} is an embedding model (bidirectional encoder), not a text generator; load it with "
                         "gemmakit.load_embedding_model(), or run `gemmakit embed -m` / `gemmakit serve -m` on it")
    return cfg


def _note(text: str) -> None:
    """A one-line note to the user (a GemmaNote warning: shown once, filterable)."""
    warnings.warn(text, GemmaNote, stacklevel=3)


class GemmaNote(UserWarning):
    """Something the user should know about how a model was loaded; not an error."""


def build(cfg: GemmaConfig, state: dict[str, torch.Tensor], source: Path | str = "<state dict>", *,
          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Gemma:
    """A Gemma module from a config and HF-named tensors, without ever allocating random weights."""
    with torch.device("meta"):
        module = Gemma(cfg)
    _strict_load(module, state, Path(source))
    return module.to(device=device, dtype=dtype).eval()


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """Only the tokenizer of a model (the embedded one when None): a GGUF's vocabulary, the tokenizer.model /
    tokenizer.json of a Hugging Face folder or beside a .ckpt, or such a file itself. No weights are read."""
    if source is None:
        from .embedded import embedded_path

        path = embedded_path(progress=False)
    else:
        path = Path(source).expanduser()
    if path.is_file() and path.name.endswith("tokenizer.json"):
        return Tokenizer.from_hf_json(path)
    if path.is_file() and path.suffix == ".model":
        return Tokenizer.from_file(path)
    fmt = sniff(path)
    if fmt == "gguf":
        tok = tokenizer_from_gguf(read_gguf(path))
    elif fmt == "keras":
        tok = keras_tokenizer(path)
    else:
        tok = _tokenizer_near(path if path.is_dir() else path.parent)
        if tok is None and fmt == "orbax":
            tok = _tokenizer_near(path.parent)
    if tok is None:
        raise GemmaError(f"{path}: no tokenizer found; put tokenizer.model (or tokenizer.json) next to the weights")
    return tok
