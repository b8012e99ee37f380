"""Helpers for the fine-tuning, LoRA and conversion tests: a tiny tokenizer and a tiny saved model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from gemmakit.tokenizer import Tokenizer
from helpers import hf_model, tiny_config

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def tiny_tokenizer(vocab: int = 512, *, gemma4: bool = False) -> Tokenizer:
    """A SentencePiece BPE vocabulary of `vocab` pieces with Gemma's special ids and turn markers (Gemma 4's
    <|turn>/<turn|> in slots 5/6 with gemma4=True)."""
    turn = ("<|turn>", "<turn|>") if gemma4 else ("<start_of_turn>", "<end_of_turn>")
    pieces = [
        ("<pad>", CONTROL),
        ("<eos>", CONTROL),
        ("<bos>", CONTROL),
        ("<unk>", UNKNOWN),
        ("<mask>", CONTROL),
        (turn[0], CONTROL),
        (turn[1], CONTROL),
        ("\n", USER_DEFINED),
    ]
    pieces += [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    chars = "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:"
    normal = list(
        dict.fromkeys(
            [
                *chars,
                *("".join(p) for p in itertools.product("\u2581etaoinsrh", "etaoinsrhl")),
                *("".join(p) for p in itertools.product("\u2581tshbcdm", "eaoiu", "nrstl")),
            ]
        )
    )
    pieces += [(p, NORMAL) for p in normal[: vocab - len(pieces)]]
    tokens = [p for p, _ in pieces]
    types = [t for _, t in pieces]
    scores = [-float(i) if t == NORMAL else 0.0 for i, (_, t) in enumerate(pieces)]
    return Tokenizer.from_gguf_fields(tokens, scores, types)


def tiny_model_folder(folder: Path, family: str = "gemma3", seed: int = 0, **overrides) -> Path:
    """A random tiny transformers model saved as an HF folder, with the tiny tokenizer beside it."""
    cfg = tiny_config(family, **overrides)
    ref = hf_model(cfg, seed=seed)
    ref.save_pretrained(folder)
    tiny_tokenizer(cfg.vocab_size).save(folder / "tokenizer.model")
    return folder


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


CHAT = [
    {
        "messages": [
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello, friend!"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "be short"},
            {"role": "user", "content": "what is it?"},
            {"role": "assistant", "content": "a tiny test"},
            {"role": "user", "content": "and then?"},
            {"role": "assistant", "content": "nothing else"},
        ]
    },
    {"prompt": "the sea is ", "completion": "blue and deep"},
    {"text": "one two three four five six seven"},
]


def records(n: int) -> list[dict]:
    return [CHAT[i % len(CHAT)] for i in range(n)]


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
