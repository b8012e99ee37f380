"""GGUF reading: header + metadata + tensor table parsed here, block formats dequantized by the `gguf` package.

Why our own header parser: gguf.GGUFReader builds a Python object per array element and took 8.6 s to open the
embedded 270M file (262144 vocabulary strings); this reader takes a fraction of a second, memory-maps the data,
and checks for truncation before anything is read. Tensor types and dequantization stay with `gguf`.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: F401  (re-exported)
from gguf.quants import dequantize

from ..config import FAMILIES, GLOBAL, SLIDING, GemmaConfig, default_layer_types
from ..disk_cache import cache_dir, prune
from ..errors import GemmaError
from ..tokenizer import Tokenizer
from .names import ROPE_FREQS, gguf_to_hf, split_stacked, unused_shared_kv

MAGIC = b"GGUF"
TOKENIZER_CACHE = "1"
KEEP_TOKENIZERS = 16  # rebuilt tokenizers kept in the cache (~5 MB each)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows first): ggml dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    def raw(self, data: np.ndarray) -> np.ndarray:
        return data[self.offset:self.offset + self.n_bytes]


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    data: np.ndarray  # the whole file, memory-mapped as uint8

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (quantized blocks) without copying."""
        return self.tensors[name].raw(self.data)

    def dequantize(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Float32 array in PyTorch shape (only `rows` of the first axis, if given); every type that gguf can
        dequantize is supported."""
        t = self.tensors[name]
        raw = t.raw(self.data)
        if rows is not None:
            raw = raw.reshape(t.shape[0], -1)[rows]
            t = replace(t, shape=(raw.shape[0], *t.shape[1:]))
        if t.qtype == GGMLQuantizationType.F32:
            arr = raw.view(np.float32)
        elif t.qtype == GGMLQuantizationType.F16:
            arr = raw.view(np.float16).astype(np.float32)
        else:
            try:
                arr = dequantize(raw.reshape(t.shape[0], -1) if len(t.shape) > 1 else raw, t.qtype)
            except NotImplementedError:
                raise GemmaError(f"{self.path}: tensor {name} has type {t.qtype.name}, which gguf cannot dequantize;"
                                 " convert the file to Q8_0/Q4_K/F16 with llama.cpp") from None
        return np.asarray(arr, dtype=np.float32).reshape(t.shape)


class StringArray(Sequence[str]):
    """A GGUF string array (e.g. 262144 vocabulary pieces), decoded only when first read: a warm load whose
    tokenizer comes from the cache never pays for it."""

    def __init__(self, buf: memoryview, start: int, count: int) -> None:
        self._buf, self._start, self._count = buf, start, count
        self._items: list[str] | None = None

    def _decode(self) -> list[str]:
        if self._items is None:
            buf, pos, unpack, items = self._buf, self._start, struct.Struct("<Q").unpack_from, []
            for _ in range(self._count):
                n = unpack(buf, pos)[0]
                items.append(bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"))
                pos += 8 + n
            self._items = items
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):  # type: ignore[override]
        return self._decode()[i]

    def __iter__(self):
        return iter(self._decode())


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GemmaError(f"{self.path} is truncated inside its header ({len(self.buf)} bytes); "
                             "the download or copy was cut short: fetch the file again")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            self.take(f"<{n}s")  # raises the truncation error
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, count: int) -> StringArray:
        """Skip over a string array (one tight pass over the lengths); its items are decoded on first use."""
        start, pos, buf, unpack = self.pos, self.pos, self.buf, struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
        except struct.error:
            pos = len(buf) + 1
        if pos > len(buf):
            raise GemmaError(f"{self.path} is truncated inside its header ({len(buf)} bytes); "
                             "the download or copy was cut short: fetch the file again")
        self.pos = pos
        return StringArray(buf, start, count)

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, count = self.take("<I"), self.take("<Q")
            if itype == STRING:
                return self.strings(count)
            if itype in _NUMPY:
                dt = np.dtype(_NUMPY[itype])
                end = self.pos + dt.itemsize * count
                if end > len(self.buf):
                    self.take(f"<{end - self.pos}s")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos = end
                return arr
            return [self.value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise GemmaError(f"{self.path}: unknown GGUF metadata value type {vtype}; the file is corrupt")
        return self.take(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and tensor table; fail with one clear line on anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise GemmaError(f"{path}: no such file; pass the path of a .gguf model")
    if path.stat().st_size == 0:
        raise GemmaError(f"{path} is empty, not a GGUF file")
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: tensors may wrap it, the file never changes
    if len(data) < 4 or bytes(data[:4]) != MAGIC:
        raise GemmaError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    cur = _Cursor(memoryview(data), path)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GemmaError(f"{path} is GGUF version {version}; gemmakit reads versions 2 and 3")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        qtype_id, offset = cur.take("<I"), cur.take("<Q")
        try:
            qtype = GGMLQuantizationType(qtype_id)
        except ValueError:
            raise GemmaError(f"{path}: tensor {name} has unknown ggml type {qtype_id}; "
                             "upgrade the gguf package or re-convert the file") from None
        infos.append((name, dims, qtype, offset))
    align = int(metadata.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, qtype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = int(np.prod(dims)) if dims else 1
        t = GGUFTensor(name, tuple(int(d) for d in reversed(dims)), qtype, start + offset,
                       n_elems // block * type_size)
        if t.offset + t.n_bytes > len(data):
            raise GemmaError(f"{path} is truncated: tensor {name} ends at byte {t.offset + t.n_bytes} but the file "
                             f"has {len(data)} bytes; the download or copy was cut short: fetch the file again")
        tensors[name] = t
    return GGUFFile(path, version, metadata, tensors, data)


def config_from_gguf(g: GGUFFile) -> GemmaConfig:
    """GemmaConfig from GGUF metadata (spec §4.5), with llama.cpp's rules for what the file does not say."""
    arch = g.architecture
    if arch not in (*FAMILIES, EMBEDDING_ARCH):
        raise GemmaError(f"{g.path} holds a {arch!r} model; gemmakit runs Gemma text models "
                         f"(GGUF architectures {', '.join(FAMILIES)}, {EMBEDDING_ARCH})")
    if arch == "gemma4":
        return _gemma4_config(g)
    if arch == "gemma3n":
        return _gemma3n_config(g)
    encoder = arch == EMBEDDING_ARCH  # EmbeddingGemma: Gemma 3 layers attending both ways (LCPP gemma-embedding)
    family = "gemma3" if encoder else arch

    def need(key: str) -> Any:
        value = g.arch_get(key)
        if value is None:
            raise GemmaError(f"{g.path} lacks the metadata key {arch}.{key}; the file is incomplete: re-convert it")
        if isinstance(value, np.ndarray):
            raise GemmaError(f"{g.path}: per-layer {arch}.{key} is not supported (is this a Gemma 3n file?)")
        return value

    d, n_layers, n_heads = int(need("embedding_length")), int(need("block_count")), int(need("attention.head_count"))
    head_dim = int(g.arch_get("attention.key_length", d // n_heads))
    # The query scale is not stored; llama.cpp infers it from the layer count: the 27B models use D/N (spec §4.5).
    big = (family, n_layers) in (("gemma2", 46), ("gemma3", 62))
    scaling_type = g.arch_get("rope.scaling.type", "none")
    factor = float(g.arch_get("rope.scaling.factor", 1.0)) if scaling_type == "linear" else 1.0
    default_window = {"gemma2": 4096, "gemma3": 512}.get(family)
    window = int(g.arch_get("attention.sliding_window", default_window)) if arch != "gemma" else None
    return GemmaConfig(
        family=family, hidden_size=d, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=int(g.arch_get("attention.head_count_kv", n_heads)), head_dim=head_dim,
        max_position_embeddings=int(g.arch_get("context_length", 8192)),
        rope_theta=float(g.arch_get("rope.freq_base", 1e6 if family == "gemma3" else 1e4)),
        rope_local_base_freq=float(g.arch_get("rope.freq_base_swa", 1e4)), rope_scaling_factor=factor,
        query_pre_attn_scalar=float(d // n_heads if big else head_dim),
        attn_logit_softcapping=g.arch_get("attn_logit_softcapping") if arch == "gemma2" else None,
        final_logit_softcapping=g.arch_get("final_logit_softcapping"),
        # LCPP stores the config's W for gemma-embedding and masks |i - j| > W / 2 (LLAMA_SWA_TYPE_SYMMETRIC)
        sliding_window=window // 2 if encoder and window else window, use_bidirectional_attention=encoder,
        **_common_config_fields(g, arch),
    )


EMBEDDING_ARCH = "gemma-embedding"  # llama.cpp's EmbeddingGemma (gguf-py MODEL_ARCH.GEMMA_EMBEDDING)
EMBEDDING_DENSE = ("dense_2.weight", "dense_3.weight")  # its sentence-transformers 2_Dense and 3_Dense


def _gemma4_config(g: GGUFFile) -> GemmaConfig:
    """GemmaConfig from llama.cpp's gemma4 metadata (LCPP conversion/gemma.py Gemma4Model.set_gguf_parameters,
    src/models/gemma4.cpp load_arch_hparams). Facts the keys do not carry are read off the tensors, as llama.cpp
    does: attention_k_eq_v from full-attention layers without attn_v, the rotated share of proportional RoPE from
    rope_freqs (factor 1 rotates a pair, 1e30 freezes it)."""

    def get(key: str, default: Any = None) -> Any:
        value = g.arch_get(key, default)
        if value is None:
            raise GemmaError(f"{g.path} lacks the metadata key gemma4.{key}; the file is incomplete: re-convert it")
        return value

    def per_layer(key: str, default: Any = None) -> list[int]:
        value = get(key, default)
        return [int(v) for v in value] if isinstance(value, np.ndarray | list) else [int(value)] * n_layers

    n_layers, d = int(get("block_count")), int(get("embedding_length"))
    swa = g.arch_get("attention.sliding_window_pattern")
    types = tuple(SLIDING if s else GLOBAL for s in swa) if swa is not None else default_layer_types("gemma4", n_layers)
    shared = int(g.arch_get("attention.shared_kv_layers", 0))
    if g.architecture == "gemma4-assistant":
        shared = 0  # every layer reads the target's keys; a drafter's GemmaConfig states that as 0 (draft.py)
    first_shared = n_layers - shared
    ff, heads = per_layer("feed_forward_length"), int(get("attention.head_count"))
    kv = per_layer("attention.head_count_kv", heads)
    head_dim = int(get("attention.key_length_swa", g.arch_get("attention.key_length")))
    global_dim = int(get("attention.key_length", head_dim))
    first_global = types.index(GLOBAL)
    k_eq_v = any(types[i] == GLOBAL and f"blk.{i}.attn_v.weight" not in g.tensors for i in range(first_shared))
    double = shared > 0 and ff[-1] == 2 * ff[0]
    if any(f != ff[0] * (2 if double and i >= first_shared else 1) for i, f in enumerate(ff)):
        raise GemmaError(f"{g.path}: per-layer feed_forward_length {ff} is not Gemma 4's (F, or 2F on shared layers)")
    ple = int(g.arch_get("embedding_length_per_layer_input", 0))
    experts = int(g.arch_get("expert_count", 0))
    base = _common_config_fields(g, "gemma4")
    return GemmaConfig(
        family="gemma4", hidden_size=d, intermediate_size=ff[0], num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv[types.index(SLIDING)] if SLIDING in types else kv[0],
        head_dim=head_dim, global_head_dim=global_dim, layer_types=types,
        num_global_key_value_heads=kv[first_global] if k_eq_v else None, attention_k_eq_v=k_eq_v,
        max_position_embeddings=int(g.arch_get("context_length", 131072)),
        rope_theta=float(g.arch_get("rope.freq_base", 1e6)), rope_local_base_freq=float(g.arch_get("rope.freq_base_swa", 1e4)),
        partial_rotary_factor=_rotary_fraction(g, global_dim), sliding_window=int(get("attention.sliding_window")),
        final_logit_softcapping=g.arch_get("final_logit_softcapping"),
        hidden_size_per_layer_input=ple, num_kv_shared_layers=shared, use_double_wide_mlp=double,
        vocab_size_per_layer_input=g.tensors["per_layer_token_embd.weight"].shape[0] if ple else 0,
        enable_moe_block=experts > 0, num_experts=experts, top_k_experts=int(g.arch_get("expert_used_count", 0)),
        moe_intermediate_size=int(g.arch_get("expert_feed_forward_length", 0)), **base,
    )


def _gemma3n_config(g: GGUFFile) -> GemmaConfig:
    """GemmaConfig from llama.cpp's gemma3n metadata (convert_hf_to_gguf Gemma3NModel.set_gguf_parameters, src/models/
    gemma3n.cpp). The LAuReL rank is read off the tensors (llama.cpp fixes it at 64); the coefficient clip (training
    only) is not stored; llama.cpp always applies altup_correct_scale."""

    def get(key: str, default: Any = None) -> Any:
        value = g.arch_get(key, default)
        if value is None:
            raise GemmaError(f"{g.path} lacks the metadata key gemma3n.{key}; the file is incomplete: re-convert it")
        return value

    n, d = int(get("block_count")), int(get("embedding_length"))
    swa = g.arch_get("attention.sliding_window_pattern")
    types = tuple(SLIDING if s else GLOBAL for s in swa) if swa is not None else default_layer_types("gemma3n", n)
    ff = get("feed_forward_length")
    ff = [int(f) for f in ff] if isinstance(ff, np.ndarray | list) else [int(ff)] * n
    scales = g.arch_get("activation_sparsity_scale")  # Normal(0, 1).icdf(sparsity) per layer; -inf = dense
    if scales is None:  # older files: transformers' default, the first 10 of more than 10 layers at 0.95
        sparsity = [0.95 if n > 10 and i < 10 else 0.0 for i in range(n)]
    else:
        cdf = torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(np.asarray(scales, dtype=np.float64)))
        sparsity = [round(float(p), 6) for p in cdf]
    heads = int(get("attention.head_count"))
    return GemmaConfig(
        family="gemma3n", hidden_size=d, intermediate_size=ff[0], intermediate_sizes=tuple(ff), num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", d // heads)), layer_types=types,
        max_position_embeddings=int(g.arch_get("context_length", 32768)),
        rope_theta=float(g.arch_get("rope.freq_base", 1e6)), rope_local_base_freq=float(g.arch_get("rope.freq_base_swa", 1e4)),
        sliding_window=int(get("attention.sliding_window", 512)),
        final_logit_softcapping=float(g.arch_get("final_logit_softcapping", 30.0)),
        hidden_size_per_layer_input=int(get("embedding_length_per_layer_input")),
        vocab_size_per_layer_input=g.tensors["per_layer_token_embd.weight"].shape[0],
        num_kv_shared_layers=int(g.arch_get("attention.shared_kv_layers", 0)),
        altup_num_inputs=int(get("altup.num_inputs", 4)), altup_active_idx=int(get("altup.active_idx", 0)),
        altup_coef_clip=120.0, altup_correct_scale=True, laurel_rank=g.tensors["blk.0.laurel_l.weight"].shape[0],
        activation_sparsity_pattern=tuple(sparsity), **_common_config_fields(g, "gemma3n"),
    )


def _rotary_fraction(g: GGUFFile, global_dim: int) -> float:
    """partial_rotary_factor from the rope_freqs tensor LCPP writes: [1.0] * rotated pairs + [1e30] * the rest."""
    if ROPE_FREQS not in g.tensors:
        return 1.0  # llama.cpp rotates every pair of a full-attention head without it
    factors = g.dequantize(ROPE_FREQS)
    rotated = int((factors == 1.0).sum())
    if len(factors) != global_dim // 2 or not (factors[:rotated] == 1.0).all() or not (factors[rotated:] > 1e29).all():
        raise GemmaError(f"{g.path}: rope_freqs is not a proportional-RoPE mask (1.0 then 1e30); cannot run it")
    return 2 * rotated / global_dim


def _common_config_fields(g: GGUFFile, arch: str) -> dict[str, Any]:
    """Vocabulary size, tied head, special ids, eps and name: read the same way for every Gemma GGUF."""
    tokens = g.get("tokenizer.ggml.tokens")
    return dict(
        vocab_size=g.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in g.tensors else len(tokens or []),
        rms_norm_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=int(g.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(g.get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(g.get("tokenizer.ggml.padding_token_id", 0)),
        name=str(g.get("general.name", g.path.stem)),
    )


def hf_name(g: GGUFFile, name: str, family: str) -> str:
    """The HF name of a GGUF tensor; anything that is not part of a Gemma text decoder is refused."""
    hf = gguf_to_hf(name, family)
    if hf is None:
        raise GemmaError(f"{g.path}: unexpected tensor {name!r} for a {family} model; the file is not a "
                         "plain Gemma text decoder")
    return hf


def hf_tensor(g: GGUFFile, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor dequantized to `dtype` in HF convention: norm weights shifted back from 1 + w to w (spec §4.4;
    llama.cpp's converter stored 1 + w; the subtraction is exact in fp32 for |w| < 2^24).

    Matrices are dequantized ~16 MB of rows at a time into the result: gguf's numpy dequantizer makes several
    full-size float32 temporaries (the 270M's 262144 x 640 Q8_0 embedding: +2.1 GB peak RSS at once)."""
    if name.endswith("norm.weight") or len(g.tensors[name].shape) < 2:
        w = torch.from_numpy(g.dequantize(name).copy())
        shifted = name.endswith("norm.weight") and g.architecture not in ("gemma3n", "gemma4")  # those store w
        return (w - 1.0 if shifted else w).to(dtype)
    shape = g.tensors[name].shape
    out = torch.empty(shape, dtype=dtype)
    step = max(1, (16 << 20) // (4 * math.prod(shape[1:])))
    for i in range(0, shape[0], step):
        out[i : i + step] = torch.from_numpy(g.dequantize(name, slice(i, i + step)))
    return out


def state_dict_from_gguf(g: GGUFFile, family: str, on_tensor: Callable[[int, int], None] | None = None, *,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor dequantized under its HF name, cast to `dtype` one at a time: a bf16 load never holds the
    whole model in fp32 beside its bf16 copy (the 270M: peak RSS 2.39 GB before)."""
    out: dict[str, torch.Tensor] = {}
    first_shared = int(g.arch_get("block_count", 0)) - int(g.arch_get("attention.shared_kv_layers", 0))
    for i, name in enumerate(g.tensors):
        if on_tensor is not None:
            on_tensor(i, len(g.tensors))
        if family == "gemma4" and name == ROPE_FREQS:
            continue  # a RoPE mask, read into the config (partial_rotary_factor), not a weight
        if g.architecture == EMBEDDING_ARCH and name in EMBEDDING_DENSE:
            continue  # the pooling head's Dense layers (gemmakit/embed reads them)
        hf = hf_name(g, name, family)
        if family == "gemma3n" and unused_shared_kv(hf, first_shared):
            continue
        out.update(split_stacked(hf, hf_tensor(g, name, dtype)))
    return out


def tokenizer_from_gguf(g: GGUFFile) -> Tokenizer:
    """The SentencePiece tokenizer rebuilt from the file's vocabulary fields (spec §5.5).

    Rebuilding 262144 pieces takes ~0.6 s, so the result is cached as a tokenizer.model keyed by the file's
    path, size and modification time; a warm load reads it in ~0.2 s.
    """
    st = g.path.stat()
    key = hashlib.sha256(f"{TOKENIZER_CACHE}|{g.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    cached = cache_dir() / "tokenizers" / f"{g.path.stem}-{key.hexdigest()[:16]}.model"
    if cached.exists():
        return Tokenizer.from_file(cached)
    tok = Tokenizer.from_gguf_metadata(g.metadata, str(g.path))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        prune(cached.parent, "*.model", KEEP_TOKENIZERS)
        tok.save(cached)  # atomic
    except OSError:
        pass  # a read-only cache only costs speed
    return tok
