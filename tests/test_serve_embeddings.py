"""POST /v1/embeddings, live, with the official openai client: a tiny EmbeddingGemma served beside a chat model."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from embedding_models import embeddinggemma
from gemmakit import load_embedding_model
from test_serve import running_server, tiny_model

TEXTS = ["hello world", "Grüße aus Köln: 東京タワー 🚀", "a somewhat longer text " * 5]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = embeddinggemma(tmp_path_factory.mktemp("serve-embed") / "eg", layers=6)
    eg = load_embedding_model(folder)
    chat = tiny_model(eg.tokenizer)
    with running_server({"chat": chat}, embedders={"eg": eg}, context=128) as (url, _):
        yield url, eg, folder


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_matches_sentence_transformers(served, client):
    st = pytest.importorskip("sentence_transformers")
    _, eg, folder = served
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    resp = client.embeddings.create(model="eg", input=TEXTS)  # the client asks for base64 by default
    got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert ((got * ref).sum(1) >= 0.9999).all()
    assert resp.usage.prompt_tokens == sum(len(eg.tokenize(t)) for t in TEXTS)
    assert resp.model == "eg"


def test_float_format_dimensions_and_token_ids(served, client):
    _, eg, _ = served
    resp = client.embeddings.create(model="eg", input="hello world", encoding_format="float", dimensions=16)
    v = np.array(resp.data[0].embedding, dtype=np.float32)
    assert v.shape == (16,) and abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.abs(v - eg.embed("hello world", dimensions=16)[0]).max() < 1e-5
    ids = eg.tokenize("hello world")
    by_ids = client.embeddings.create(model="eg", input=[ids, ids], encoding_format="float")
    assert len(by_ids.data) == 2 and by_ids.usage.prompt_tokens == 2 * len(ids)
    assert np.abs(np.array(by_ids.data[1].embedding) - eg.embed("hello world")[0]).max() < 1e-5


def test_base64_is_float32_little_endian(served):
    r = httpx.post(served[0] + "/v1/embeddings", json={"model": "eg", "input": "x", "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert np.allclose(np.frombuffer(raw, dtype="<f4"), served[1].embed("x")[0], atol=1e-6)


def test_chat_and_embedding_models_side_by_side(client):
    names = {m.id for m in client.models.list().data}
    assert names == {"chat", "eg"}
    reply = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.choices[0].message.content is not None
    assert client.embeddings.create(model="eg", input="Hi").data[0].embedding


BAD = [
    ({"model": "eg", "input": ""}, 400, "empty"),
    ({"model": "eg", "input": []}, 400, "non-empty"),
    ({"model": "eg", "input": ["ok", ""]}, 400, "input[1]"),
    ({"model": "eg", "input": 42}, 400, "input"),
    ({"model": "eg", "input": [1.5, 2.0]}, 400, "input"),
    ({"model": "eg", "input": [["a"]]}, 400, "input"),
    ({"model": "eg", "input": ["a", 3]}, 400, "input[1]"),
    ({"model": "eg", "input": "word " * 200}, 400, "tokens"),
    ({"model": "eg", "input": [[999999]]}, 400, "vocabulary"),
    ({"model": "eg", "input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"model": "eg", "input": "x", "dimensions": 33}, 400, "dimensions"),
    ({"model": "eg", "input": "x", "dimensions": "16"}, 400, "dimensions"),
    ({"model": "eg", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "nope", "input": "x"}, 404, "does not exist"),
    ({"model": "chat", "input": "x"}, 400, "chat model"),
    ({"input": "x"}, 400, "model"),
    ({"model": "eg"}, 400, "input"),
    ({"model": "eg", "input": "x", "colour": 1}, 400, "colour"),
]


@pytest.mark.parametrize(("body", "status", "says"), BAD)
def test_bad_requests_get_4xx_json(served, body, status, says):
    r = httpx.post(served[0] + "/v1/embeddings", json=body)
    assert r.status_code == status
    assert says in r.json()["error"]["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="eg", input="")
