"""gemmakit embed: one embedding per input line, written as JSON lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..embed import load_embedding_model
from ..errors import GemmaError


def embed(
    source: Annotated[str, typer.Argument(metavar="FILE|-", help="text file, one text per line; - reads stdin")],
    model: Annotated[str, typer.Option("--model", "-m", help="EmbeddingGemma folder or gemma-embedding GGUF")],
    prompt: Annotated[str | None, typer.Option(help="the model's task prompt to prepend, e.g. query or "
                                                    "document")] = None,
    dimensions: Annotated[int | None, typer.Option(help="Matryoshka width, e.g. 256 (re-normalised)")] = None,
    truncate: Annotated[bool, typer.Option(help="cut texts over the model's limit instead of failing")] = False,
    batch_size: Annotated[int, typer.Option(help="texts per forward pass (similar lengths are grouped)")] = 32,
    dtype: Annotated[str, typer.Option(help="float32 (the reference's numbers) or bfloat16 (faster on CPUs with "
                                            "AMX / AVX512-BF16, cosine ~0.999 to float32)")] = "auto",
) -> None:
    """Embed each line of FILE and print {"index": i, "embedding": [...]} per line (L2-normalised float32).

    Examples:
      gemmakit embed -m embeddinggemma-300m --prompt query questions.txt > questions.jsonl
      echo "Which planet is red?" | gemmakit embed -m embeddinggemma-300m --dimensions 256 -
    """
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise GemmaError(f"{path} is not a file; pass a text file with one text per line, or - for stdin")
        text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if not lines:
        raise GemmaError("no input lines to embed; give a file with one text per line")
    m = load_embedding_model(model, dtype=dtype)
    vectors = m.embed(lines, prompt_name=prompt, dimensions=dimensions, truncate=truncate, batch_size=batch_size)
    out = sys.stdout
    for i, v in enumerate(vectors):
        out.write(json.dumps({"index": i, "embedding": v.tolist()}) + "\n")
    out.flush()
