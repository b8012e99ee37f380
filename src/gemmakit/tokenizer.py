"""Gemma's SentencePiece tokenizer, built from a tokenizer.model, a tokenizer.json or GGUF vocab fields.

Every source is turned into one SentencePiece BPE ``ModelProto`` (spec §5.5), so the same text gives the
same ids whichever file a model came from. Control tokens (``<bos>``, ``<start_of_turn>``, ...) are read
from text only with ``special=True`` (as llama.cpp's ``parse_special``), so user text cannot forge a turn.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sentencepiece as spm
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2 as pb

from .errors import GemmaError

if TYPE_CHECKING:
    pass

# ModelProto.SentencePiece.Type; GGUF tokenizer.ggml.token_type uses the same numbers (spec §5.4).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pieces that are control tokens whatever the file says: Gemma 1/2 tokenizer.model files keep the turn
# markers USER_DEFINED (always matched), and the G3 GGUF keeps <start_of_image> USER_DEFINED. Same list as
# llama.cpp's does_token_look_special plus the turn/image markers HF marks special (spec §5.2, §5.4), and Gemma 4's
# half-open markers (<|turn>, <turn|>, <|channel>, <|tool_call>, ...; <|think|> and <|"|> match <|...|>).
_SPECIAL_LOOKING = re.compile(
    r"<(?:pad|eos|bos|unk|mask|2mass|start_of_turn|end_of_turn|start_of_image|end_of_image"
    r"|image_soft_token|unused\d+)>|\[@BOS@\]|<\|.*\|>|<\|[a-z_]+>|<[a-z_]+\|>"
)
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# GGUF value type -> numpy dtype code (gguf-py constants.GGUFValueType); 8 is string, 9 array.
_GGUF_SCALAR = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "?", 10: "u8", 11: "i8"}
_GGUF_SCALAR[12] = "f8"
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class Tokenizer:
    """Text <-> Gemma token ids, identical to the reference SentencePiece / HF tokenizer."""

    def __init__(self, proto: pb.ModelProto) -> None:
        """Wrap a ModelProto (use the ``from_*`` constructors). Special-looking pieces become CONTROL."""
        control: list[int] = []
        self._byte_value: dict[int, int] = {}
        for i, p in enumerate(proto.pieces):
            if p.type == USER_DEFINED and _SPECIAL_LOOKING.fullmatch(p.piece):
                p.type = CONTROL
            if p.type == CONTROL:
                control.append(i)
            elif p.type == BYTE:
                self._byte_value[i] = int(p.piece[3:5], 16)
        # Kept serialized (5 MB for Gemma's vocabulary), not parsed: the parsed proto held another 16 MB of RSS.
        self._serialized = proto.SerializeToString()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._serialized)
        except RuntimeError as e:
            raise GemmaError(f"invalid SentencePiece model ({e}); re-export the tokenizer") from None
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        # <unk> counts as special (HF does too): encode(special=True) reads "<unk>", decode drops it.
        self.special_ids: frozenset[int] = frozenset(control) | {self.unk_id}
        self._special_text = {proto.pieces[i].piece: i for i in self.special_ids}
        self._special_lengths = sorted({len(t) for t in self._special_text}, reverse=True)
        starts = "".join(sorted({t[0] for t in self._special_text}))
        self._special_start = re.compile(f"[{re.escape(starts)}]")

    # ---- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(
        cls,
        tokens: list[str],
        scores: Sequence[float],
        types: Sequence[int],
        *,
        bos_id: int = 2,
        eos_id: int = 1,
        unk_id: int = 3,
        pad_id: int = 0,
    ) -> Tokenizer:
        """Rebuild the SentencePiece model from GGUF ``tokenizer.ggml.{tokens,scores,token_type}`` (spec §5.5)."""
        n = len(tokens)
        if len(scores) != n or len(types) != n:
            raise GemmaError(f"GGUF has {n} tokens, {len(scores)} scores, {len(types)} types; re-download it")
        scores = np.asarray(scores, dtype=np.float64).tolist()
        types = np.asarray(types).tolist()
        first_byte = next((i for i, t in enumerate(types) if t == BYTE), n)
        pieces: list[tuple[str, float, int]] = []
        for i, (tok, score, ty) in enumerate(zip(tokens, scores, types, strict=True)):
            if i == unk_id:
                pieces.append((tok, 0.0, UNKNOWN))
            elif i in (bos_id, eos_id, pad_id) or ty == CONTROL:
                pieces.append((tok, 0.0, CONTROL))
            elif ty == BYTE:
                pieces.append((tok, 0.0, BYTE))
            elif ty == NORMAL and i > first_byte:
                pieces.append((tok, score, NORMAL))
            elif ty in (UNKNOWN, UNUSED):
                pieces.append((tok, 0.0, UNUSED))
            else:  # USER_DEFINED, or an older GGUF's NORMAL piece before the byte block (spec §5.5 notes).
                # llama.cpp spells user-defined space runs with " "; SentencePiece uses U+2581 (spec §5.4).
                pieces.append((tok.replace(" ", "\u2581"), 0.0, USER_DEFINED))
        special = {"bos_id": bos_id, "eos_id": eos_id, "unk_id": unk_id, "pad_id": pad_id}
        return cls(_build_proto(pieces, **special, source="GGUF"))

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any], name: str = "GGUF") -> Tokenizer:
        """Build from a GGUF's ``tokenizer.ggml.*`` metadata (read by gemmakit.weights.gguf.read_gguf)."""
        model = fields.get("tokenizer.ggml.model")
        if model is None:
            raise GemmaError(f"{name}: no tokenizer.ggml.model field; load a tokenizer.model instead")
        if model not in ("llama", "gemma4"):
            raise GemmaError(f"{name}: tokenizer.ggml.model is {model!r}, not 'llama' or 'gemma4'; not a Gemma GGUF")
        missing = [k for k in ("tokens", "scores", "token_type") if f"tokenizer.ggml.{k}" not in fields]
        if missing:
            raise GemmaError(f"{name}: missing tokenizer.ggml.{', '.join(missing)}; re-convert with llama.cpp")
        keys = {"bos_id": ("bos", 2), "eos_id": ("eos", 1), "unk_id": ("unknown", 3), "pad_id": ("padding", 0)}
        ids = {k: int(fields.get(f"tokenizer.ggml.{f}_token_id", d)) for k, (f, d) in keys.items()}
        tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
        if model == "gemma4":
            # llama.cpp's Gemma 4 converter writes the vocabulary of tokenizer.json (gguf-py LlamaHfVocab) with
            # placeholder scores of -1000 and the BPE merges; as in from_hf_json, the merge rank of a piece is its
            # id order, so normal pieces get score -id (spec §5.5).
            scores = [-float(i) for i in range(len(tokens))]
        return cls.from_gguf_fields(list(tokens), scores, types, **ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a SentencePiece ``tokenizer.model`` (or a folder holding one), as Gemma HF repos ship."""
        path = _existing_file(path, "a SentencePiece tokenizer.model", default_name="tokenizer.model")
        with path.open("rb") as f:
            if f.read(4) == b"GGUF":
                raise GemmaError(f"{path}: not a SentencePiece model but a GGUF; use gemmakit.weights.gguf.tokenizer_from_gguf")
        proto = pb.ModelProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except DecodeError:
            proto.Clear()
        if len(proto.pieces) == 0:
            raise GemmaError(
                f"{path}: not a SentencePiece model; pass the tokenizer.model shipped with the weights"
            )
        try:
            return cls(proto)
        except GemmaError as e:
            raise GemmaError(f"{path}: {e}") from None

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Rebuild the SentencePiece model from an HF ``tokenizer.json`` (BPE), for repos without tokenizer.model.

        Normal pieces get score -id (merge rank = id order, spec §5.5); added tokens become CONTROL when
        special, USER_DEFINED otherwise.
        """
        path = _existing_file(path, "an HF tokenizer.json", default_name="tokenizer.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
            vocab: dict[str, int] = model["vocab"]
            added = {int(t["id"]): t for t in data.get("added_tokens", [])}
        except (ValueError, KeyError, TypeError) as e:
            raise GemmaError(
                f"{path}: not an HF tokenizer.json ({e!r}); pass a Gemma repo's tokenizer.json"
            ) from None
        if model.get("type") != "BPE" or not isinstance(vocab, dict):
            raise GemmaError(f"{path}: model type is {model.get('type')!r}, not BPE; not a Gemma tokenizer")
        n = max([*vocab.values(), *added]) + 1
        by_id = [""] * n
        for piece, i in vocab.items():
            by_id[i] = piece
        for i, t in added.items():
            by_id[i] = t["content"]
        if "" in by_id:
            raise GemmaError(
                f"{path}: token id {by_id.index('')} is missing from the vocabulary; file damaged"
            )
        # G1/G2 tokenizer.json renames byte piece <0x09> to "\t" (spec §5.2); put the byte back.
        tab = vocab.get("\t")
        if "<0x09>" not in vocab and tab is not None and vocab.get("<0x08>") == tab - 1:
            by_id[tab] = "<0x09>"
        names = {"bos_id": "<bos>", "eos_id": "<eos>", "pad_id": "<pad>", "unk_id": "<unk>"}
        if missing := [p for p in names.values() if p not in vocab]:
            raise GemmaError(f"{path}: no {missing[0]} token; this is not a Gemma tokenizer.json")
        ids = {key: vocab[p] for key, p in names.items()}
        first_byte = next((i for i, p in enumerate(by_id) if _BYTE_PIECE.fullmatch(p)), n)
        pieces: list[tuple[str, float, int]] = []
        for i, piece in enumerate(by_id):
            if i == ids["unk_id"]:
                pieces.append((piece, 0.0, UNKNOWN))
            elif i in added:
                kind = CONTROL if added[i].get("special") else USER_DEFINED
                pieces.append((piece.replace(" ", "\u2581"), 0.0, kind))
            elif _BYTE_PIECE.fullmatch(piece):
                pieces.append((piece, 0.0, BYTE))
            elif i < first_byte:
                # Whitespace runs before the byte block are user-defined in the original model; a
                # tokenizer.json saved from a GGUF-built HF tokenizer lists them as plain vocab (spec §5.2).
                pieces.append((piece, 0.0, USER_DEFINED))
            else:
                pieces.append((piece, -float(i), NORMAL))
        return cls(_build_proto(pieces, **ids, source=str(path)))

    # ---- encode / decode ----------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids for ``text``; ``special=True`` also reads control tokens such as ``<start_of_turn>``."""
        if not isinstance(text, str):
            raise GemmaError(f"encode() takes a str, got {type(text).__name__}; decode bytes to text first")
        if not text.isascii():
            check_text(text)
        ids = [self.bos_id] if bos else []
        if not special:
            ids += self._sp.encode(text)
            return ids
        for part in self._partition(text):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: Sequence[int], *, special: bool = False) -> str:
        """Text for ``ids``; control tokens are dropped, or rendered as their text with ``special=True``."""
        ids = self._checked(ids)
        if not special:
            return self._sp.decode([i for i in ids if i not in self.special_ids])
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.special_ids:
                out += [self._sp.decode(run), self.piece(i)]
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def piece(self, id: int) -> str:
        """The vocabulary entry of ``id`` as SentencePiece spells it (spaces as U+2581)."""
        return self._sp.id_to_piece(self._checked([id])[0])

    def token_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None when ``piece`` is not one."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    def is_byte(self, id: int) -> bool:
        """Whether ``id`` is a byte-fallback piece ``<0xXX>``."""
        return id in self._byte_value

    def model_proto(self) -> pb.ModelProto:
        """A fresh copy of the SentencePiece ModelProto (to edit or write elsewhere)."""
        proto = pb.ModelProto()
        proto.ParseFromString(self._serialized)
        return proto

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a ``tokenizer.model`` (serialized ModelProto) atomically: a temp file, then os.replace."""
        path = Path(path)
        if not path.parent.is_dir():
            raise GemmaError(f"{path}: folder {path.parent} does not exist; create it first")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._serialized)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special={len(self.special_ids)})"

    def _partition(self, text: str) -> list[str | int]:
        """Cut control-token strings out of ``text``, leftmost then longest (llama.cpp tokenizer_st_partition)."""
        parts: list[str | int] = []
        done = 0
        for m in self._special_start.finditer(text):
            at = m.start()
            if at < done:
                continue
            for n in self._special_lengths:
                found = self._special_text.get(text[at : at + n])
                if found is not None:
                    if at > done:
                        parts.append(text[done:at])
                    parts.append(found)
                    done = at + n
                    break
        if done < len(text):
            parts.append(text[done:])
        return parts

    def _checked(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise GemmaError(
                f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1}); wrong tokenizer?"
            )
        return ids


class StreamDecoder:
    """Incremental detokenizer for streaming: ``push(id)`` returns the newly completed text.

    Text is cut only where it is final: after any non-byte token, and inside a byte-fallback run where
    the UTF-8 decoder holds nothing back, so a partial character (U+FFFD) is never emitted. Each push
    decodes only the pending bytes plus one token (O(1)); the pieces concatenate to ``decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, *, special: bool = False) -> None:
        self._tok = tokenizer
        self._special = special
        self._pending: list[int] = []  # byte-fallback ids whose characters are not complete yet
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, id: int) -> str:
        """Feed one token id; return the text it completes (often "", never a partial character)."""
        tok = self._tok
        if id in tok._byte_value:
            self._pending.append(id)
            self._utf8.decode(bytes([tok._byte_value[id]]))
            held = len(self._utf8.getstate()[0])  # bytes of a still-incomplete character
            if held == len(self._pending):
                return ""
            cut = len(self._pending) - held
            ready, self._pending = self._pending[:cut], self._pending[cut:]
            return tok.decode(ready, special=self._special)
        if id in tok.special_ids and not self._special:
            tok._checked([id])
            return ""  # decode() drops these before joining bytes, so they must not cut a byte run here
        ids, self._pending = [*self._pending, id], []
        self._utf8.reset()
        return tok.decode(ids, special=self._special)

    def flush(self) -> str:
        """Text of whatever is still pending (an incomplete character decodes to U+FFFD, as in decode())."""
        ids, self._pending = self._pending, []
        self._utf8.reset()
        return self._tok.decode(ids, special=self._special)


# ---- helpers ----------------------------------------------------------------------------------------


def _build_proto(
    pieces: list[tuple[str, float, int]], *, bos_id: int, eos_id: int, unk_id: int, pad_id: int, source: str
) -> pb.ModelProto:
    """A Gemma ModelProto: BPE, byte fallback, identity normalizer, no dummy prefix (spec §5.1, §5.5)."""
    n = len(pieces)
    for key, i in (("bos", bos_id), ("eos", eos_id), ("unk", unk_id), ("pad", pad_id)):
        if not 0 <= i < n:
            raise GemmaError(f"{source}: {key} token id {i} is outside the vocabulary of {n}; file damaged")
    if len({text for text, _, _ in pieces}) < n:
        raise GemmaError(f"{source}: the vocabulary lists a piece twice; the tokenizer file is damaged")
    m = pb.ModelProto()
    for text, score, kind in pieces:
        p = m.pieces.add()
        p.piece, p.score, p.type = text, score, kind
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size, ts.byte_fallback = n, True
    ts.split_digits = ts.allow_whitespace_only_pieces = True  # training-time flags, kept for the record
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk_id, bos_id, eos_id, pad_id
    ts.unk_piece, ts.bos_piece = pieces[unk_id][0], pieces[bos_id][0]
    ts.eos_piece, ts.pad_piece = pieces[eos_id][0], pieces[pad_id][0]
    ns = m.normalizer_spec
    ns.name, ns.escape_whitespaces = "identity", True
    ns.add_dummy_prefix = ns.remove_extra_whitespaces = False
    return m


def _existing_file(path: str | os.PathLike[str], what: str, default_name: str | None = None) -> Path:
    path = Path(path)
    if path.is_dir() and default_name is not None:
        path = path / default_name
    if not path.is_file():
        raise GemmaError(f"{path}: no such file; pass the path of {what}")
    return path


def check_text(text: str, what: str = "the text") -> None:
    """GemmaError unless `text` encodes as UTF-8: a lone surrogate ("\\ud800", from a broken JSON escape or a
    cut UTF-16 pair) is no character, and the tokenizer fails on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GemmaError(f"{what} holds {text[e.start:e.end]!a} at index {e.start}, a lone UTF-16 surrogate "
                         "that is no character; send valid Unicode text") from None
