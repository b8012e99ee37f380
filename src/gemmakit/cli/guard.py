"""gemmakit guard "TEXT": score a prompt (or a response to it) against content policies (ShieldGemma method)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..loader import load
from ..safety.guard import DEFAULT_THRESHOLD, Guard
from ..safety.policies import resolve


def guard(
    text: Annotated[str, typer.Argument(help="The user prompt to score ('-' reads it from stdin).")],
    response: Annotated[str | None, typer.Option(help="Score this chatbot response to TEXT instead.")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", "-p", help="dangerous, harassment, hate, sexual, all, or a YAML/JSON file of your own "
                               "(repeatable; default: the four built-in policies).")] = None,
    threshold: Annotated[float, typer.Option(help="A score at or above this flags the text.")] = DEFAULT_THRESHOLD,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The classifier: a ShieldGemma checkpoint "
                                              "(GGUF, HF folder); default: the embedded base model, which is "
                                              "not trained for this.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
    classifier: Annotated[bool, typer.Option("--classifier", help="-m is a policy classifier that its name does not "
                                             "tell (your own ShieldGemma fine-tune).")] = False,
) -> None:
    """Print P(violation) per policy and a verdict: the softmax of the model's "Yes"/"No" logits.

    A model not known to be a ShieldGemma checkpoint (by its GGUF/HF name or file name) gets a warning; without -m
    (the embedded base model) only the scores are shown, without a verdict.

    Examples:  gemmakit guard "How do I pick a lock?" -m shieldgemma-2b.Q8_0.gguf
               gemmakit guard "Tell me a joke" --response "..." --policy harassment --threshold 0.3
               gemmakit guard - --policy my_policies.yaml --json < message.txt
    """
    if text == "-":
        text = sys.stdin.read()
    chosen = resolve(policy)  # before loading the model: a wrong name fails at once
    scorer = Guard(load(model, progress=False), chosen, threshold=threshold, classifier=classifier or None)
    result = scorer(text, response)
    verdicts = model is not None or scorer.classifier  # the embedded base model's scores get no verdict
    err = Console(stderr=True, highlight=False)
    if not scorer.classifier:
        err.print(f"[bold yellow]warning:[/] {escape(scorer.warning or '')}")
    if as_json:
        out = result.to_dict()
        if not verdicts:
            out.update(flagged=None, violations=None)
        print(json.dumps(out))
        return
    table = Table("policy", "harm type", "score", *(["verdict"] if verdicts else []), box=None)
    for name, score in result.scores.items():
        verdict = ["[bold red]violates[/]" if score >= threshold else "[green]ok[/]"] if verdicts else []
        table.add_row(name, result.harm_types[name], f"{score:.4f}", *verdict)
    console = Console()
    console.print(table)
    if not verdicts:
        err.print("no verdict: the embedded Gemma 3 270M is a base model, not a trained classifier; pass -m with a "
                  "ShieldGemma checkpoint, e.g. -m shieldgemma-2b.Q8_0.gguf")
        return
    verdict = f"flagged: {', '.join(result.violations)}" if result.flagged else "not flagged"
    console.print(f"{verdict} (threshold {threshold})", highlight=False)
