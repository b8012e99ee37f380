"""POST /v1/embeddings (OpenAI's Embeddings API) over the embedding models a server holds beside its chat models.

`input` is a string, a list of strings, a list of token ids or a list of such lists (ids are used as given, as vLLM
does; texts are wrapped in the model's special tokens like the reference). `encoding_format` "base64" (the openai
client's default) is the float32 little-endian bytes of each vector. Bad requests are 400/404 JSON errors.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from pydantic import Field

from ..embed import EmbeddingModel
from ..errors import GemmaError
from .output import ApiError
from .schemas import Strict

MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


class EmbeddingRequest(Strict):
    model: str
    input: Any  # checked by `_rows`, which names what is wrong
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # accepted and ignored, as by OpenAI for a local server


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _rows(model: EmbeddingModel, value: Any) -> list[list[int]]:
    """The token ids of every input, wrapped as the reference wraps texts; ApiError naming the first bad one."""
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "input must be a non-empty string, a non-empty list of strings, or token ids (a list "
                            "of integers, or a list of such lists)", param="input")
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"input has {len(value)} items; at most {MAX_INPUTS} per request", param="input")
    rows = []
    for i, item in enumerate(value):
        where = f"input[{i}]" if len(value) > 1 else "input"
        try:
            if isinstance(item, str):
                if not item:
                    raise ApiError(400, f"{where} is an empty string; give some text", param="input")
                rows.append(model.tokenize(item))
            elif _is_ids(item):
                rows.append(_checked_ids(model, item))
            else:
                raise ApiError(400, f"{where} is {type(item).__name__}: each input must be a non-empty string or a "
                                    "non-empty list of token ids", param="input")
        except GemmaError as e:
            raise ApiError(400, f"{where}: {e}", param="input", code="context_length_exceeded"
                           if "tokens, over" in str(e) else None) from None
    return rows


def _checked_ids(model: EmbeddingModel, ids: Sequence[int]) -> list[int]:
    vocab = model.config.vocab_size
    if bad := [i for i in ids if not 0 <= i < vocab]:
        raise GemmaError(f"token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})")
    if len(ids) > model.max_tokens:
        raise GemmaError(f"{len(ids)} tokens, over this model's {model.max_tokens}")
    return list(ids)


def _encode(vector: Any, fmt: str) -> list[float] | str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode() if fmt == "base64" else vector.tolist()


def add_routes(app: FastAPI, embedders: Mapping[str, EmbeddingModel], chat_models: Sequence[str], authorize: Any,
               parse: Any) -> None:
    """POST /v1/embeddings, routed by the request's `model` to one of `embedders`."""
    lock = threading.Lock()  # one forward at a time: each already uses every core

    def model_for(name: str) -> EmbeddingModel:
        if name in embedders:
            return embedders[name]
        if name in chat_models:
            raise ApiError(400, f"`{name}` is a chat model; /v1/embeddings needs an embedding model. Served "
                                f"embedding models: {', '.join(embedders) or 'none (serve one with -m PATH)'}.",
                           param="model", code="model_not_supported")
        raise ApiError(404, f"The model `{name}` does not exist. Served embedding models: "
                            f"{', '.join(embedders) or 'none'}.", param="model", code="model_not_found")

    def run(model: EmbeddingModel, rows: list[list[int]], dimensions: int | None) -> Any:
        with lock:
            return model.embed_ids(rows, dimensions=dimensions, progress=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        authorize(request)
        body = await parse(request, EmbeddingRequest)
        model = model_for(body.model)
        try:
            model.check_dimensions(body.dimensions)
        except GemmaError as e:
            raise ApiError(400, str(e), param="dimensions") from None
        rows = _rows(model, body.input)
        vectors = await asyncio.to_thread(run, model, rows, body.dimensions)
        tokens = sum(len(r) for r in rows)
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
