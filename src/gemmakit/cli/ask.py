"""gemmakit ask "QUESTION" --docs DIR: an answer from your own files, citing them."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ..loader import load
from .run import ModelOpt


def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    docs: Annotated[str, typer.Option("--docs", help="Folder of .md/.txt/.rst/.pdf files to search.")],
    model: ModelOpt = None,
    k: Annotated[int, typer.Option("--k", help="Passages to put in the prompt.")] = 4,
    show_sources: Annotated[bool, typer.Option("--show-sources", help="Print the retrieved passages first.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens of answer at most.")] = 200,
    chat: Annotated[bool, typer.Option(help="Prompt through the chat template (instruction-tuned models).")] = False,
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder (PEFT format) to apply.")] = None,
    embed_model: Annotated[str | None, typer.Option(help="An embedding model (EmbeddingGemma folder or GGUF): "
                                                    "passage vectors are indexed beside BM25.")] = None,
    retrieval: Annotated[str | None, typer.Option(help="bm25, dense or hybrid (reciprocal rank fusion of both); "
                                                  "default: hybrid with --embed-model, else bm25.")] = None,
) -> None:
    """Answer QUESTION from the documents in --docs: a BM25 index cached in DOCS/.gemmakit-index (refreshed when
    a file changes; with --embed-model also passage vectors), the best passages in the prompt with their file
    names, the answer streamed.

    Examples:  gemmakit ask "How do I resume training?" --docs docs/
               gemmakit ask "What is the refund policy?" --docs policies/ -m gemma-3-1b-it.gguf --chat --k 6
               gemmakit ask "Why is the sky blue?" --docs notes/ --embed-model embeddinggemma-300m --retrieval hybrid
    """
    from ..embed import load_embedding_model
    from ..errors import GemmaError
    from ..recipes.ask import RETRIEVALS, Index, retrieve
    from ..recipes.ask import ask as run_ask

    err = Console(stderr=True)
    if retrieval is not None and retrieval not in RETRIEVALS:
        raise GemmaError(f"--retrieval {retrieval!r}: choose one of {', '.join(RETRIEVALS)}")
    if retrieval in ("dense", "hybrid") and embed_model is None:
        raise GemmaError(f"--retrieval {retrieval} needs --embed-model PATH (an EmbeddingGemma folder or GGUF)")
    embedder = load_embedding_model(embed_model) if embed_model is not None and retrieval != "bm25" else None
    index = Index.open(docs, on_reindex=lambda rel: err.print(f"[dim]indexing {escape(rel)}[/]"),
                       on_skip=lambda rel, why: err.print(f"[yellow]skipped {escape(rel)}: {escape(why)}[/]"),
                       embedder=embedder, on_embed=lambda rel: err.print(f"[dim]embedding {escape(rel)}[/]"))
    m = load(model, adapter=adapter)
    shown = False

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if show_sources:
        out = Console()
        for p in retrieve(question, docs, k=k, retrieval=retrieval, embedder=embedder):
            out.print(f"[bold]{escape(f'[{p.file}]')}[/] [dim](score {p.score:.2f})[/]\n{escape(p.text)}\n")
        shown = True
    answer = run_ask(question, docs, model=m, k=k, max_new_tokens=max_new_tokens, chat=chat, on_text=on_text,
                     retrieval=retrieval, embedder=embedder)
    sys.stdout.write("\n")
    if not answer.sources:
        err.print("[yellow]no passage matched the question's words; the answer is the model's own[/]")
    elif not shown:
        files = dict.fromkeys(p.file for p in answer.sources)
        err.print("[dim]sources: " + " ".join(escape(f"[{f}]") for f in files) + "[/]")
    if index.skipped:
        err.print(f"[yellow]{len(index.skipped)} file(s) skipped because they could not be read (see above)[/]")
