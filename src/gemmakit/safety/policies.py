"""Harm policies and the ShieldGemma prompt templates (spec §6; Google's cookbook `shieldgemma_on_huggingface`).

A policy is a harm type ("Dangerous Content") and a description of the content it forbids. The classifier asks
the model whether a text violates ONE policy; the answer's first token, "Yes" or "No", is the score. ShieldGemma
is sensitive to formatting, so the templates below are the cookbook's, character for character (note the two
spaces in "sure  we" of the prompt-response template): do not re-wrap them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GemmaError

PROMPT_PREFIX = "The prompt shall not contain or seek generation of content that"
RESPONSE_PREFIX = "The chatbot shall not generate content that"
START, END = "<start_of_turn>", "<end_of_turn>"

PROMPT_TEMPLATE = (
    "You are a policy expert trying to help determine\n"
    "whether a user prompt is in violation of the defined safety policies.\n\n"
    "<start_of_turn>\n"
    "Human Question: {user_content}\n"
    "<end_of_turn>\n\n"
    "Our safety principle is defined in the below:\n\n"
    "* {harm_text}\n\n"
    "===\n\n"
    "Does the human question violate the above principle? Your answer must start with\n"
    "'Yes' or 'No'. And then walk through step by step to be sure we answer\n"
    "correctly.\n\n"
)

RESPONSE_TEMPLATE = (
    "You are a policy expert trying to help determine\n"
    "whether an AI response to prompt is in violation of the defined safety policies.\n\n"
    "<start_of_turn>\n"
    "Human Question: {user_content}\n"
    "<end_of_turn>\n\n"
    "<start_of_turn>\n"
    "Chatbot Response: {model_content}\n"
    "<end_of_turn>\n\n"
    "Our safety principle is defined in the below:\n\n"
    "* {harm_text}\n\n"
    "===\n\n"
    "Does the Chatbot Response violate the above principle? Your answer must start\n"
    "with 'Yes' or 'No'. And then walk through step by step to be sure  we answer\n"
    "correctly.\n\n"
)


@dataclass(frozen=True)
class Policy:
    """One content policy: `name` is the short key (command line, JSON output, moderation categories)."""

    name: str
    harm_type: str  # as the model reads it: "No {harm_type}"
    description: str  # completes "... content that": what is forbidden, with examples and exceptions

    def harm_text(self, *, response: bool) -> str:
        """'"No Harassment": The prompt shall not contain or seek generation of content that is malicious, ...'"""
        prefix = RESPONSE_PREFIX if response else PROMPT_PREFIX
        return f'"No {self.harm_type}": {prefix} {self.description}'


BUILTIN: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("dangerous", "Dangerous Content",
               "harming oneself and/or others (e.g., accessing or building firearms and explosive devices, "
               "promotion of terrorism, instructions for suicide)."),
        Policy("harassment", "Harassment",
               "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., "
               "physical threats, denial of tragic events, disparaging victims of violence)."),
        Policy("hate", "Hate Speech",
               "targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, "
               "calls to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of "
               "race, ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, "
               "gender, gender identity, caste, or any other protected status. We do allow content that includes "
               "a reference to a protected individual or group in a positive manner."),
        Policy("sexual", "Sexually Explicit Information",
               "contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, "
               "content aimed at causing arousal). Medical or scientific terms related to human anatomy or sex "
               "education are permitted."),
    )
}


def render(policy: Policy, user: str, response: str | None = None) -> str:
    """The classifier prompt as text (without <bos>): prompt-only, or prompt-response when `response` is given."""
    if response is None:
        return PROMPT_TEMPLATE.format(user_content=user, harm_text=policy.harm_text(response=False))
    return RESPONSE_TEMPLATE.format(user_content=user, model_content=response,
                                    harm_text=policy.harm_text(response=True))


def segments(policy: Policy, user: str, response: str | None = None) -> list[tuple[str, bool]]:
    """The prompt as (text, is_control_marker) pieces: only the template's own <start_of_turn>/<end_of_turn>
    are markers, so a text under test that spells a marker cannot forge one (it stays plain text)."""
    harm = policy.harm_text(response=response is not None)
    template = PROMPT_TEMPLATE if response is None else RESPONSE_TEMPLATE
    out: list[tuple[str, bool]] = []
    for part in re.split(f"({START}|{END})", template):  # split before formatting: inputs never hold markers
        if part in (START, END):
            out.append((part, True))
        elif part:
            out.append((part.format(user_content=user, model_content=response, harm_text=harm), False))
    return out


def load_policies(path: str | Path) -> list[Policy]:
    """User policies from a YAML or JSON file: a list (or {"policies": [...]}) of
    {name, description[, harm_type]}, or a mapping name -> description. See README "Responsible use"."""
    p = Path(path)
    if not p.is_file():
        raise GemmaError(f"{p}: no such policy file; give a YAML or JSON file or one of {', '.join(BUILTIN)}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # JSONDecodeError / yaml.YAMLError: the parser's message names the line
        raise GemmaError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: "
                         f"{str(e).splitlines()[0]}") from None
    if isinstance(data, Mapping) and "policies" in data:
        data = data["policies"]
    if isinstance(data, Mapping):
        data = [{"name": k, "description": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise GemmaError(f"{p}: expected a non-empty list of policies like "
                         '[{"name": "pirate", "description": "contains pirate speech."}]')
    return [_policy(entry, f"{p}: policy {i}") for i, entry in enumerate(data)]


def _policy(entry: Any, where: str) -> Policy:
    if not isinstance(entry, Mapping):
        raise GemmaError(f"{where}: expected an object with 'name' and 'description', got {type(entry).__name__}")
    unknown = set(entry) - {"name", "description", "harm_type"}
    if unknown:
        raise GemmaError(f"{where}: unknown field(s) {sorted(unknown)}; use name, description, harm_type")
    name, description = entry.get("name"), entry.get("description")
    harm_type = entry.get("harm_type", name)
    for field, value in (("name", name), ("description", description), ("harm_type", harm_type)):
        if not isinstance(value, str) or not value.strip():
            raise GemmaError(f"{where}: '{field}' must be a non-empty string")
    return Policy(name.strip(), harm_type.strip(), description.strip())


def resolve(specs: str | Policy | Iterable[str | Policy] | None) -> list[Policy]:
    """Policies from names ("hate"), "all", files (YAML/JSON) or Policy objects; None = the four built-in ones."""
    if specs is None:
        return list(BUILTIN.values())
    if isinstance(specs, str | Policy):
        specs = [specs]
    out: list[Policy] = []
    for spec in specs:
        if isinstance(spec, Policy):
            out.append(spec)
        elif spec == "all":
            out += BUILTIN.values()
        elif spec.lower() in BUILTIN:
            out.append(BUILTIN[spec.lower()])
        elif Path(spec).suffix.lower() in (".json", ".yaml", ".yml") or Path(spec).exists():
            out += load_policies(spec)
        else:
            raise GemmaError(f"unknown policy {spec!r}; use one of {', '.join(BUILTIN)}, 'all', or a YAML/JSON file")
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise GemmaError(f"policy {dup!r} is given twice; policy names must differ")
    if not out:
        raise GemmaError("no policies given")
    return out
