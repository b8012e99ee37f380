"""A policy classifier by ShieldGemma's method (spec §6): P(violation) = softmax over the "Yes"/"No" logits.

The model reads a prompt that states one policy and asks whether the text violates it; the probability mass it
puts on "Yes" versus "No" as the first answer token, renormalised over those two, is the score. Any Gemma
checkpoint can be asked; a ShieldGemma checkpoint (google/shieldgemma-2b/9b/27b) is trained to answer it, and a
plain model's scores mean little, so a Guard says whether its model is known to be a classifier (`classifier`,
`warning`, and the same on every GuardResult). Prompts of several policies (and several texts) run as one left-padded batch,
each scored at its own last position.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..api import Model
from ..errors import GemmaError
from ..generate import check_prompt, left_pad
from . import policies as pol
from .policies import Policy

DEFAULT_THRESHOLD = 0.5


@dataclass
class GuardResult:
    """Scores of one text (or prompt + response) under each policy, and the verdict at `threshold`."""

    scores: dict[str, float]  # policy name -> P(violation) in [0, 1]
    threshold: float = DEFAULT_THRESHOLD
    response: bool = False  # scored as a chatbot response to the prompt (else as a user prompt)
    harm_types: dict[str, str] = field(default_factory=dict)  # policy name -> harm type, for display
    classifier: bool = True  # the model is known to be a policy classifier (else the scores are illustrative)
    warning: str | None = None  # why the scores may mean little, and the fix, when `classifier` is False

    @property
    def violations(self) -> list[str]:
        """Policies whose score reaches the threshold."""
        return [name for name, s in self.scores.items() if s >= self.threshold]

    @property
    def flagged(self) -> bool:
        return bool(self.violations)

    def to_dict(self) -> dict:
        return {"flagged": self.flagged, "threshold": self.threshold, "scores": self.scores,
                "violations": self.violations, "kind": "response" if self.response else "prompt",
                "classifier": self.classifier, "warning": self.warning}


def known_classifier(model: Model) -> bool:
    """Whether the model is a ShieldGemma checkpoint by its name: GGUF general.name, the HF config's _name_or_path
    or folder name (GemmaConfig.name), or the file/folder it was loaded from ("ShieldGemma 2b", shieldgemma-2b...)."""
    names = (model.config.name, Path(model.source).name)
    return any("shieldgemma" in re.sub(r"[^a-z0-9]", "", n.lower()) for n in names)


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise GemmaError(f"the threshold is a probability in [0, 1], got {threshold}")
    return float(threshold)


class Guard:
    """A loaded model used as a policy classifier: `guard("text")`, `guard("prompt", response="reply")`."""

    def __init__(self, model: Model, policies: str | Policy | Iterable[str | Policy] | None = None, *,
                 threshold: float = DEFAULT_THRESHOLD, batch_size: int = 4, classifier: bool | None = None) -> None:
        """`classifier`: True for a classifier the name does not tell (your own fine-tune), None to tell by the
        model's name (known_classifier)."""
        if model.tokenizer is None:
            raise GemmaError(f"{model.source}: the classifier needs a tokenizer; put tokenizer.model next to "
                             "the weights")
        if batch_size < 1:
            raise GemmaError(f"batch_size must be >= 1, got {batch_size}")
        ids = [model.tokenizer.token_id(t) for t in ("Yes", "No")]
        if None in ids:
            raise GemmaError(f"{model.source}: the vocabulary has no 'Yes'/'No' tokens; it is not a Gemma model")
        self.model, self.batch_size = model, batch_size
        self.yes_id, self.no_id = ids
        self.policies = pol.resolve(policies)
        self.threshold = check_threshold(threshold)
        self.classifier = known_classifier(model) if classifier is None else classifier
        self.warning = None if self.classifier else (
            f"{model.config.name or model.source} is not known to be a ShieldGemma checkpoint, so its scores are "
            "illustrative, not a trained classifier's; use a ShieldGemma model (e.g. shieldgemma-2b), or mark your "
            "own fine-tuned classifier as one (--classifier, Guard(..., classifier=True))")

    def prompt_ids(self, policy: Policy, user: str, response: str | None = None) -> list[int]:
        """<bos> + the classifier prompt; equal to transformers' `tokenizer(prompt)` for ordinary text."""
        if not isinstance(user, str) or (response is not None and not isinstance(response, str)):
            raise GemmaError("the classifier scores text: give the prompt (and the response) as strings")
        tok = self.model.tokenizer
        ids = [tok.bos_id]
        for text, control in pol.segments(policy, user, response):
            ids += tok.encode(text, bos=False, special=control)
        return ids

    @torch.inference_mode()
    def score_ids(self, prompts: Sequence[Sequence[int]]) -> list[float]:
        """P(Yes) / (P(Yes) + P(No)) at the last position of each prompt, in batches of similar lengths."""
        cfg = self.model.config
        for p in prompts:
            check_prompt(p, cfg.max_position_embeddings, cfg.vocab_size, room=0)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [0.0] * len(prompts)
        module = self.model.module
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            ids, pos = left_pad([prompts[i] for i in chunk], cfg.pad_token_id, self.model.device)
            logits = module(ids, pos, last_only=True)[:, -1]  # (B, V) fp32
            two = logits[:, [self.yes_id, self.no_id]]
            p_yes = torch.softmax(two, dim=-1)[:, 0]
            for i, p in zip(chunk, p_yes.tolist(), strict=True):
                out[i] = p
        return out

    def batch(self, items: Sequence[tuple[str, str | None]],
              policies: str | Policy | Iterable[str | Policy] | None = None) -> list[GuardResult]:
        """Score many (prompt, response or None) pairs under every policy, all in shared batches."""
        chosen = self.policies if policies is None else pol.resolve(policies)
        prompts = [self.prompt_ids(p, user, response) for user, response in items for p in chosen]
        scores = self.score_ids(prompts)
        results = []
        for k, (_, response) in enumerate(items):
            row = scores[k * len(chosen):(k + 1) * len(chosen)]
            results.append(GuardResult({p.name: s for p, s in zip(chosen, row, strict=True)}, self.threshold,
                                       response is not None, {p.name: p.harm_type for p in chosen},
                                       self.classifier, self.warning))
        return results

    def __call__(self, text: str, response: str | None = None,
                 policies: str | Policy | Iterable[str | Policy] | None = None) -> GuardResult:
        """Score a user prompt (or, with `response`, a chatbot's response to it) under each policy."""
        return self.batch([(text, response)], policies)[0]


def guard(text: str, response: str | None = None, *, policy: str | Policy | Iterable[str | Policy] | None = None,
          threshold: float = DEFAULT_THRESHOLD, model: Model | str | Path | None = None,
          classifier: bool | None = None) -> GuardResult:
    """Scores of `text` (a user prompt, or with `response` a reply to it) under each policy -> GuardResult.

    policy: built-in names ("dangerous", "harassment", "hate", "sexual"), "all", a YAML/JSON file of your own
    policies, or Policy objects; default all four built-in ones. model: a loaded Model (load once, reuse), a
    path, or None for the embedded Gemma 3 270M (a base model: its scores are illustrative, not a classifier's).
    """
    if not isinstance(model, Model):
        from ..loader import load

        model = load(model, progress=False)
    return Guard(model, policy, threshold=threshold, classifier=classifier)(text, response)
