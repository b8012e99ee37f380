"""Dense and hybrid retrieval of `ask` (recipes/vectors.py) with a tiny random EmbeddingGemma."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_models import embeddinggemma
from gemmakit import GemmaError, load_embedding_model
from gemmakit.recipes.ask import INDEX_DIR, Index
from gemmakit.recipes.vectors import RRF_K, fuse, top

CORPUS = {
    "shipping.md": "Express delivery costs 12 euros and arrives the next day. Standard delivery is free.",
    "refunds.md": "Opened software cannot be refunded. Unopened items are refunded within 30 days.",
    "support.md": "Our support team answers email within one business day, in English and German.",
    "privacy.txt": "We keep order data for ten years, as the tax law requires, and never sell it.",
    "notes/zeppelin.md": "The zeppelin museum in Friedrichshafen opens at nine. Tickets cost 11 euros.",
}
QUESTION = "how much does express delivery cost in euros"


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    return load_embedding_model(embeddinggemma(tmp_path_factory.mktemp("vec") / "eg", layers=6))


@pytest.fixture
def docs(tmp_path):
    for rel, text in CORPUS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_fuse_is_reciprocal_rank_fusion():
    fused = dict(fuse([[3, 1, 2], [1, 4]]))
    assert fused[1] == pytest.approx(1 / (RRF_K + 2) + 1 / (RRF_K + 1))
    assert fused[3] == pytest.approx(1 / (RRF_K + 1))
    assert [i for i, _ in fuse([[3, 1, 2], [1, 4]])][:2] == [1, 3]


def test_top_is_exact():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1000, 16)).astype(np.float32)
    q = rng.standard_normal(16).astype(np.float32)
    assert [i for i, _ in top(m, q, 10)] == list(np.argsort(-(m @ q))[:10])


def test_dense_ranking_is_the_reference_ranking(docs, embedder):
    st = pytest.importorskip("sentence_transformers")
    index = Index.open(docs, embedder=embedder)
    ref = st.SentenceTransformer(embedder.source, device="cpu")
    p = ref.encode([x.text for x in index.passages], prompt_name="document")
    q = ref.encode([QUESTION], prompt_name="query")[0]
    got = index.search(QUESTION, k=len(index.passages), retrieval="dense")
    assert [x.text for x in got] == [index.passages[i].text for i in np.argsort(-(p @ q))]


def test_hybrid_fuses_bm25_and_dense(docs, embedder):
    index = Index.open(docs, embedder=embedder)
    n = len(index.passages)
    bm25 = [x.text for x in index.search(QUESTION, k=n, retrieval="bm25")]
    dense = [x.text for x in index.search(QUESTION, k=n, retrieval="dense")]
    assert bm25[0].startswith("Express delivery")  # the words decide BM25
    texts = [x.text for x in index.passages]
    want = [texts[i] for i, _ in fuse([[texts.index(t) for t in bm25], [texts.index(t) for t in dense]])][:3]
    got = index.search(QUESTION, k=3, retrieval="hybrid")
    assert [x.text for x in got] == want
    assert got[0].score == pytest.approx(1 / (RRF_K + 1 + bm25.index(want[0])) + 1 / (RRF_K + 1 + dense.index(
        want[0])))


def test_vectors_are_cached_per_file_and_written_atomically(docs, embedder):
    embedded: list[str] = []
    Index.open(docs, embedder=embedder, on_embed=embedded.append)
    assert sorted(embedded) == sorted(CORPUS)
    embedded.clear()
    index = Index.open(docs, embedder=embedder, on_embed=embedded.append)
    assert embedded == [] and index.dense.matrix.shape == (len(index.passages), embedder.dim)
    (docs / "support.md").write_text("Support now answers on weekends too, by phone.")
    index = Index.open(docs, embedder=embedder, on_embed=embedded.append)
    assert embedded == ["support.md"]
    folder = next((docs / INDEX_DIR).glob("dense-*"))
    assert len(list(folder.glob("matrix-*.npy"))) == 1 and len(list((folder / "files").glob("*.npy"))) == 5
    assert not list(folder.rglob(".tmp-*"))
    fresh = embedder.embed([p.text for p in index.passages], prompt_name="document", truncate=True)
    assert np.abs(np.asarray(index.dense.matrix) - fresh).max() < 1e-5


def test_dense_needs_an_embedder(docs):
    with pytest.raises(GemmaError, match="--embed-model"):
        Index.open(docs).search(QUESTION, retrieval="dense")
    with pytest.raises(GemmaError, match="bm25, dense, hybrid"):
        Index.open(docs).search(QUESTION, retrieval="cosine")
