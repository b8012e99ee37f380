"""Embedding models against sentence-transformers / transformers on tiny random EmbeddingGemma (1 and 2) folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gemmakit
from embedding_models import MAX_SEQ, embeddinggemma, embeddinggemma2
from gemmakit import GemmaError, load_embedding_model

st = pytest.importorskip("sentence_transformers")

LONG = " ".join(f"sentence {i} talks about topic {i % 7} in some detail" for i in range(5))  # ~50 tokens
TEXTS = ["hello world", "", "Grüße aus Köln: 東京タワー 🚀 ñandú", LONG, "a"]
QUERY = "which topic is discussed in detail"
DOCS = ["topic 3 in some detail", "the weather is fine", "Köln und München", "sentence 4 about topic 4", "x y z"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    return {"eg": embeddinggemma(root / "eg", layers=6), "eg2": embeddinggemma2(root / "eg2"),
            "eg2-text": embeddinggemma2(root / "eg2-text", text_only=True)}


@pytest.fixture(scope="module")
def ours(folders):
    return {k: load_embedding_model(p) for k, p in folders.items()}


@pytest.fixture(scope="module")
def refs(folders):
    return {k: st.SentenceTransformer(str(folders[k]), device="cpu") for k in ("eg", "eg2-text")}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_texts_fit_and_cross_windows(ours):
    n = len(ours["eg"].tokenize(LONG))
    assert 4 * 2 < n <= MAX_SEQ  # several sliding windows (radius 4 / 3) inside the limit


@pytest.mark.parametrize("kind", ["eg", "eg2-text"])
@pytest.mark.parametrize("prompt", [None, "query", "document"])
def test_matches_sentence_transformers(refs, ours, kind, prompt):
    ref = refs[kind].encode(TEXTS, prompt_name=prompt, convert_to_numpy=True)
    got = ours[kind].embed(TEXTS, prompt_name=prompt)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cos(got, ref).min() >= 0.9999


def test_tokens_wrapped_like_reference(folders, ours):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(folders["eg"]))
    for text in TEXTS:
        assert ours["eg"].tokenize(text) == hf(text)["input_ids"]
        assert ours["eg"].tokenize(text, prompt_name="query") == hf("task: search result | query: " + text)[
            "input_ids"]


def test_embedding_gemma2_multimodal_folder_matches_transformers(folders, ours):
    """The text part of an embedding_gemma2 checkpoint: HF last_hidden_state (already projected) -> mean -> L2."""
    from transformers.models.embedding_gemma2 import EmbeddingGemma2Model

    hf = EmbeddingGemma2Model.from_pretrained(str(folders["eg2"])).eval()
    m = ours["eg2"]
    for text in TEXTS:
        ids = torch.tensor([m.tokenize(text)])
        with torch.no_grad():
            h = hf(input_ids=ids).last_hidden_state[0].mean(0)
        ref = torch.nn.functional.normalize(h, dim=0).numpy()[None]
        assert _cos(m.embed(text), ref)[0] >= 0.9999


def test_matryoshka_truncation(refs, ours):
    """dimensions=16 of 32 here (EmbeddingGemma: 256 of 768): the reference's truncate_dim, re-normalised."""
    ref = refs["eg"].encode(TEXTS, truncate_dim=16, normalize_embeddings=True, convert_to_numpy=True)
    got = ours["eg"].embed(TEXTS, dimensions=16)
    assert got.shape == (len(TEXTS), 16)
    assert _cos(got, ref).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_retrieval_ranking_is_the_reference(refs, ours):
    ref_model = refs["eg"]
    ref = ref_model.encode(DOCS, prompt_name="document") @ ref_model.encode([QUERY], prompt_name="query")[0]
    got = ours["eg"].embed(DOCS, prompt_name="document") @ ours["eg"].embed(QUERY, prompt_name="query")[0]
    assert list(np.argsort(-got)) == list(np.argsort(-ref))


def test_batching_does_not_change_results(ours):
    m = ours["eg2-text"]
    together = m.embed(TEXTS, batch_size=3)
    alone = np.concatenate([m.embed(t) for t in TEXTS])
    assert np.abs(together - alone).max() < 1e-5


def test_over_long_text_is_refused_unless_truncated(refs, ours):
    text = LONG * 3
    with pytest.raises(GemmaError, match="truncate=True"):
        ours["eg"].embed([text])
    got = ours["eg"].embed([text], truncate=True)
    ref = refs["eg"].encode([text], convert_to_numpy=True)  # truncates at max_seq_length
    assert _cos(got, ref)[0] >= 0.9999


def test_bad_arguments_name_the_fix(ours):
    with pytest.raises(GemmaError, match="query"):
        ours["eg"].embed("x", prompt_name="nope")
    for bad in (0, 33, 2.5, True):
        with pytest.raises(GemmaError, match="dimensions"):
            ours["eg"].embed("x", dimensions=bad)
    with pytest.raises(GemmaError, match="strings"):
        ours["eg"].embed([b"bytes"])


def test_generator_load_refuses_an_encoder(folders):
    with pytest.raises(GemmaError, match="embedding model"):
        gemmakit.load(folders["eg"])


def test_gguf_gemma_embedding(folders, refs, tmp_path):
    """A llama.cpp-layout gemma-embedding GGUF (written as its converter does) embeds like the folder it came from."""
    from embedding_models import write_gemma_embedding_gguf

    path = write_gemma_embedding_gguf(folders["eg"], tmp_path / "eg.gguf")
    m = load_embedding_model(path)
    assert m.config.use_bidirectional_attention and m.config.sliding_window == 4
    ref = refs["eg"].encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    got = m.embed([PROMPT_QUERY + t for t in TEXTS])
    assert _cos(got, ref).min() >= 0.9999


PROMPT_QUERY = "task: search result | query: "


def test_embed_cli_writes_json_lines(folders, ours, tmp_path):
    import json

    from typer.testing import CliRunner

    from gemmakit.cli import app

    src = tmp_path / "in.txt"
    src.write_text("hello world\nGrüße aus Köln\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["embed", "-m", str(folders["eg"]), "--prompt", "query", "--dimensions", "16",
                                      str(src)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    want = ours["eg"].embed(["hello world", "Grüße aus Köln"], prompt_name="query", dimensions=16)
    assert np.abs(np.array([r["embedding"] for r in rows]) - want).max() < 1e-6


def test_llama_cpp_reads_our_gguf_the_same(folders, ours, tmp_path):
    """llama.cpp's own embedding mode on the GGUF gemmakit writes: same tokens (<bos> ... <eos>), same vectors."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gemmakit.embed.export import write_gemma_embedding_gguf

    path = write_gemma_embedding_gguf(folders["eg"], tmp_path / "eg.gguf")
    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=256, verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    texts = [t for t in TEXTS if t]  # llama.cpp refuses an empty input
    assert llm.tokenize(texts[0].encode()) == ours["eg"].tokenize(texts[0])
    got = np.array(llm.embed(texts, normalize=True), dtype=np.float32)
    assert _cos(got, ours["eg"].embed(texts)).min() >= 0.9999
