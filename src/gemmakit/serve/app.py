"""The OpenAI-compatible HTTP server: FastAPI routes over one continuous-batching Engine per served model.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET (and HEAD) /v1/models[/{id}] and /health. Every
error is OpenAI's JSON shape {"error": {"message", "type", "param", "code"}} with a 4xx status for bad requests;
internal failures are logged and answered with a generic 500, never a traceback. Browsers may call it from the
origins given as `cors_origins` (none by default; "*" for any), preflight OPTIONS requests included.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import Model
from ..embed import EmbeddingModel
from ..errors import GemmaError
from ..watermark.synthid import Watermark, with_watermark
from . import schemas, structured
from .embeddings import add_routes as add_embedding_routes
from .engine import Engine
from .jobs import completion_prompts, make_jobs, processors, token_budget
from .moderation import Moderator, user_text
from .moderation import add_routes as add_moderation_routes
from .output import (
    FINGERPRINT,
    ApiError,
    Meta,
    Run,
    chat_logprobs,
    completion_logprobs,
    sse_response,
    stream_chat,
    stream_completion,
    usage,
)

log = logging.getLogger("gemmakit.serve")
MAX_BODY = 16 * 2**20
MAX_TOKENS_DEFAULT = 2048  # a chat reply's budget when the request sets none (a base model may never end its turn)


class Server:
    """What every route needs: the engines by model name, the API key, the thinking default, the moderator and the
    watermark. One per app, at app.state.server."""

    def __init__(self, engines: dict[str, Engine], *, api_key: str | None, thinking: bool,
                 moderator: Moderator | None, watermark: Watermark | None, max_tokens_default: int | None,
                 embedders: dict[str, EmbeddingModel]) -> None:
        self.engines, self.embedders, self.api_key, self.thinking = engines, embedders, api_key, thinking
        self.moderator, self.watermark, self.max_tokens_default = moderator, watermark, max_tokens_default
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def engine_for(self, name: str) -> Engine:
        if name not in self.engines:
            raise ApiError(
                404,
                f"The model `{name}` does not exist. Served: {', '.join(self.engines)}.",
                param="model",
                code="model_not_found",
            )
        return self.engines[name]

    async def admit(self, request: Request, schema: type[schemas.Sampling]) -> tuple[Any, Engine]:
        """The first step of every generating route: authorize, parse the body, check it, pick the engine."""
        self.authorize(request)
        body = await parse(request, schema)
        body.check()
        return body, self.engine_for(body.model)

    def model_card(self, name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "gemmakit",
            "max_model_len": self.engines[name].context,
        }

    def embedding_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "gemmakit",
                "max_model_len": self.embedders[name].max_tokens}


def create_app(
    models: Mapping[str, Model],
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    context: int | None = None,
    thinking: bool = False,
    moderator: Moderator | None = None,
    watermark: Watermark | None = None,
    max_tokens_default: int | None = MAX_TOKENS_DEFAULT,
    cors_origins: Sequence[str] = (),
    embedders: Mapping[str, EmbeddingModel] | None = None,
    drafts: Mapping[str, Any] | None = None,
    draft_tokens: int = 8,
) -> FastAPI:
    """An app serving each model under its name; engines start and stop with the app's lifespan.

    `max_tokens_default` caps a chat reply whose request sets no max_tokens (None: up to the end of the context);
    `cors_origins` are the browser origins allowed to call the API ("*" for any).
    `embedders` are embedding models answering /v1/embeddings (embeddings.py) beside the chat models.

    `moderator` screens requests and replies and answers /v1/moderations (moderation.py); with `watermark` every
    generated sequence carries that SynthID-Text watermark.

    `thinking` is the default of Gemma 4's thinking mode for requests that do not choose (off, as in the template).
    `drafts` maps a model's name to its assistant drafter: its engine drafts up to `draft_tokens` for every row
    without penalties, a logit bias or processors, greedy or sampling (serve/drafting.py).
    """
    embedders = dict(embedders or {})
    if not models and not embedders:
        raise GemmaError("give at least one model to serve")
    engines = {
        name: Engine(m, max_batch=max_batch, max_queue=max_queue, context=context,
                     draft=(drafts or {}).get(name), draft_tokens=draft_tokens)
        for name, m in models.items()
    }
    if max_tokens_default is not None and max_tokens_default < 1:
        raise GemmaError(f"--max-tokens-default must be >= 1 (or 0 for the whole context), got {max_tokens_default}")
    app = FastAPI(title="gemmakit", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.engines = engines
    app.state.server = server = Server(engines, api_key=api_key, thinking=thinking, moderator=moderator,
                                       watermark=watermark, max_tokens_default=max_tokens_default,
                                       embedders=embedders)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"], max_age=600)
    for exc, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.include_router(router)
    add_moderation_routes(app, moderator, server.authorize, parse)
    add_embedding_routes(app, embedders, list(engines), server.authorize, parse)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    moderator = app.state.server.moderator
    if moderator is not None and not moderator.guard.classifier:
        log.warning("moderation: %s", moderator.guard.warning)
    for e in app.state.engines.values():
        e.start()
    try:
        yield
    finally:
        for e in app.state.engines.values():
            e.stop()


# ---- errors: every one in OpenAI's JSON shape ----------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _bad_input(request: Request, exc: GemmaError) -> JSONResponse:
    param = exc.param if isinstance(exc, schemas.ParamError) else None
    code = exc.code if isinstance(exc, schemas.ParamError) else None
    return ApiError(400, str(exc), param=param, code=code).response()


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {
        404: f"Unknown URL: {request.method} {request.url.path}",
        405: f"Method {request.method} is not allowed for {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return ApiError(
        exc.status_code,
        message,
        code="not_found" if exc.status_code == 404 else None,
        headers=getattr(exc, "headers", None),
    ).response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return ApiError(400, str(exc)).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    return ApiError(500, "internal server error", type="server_error").response()


_ERROR_HANDLERS: dict[Any, Any] = {
    ApiError: _api_error,
    GemmaError: _bad_input,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    Exception: _internal_error,
}


# ---- routes ----------------------------------------------------------------------------------------------------

router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.server


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    """200 while every model's engine runs; 503 otherwise (for load balancers and the load test)."""
    engines = _server(request).engines
    ok = all(e.alive for e in engines.values())
    models = {
        name: {"active": e.active, "waiting": e.queued, "context": e.context, "max_batch": e.max_batch}
        for name, e in engines.items()
    }
    return JSONResponse(
        {"status": "ok" if ok else "error", "models": models}, status_code=200 if ok else 503
    )


@router.api_route("/v1/models", methods=["GET", "HEAD"])
async def list_models(request: Request) -> dict:
    server = _server(request)
    server.authorize(request)
    cards = [server.model_card(name) for name in server.engines]
    return {"object": "list", "data": cards + [server.embedding_card(name) for name in server.embedders]}


@router.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
async def get_model(name: str, request: Request) -> dict:
    server = _server(request)
    server.authorize(request)
    if name in server.embedders:
        return server.embedding_card(name)
    server.engine_for(name)
    return server.model_card(name)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    server = _server(request)
    body, engine = await server.admit(request, schemas.ChatRequest)
    moderator = server.moderator
    plan = structured.plan_chat(body, engine.model.tokenizer, server.thinking)
    try:
        prompt = plan.encode(engine.model.tokenizer)
    except GemmaError as e:
        raise ApiError(400, str(e), param="messages") from None
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = token_budget(engine, len(prompt), body.requested_tokens(), param, "messages",
                           server.max_tokens_default)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    factory = await processors(engine, plan.constraint, "tools" if plan.mode != "none" else "response_format",
                               plan.tools.banned(engine.model.tokenizer))
    if moderator is not None:
        if moderator.outputs and plan.family == "gemma4" and plan.mode != "none":
            raise ApiError(400, "this server screens replies (--moderate output), which does not cover Gemma 4's "
                                "native tool calls yet; use tool_choice='none' or a server without output "
                                "moderation", param="tools")
        user = user_text(body.messages)
        await moderator.check_input([user], "messages")
    jobs = make_jobs(body, engine, [prompt], max_new, logprobs, with_watermark(factory, server.watermark),
                     reasoning=plan.family == "gemma4")
    run = Run(engine, jobs)
    if moderator is not None:
        run = moderator.screen(run, [user] * len(jobs), stream=body.stream)
    meta = Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model, len(prompt))
    if body.stream:
        return sse_response(stream_chat(run, body, meta, engine, plan))
    choices = await run.collect(request)
    replies = []
    for c in choices:
        read = structured.reader(plan, engine.model.tokenizer)
        reply, reason = structured.deltas(read, c.text, c.reasoning, c.ids, c.finish_reason, plan.mode)
        replies.append((structured.chat_message(reply), reason))
    return JSONResponse(
        {
            "id": meta.id,
            "object": "chat.completion",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": i,
                    "message": replies[i][0],
                    "logprobs": chat_logprobs(engine, c.tokens) if body.logprobs else None,
                    "finish_reason": replies[i][1],
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage(meta.prompt_tokens, choices),
        }
    )


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    server = _server(request)
    body, engine = await server.admit(request, schemas.CompletionRequest)
    moderator = server.moderator
    tok = engine.model.tokenizer
    prompts = completion_prompts(body, engine)
    max_new = min(token_budget(engine, len(p), body.max_tokens, "max_tokens", "prompt", server.max_tokens_default)
                  for p in prompts)
    factory = await processors(engine, structured.response_constraint(body), "response_format")
    if moderator is not None:
        users = [tok.decode(p) for p in prompts]
        await moderator.check_input(users, "prompt")
    jobs = make_jobs(body, engine, prompts, max_new, body.logprobs, with_watermark(factory, server.watermark))
    run = Run(engine, jobs)
    if moderator is not None:
        run = moderator.screen(run, [u for u in users for _ in range(body.n)], stream=body.stream)
    echo = [tok.decode(p) if body.echo else "" for p in prompts for _ in range(body.n)]
    meta = Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model, sum(len(p) for p in prompts))
    if body.stream:
        return sse_response(stream_completion(run, body, meta, engine, echo))
    choices = await run.collect(request)
    return JSONResponse(
        {
            "id": meta.id,
            "object": "text_completion",
            "created": meta.created,
            "model": meta.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": i,
                    "text": echo[i] + c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(engine, c.tokens, len(echo[i]))
                    if body.logprobs is not None
                    else None,
                }
                for i, c in enumerate(choices)
            ],
            "usage": usage(meta.prompt_tokens, choices),
        }
    )


async def parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY // 2**20} MiB")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested too deeply (at most {schemas.MAX_DEPTH} levels)") from None
    except ValueError as e:  # bad JSON or bytes, NaN/Infinity, an integer of thousands of digits
        raise ApiError(
            400,
            f"We could not parse the JSON body of your request ({e}). The API expects a JSON "
            'object, e.g. {"model": ..., "messages": [...]}.',
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        schemas.check_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in _TYPE_NAMES))]
        param = ".".join(loc) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: '{param}'.", param=param) from None
        raise ApiError(400, f"Invalid value for '{param}': {err['msg']}.", param=param) from None
    except schemas.ParamError as e:
        raise ApiError(400, str(e), param=e.param, code=e.code) from None


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; send finite numbers")


def serve(models: Mapping[str, Model], *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          **options: Any) -> None:
    """Run the server until interrupted; `options` are create_app()'s (api_key, max_batch, moderator, ...)."""
    app = create_app(models, **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
