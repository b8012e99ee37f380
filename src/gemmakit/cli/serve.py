"""gemmakit serve: an OpenAI-compatible HTTP server (chat, completions, models) with continuous batching."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..embed import is_embedding_model, load_embedding_model
from ..errors import GemmaError
from ..loader import load
from .draft_opts import DraftOpt, DraftTokensOpt, load_draft

EMBEDDED_NAME = "gemma-3-270m"


def parse_models(specs: list[str] | None) -> list[tuple[str, str | None]]:
    """-m values -> (served name, source); NAME=PATH names a model, a bare PATH is named after its file."""
    if not specs:
        return [(EMBEDDED_NAME, None)]
    out: list[tuple[str, str | None]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name.removesuffix(".gguf"), spec
        if not name or not path:
            raise GemmaError(f"-m {spec!r}: expected NAME=PATH or PATH")
        if any(name == n for n, _ in out):
            raise GemmaError(f"two models are named {name!r}; name them apart with -m NAME=PATH")
        out.append((name, path))
    return out


def serve(
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="NAME=PATH or PATH of a GGUF file, "
            "HF folder or .ckpt; repeat to serve several (default: the "
            f"embedded model, as {EMBEDDED_NAME!r}). An embedding model (EmbeddingGemma) answers "
            "/v1/embeddings.",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="GEMMAKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together per model (KV cache rows).")] = 8,
    max_queue: Annotated[int, typer.Option(help="Sequences allowed to wait; beyond, requests get 429 (a request of "
                                           "more sequences than this, prompts x n, gets 400).")] = 64,
    ctx_size: Annotated[
        int, typer.Option(help="Context per sequence in tokens (capped at the model's).")
    ] = 4096,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="NAME=ADAPTER_DIR (or ADAPTER_DIR with one model): a LoRA adapter (PEFT format) for a model."),
    ] = None,
    thinking: Annotated[
        bool,
        typer.Option(help="Gemma 4: think before answering unless a request says otherwise "
                     "(chat_template_kwargs.enable_thinking or reasoning_effort); reasoning comes back as "
                     "reasoning_content."),
    ] = False,
    moderate: Annotated[
        str | None,
        typer.Option(help="Screen 'input' (requests: 400 content_filter), 'output' (replies: finish_reason "
                     "content_filter) or 'input,output' with the policy classifier."),
    ] = None,
    guard_model: Annotated[
        str | None,
        typer.Option(help="The classifier (a ShieldGemma checkpoint) for --moderate and /v1/moderations "
                     "(default with --moderate: the embedded base model, which is not trained for this)."),
    ] = None,
    guard_policy: Annotated[
        list[str] | None,
        typer.Option(help="dangerous, harassment, hate, sexual, all, or a YAML/JSON file (repeatable; default: "
                     "the four built-in policies)."),
    ] = None,
    guard_classifier: Annotated[
        bool, typer.Option(help="--guard-model is a policy classifier that its name does not tell (your own "
                           "ShieldGemma fine-tune).")
    ] = False,
    threshold: Annotated[float, typer.Option(help="A policy score at or above this flags the text.")] = 0.5,
    moderation_window: Annotated[
        int, typer.Option(help="Streamed replies are screened every N characters; text waits until screened.")
    ] = 64,
    watermark: Annotated[
        str | None, typer.Option(help="SynthID-Text keys file: watermark every generated text.")
    ] = None,
    max_tokens_default: Annotated[
        int, typer.Option(help="Tokens a reply may have when the request sets no max_tokens (0: up to the end of "
                          "the context).")
    ] = 2048,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Let web pages from this origin call the API, e.g. http://localhost:3000 (repeatable; "
                     "'*' for any; default: none)."),
    ] = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = 8,
) -> None:
    """Serve models over the OpenAI API: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, /health.

    Examples:  gemmakit serve
               gemmakit serve -m gemma2=gemma-2-2b-it.Q8_0.gguf -m small=gemma-3-1b-it --port 8080 --api-key s3cret
               gemmakit serve -m chat=gemma-3-1b-it -m embed=embeddinggemma-300m
               curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
                 -d '{"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
    """
    from ..serve import moderation
    from ..serve import serve as run_server
    from ..watermark.synthid import Watermark

    err = Console(stderr=True)
    if max_tokens_default < 0:
        raise GemmaError(f"--max-tokens-default must be >= 0 (0: up to the end of the context), got "
                         f"{max_tokens_default}")
    moderator = moderation.build(moderate, guard_model, guard_policy, threshold=threshold,
                                 window=moderation_window, device=device, classifier=guard_classifier)
    marks = Watermark(watermark) if watermark else None
    specs = parse_models(model)
    adapters: dict[str, str] = {}
    for a in adapter or []:
        name, sep, path = a.partition("=")
        if not sep:
            if len(specs) != 1:
                raise GemmaError("with several models, name the one an adapter is for: --adapter NAME=DIR")
            name, path = specs[0][0], a
        if name not in dict(specs):
            raise GemmaError(f"--adapter names model {name!r}, which is not served")
        adapters[name] = path
    models, embedders = {}, {}
    for name, path in specs:
        if path is not None and is_embedding_model(path):  # answers /v1/embeddings beside the chat models
            if name in adapters:
                raise GemmaError(f"--adapter names {name!r}, an embedding model; adapters apply to chat models")
            embedders[name] = load_embedding_model(path, device=device)
            err.print(f"[dim]loaded {name} (embeddings): {embedders[name].source}[/]", highlight=False)
            continue
        models[name] = load(path, device=device, progress=True, adapter=adapters.get(name))
        err.print(f"[dim]loaded {name}: {models[name].source}[/]", highlight=False)
    if draft is not None and len(models) != 1:
        raise GemmaError("--draft is one model's assistant drafter: serve that one model alone")
    drafts = {name: load_draft(draft) for name in models} if draft else None
    if moderator is not None:
        err.print(f"[dim]{moderator.describe()}[/]", highlight=False)
    if api_key is None and not _is_loopback(host):
        err.print(
            f"[bold yellow]warning:[/] serving on {host} without --api-key: anyone who can reach this "
            "machine can use it",
            highlight=False,
        )
    run_server(
        models,
        host=host,
        port=port,
        api_key=api_key,
        max_batch=max_batch,
        max_queue=max_queue,
        context=ctx_size,
        log_level=log_level,
        thinking=thinking,
        moderator=moderator,
        watermark=marks,
        max_tokens_default=max_tokens_default or None,
        cors_origins=cors_origin or (),
        embedders=embedders,
        drafts=drafts,
        draft_tokens=draft_tokens,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
