"""gemmakit verify: is the loaded model right? Parity checks a user runs when an output looks wrong.

On a few built-in texts: the tokenizer round trip, the model's perplexity on plain English (a model whose
weights were converted wrongly, e.g. norms without Gemma's +1, scores in the thousands where any working Gemma
scores far below SANE_PERPLEXITY), fast path against reference path, and, when transformers is installed, the
same checkpoint loaded by transformers: token ids, logits and top-1 tokens. Logit tolerances are relative to the
largest reference logit, so they hold for models whose logits are 10 or 100.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..api import Model
from ..errors import GemmaError
from ..loader import load

TEXTS = {
    "prose": (
        "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Books that "
        "had taken scribes months to copy could now be produced in days, and the price of reading fell. Within "
        "fifty years presses were at work in more than two hundred European cities, and the spread of cheap "
        "pamphlets changed how news, science and religious ideas travelled."
    ),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n"
        "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
        "    numbers = [0, 1]\n"
        "    while len(numbers) < n:\n"
        "        numbers.append(numbers[-1] + numbers[-2])\n"
        "    return numbers[:n]\n\n\n"
        "if __name__ == \"__main__\":\n"
        "    for i, value in enumerate(fibonacci(10)):\n"
        "        print(f\"{i}: {value}\")\n"
    ),
    "multilingual": (
        "Bonjour, je m'appelle Marie et j'habite à Lyon. Hoy hace buen tiempo en Madrid. "
        "Der schnelle braune Fuchs springt über den faulen Hund. 東京は日本の首都です。 "
        "Привет, как дела? Numbers: 3.14159, 2,718, 1e-9, 0x1F; emoji: 🙂🚀."
    ),
}
SANE_TEXTS = ("prose", "code")  # English and Python: any working Gemma predicts them well
SANE_PERPLEXITY = 100.0  # the embedded 270M base scores ~9-22 on these; broken weights score thousands
HF_LOGITS_REL = 1e-4  # max |ours - transformers| / max |reference logit|, both fp32
HF_TOP1 = 0.99
FAST_LOGITS_REL = 0.1  # the fast path's weight-only Q8 and bf16 prefill drift
FAST_TOP1 = 0.9
FAST_PERPLEXITY = 0.03  # relative perplexity change, fast vs reference


@dataclass
class Check:
    name: str
    value: str
    limit: str
    ok: bool | None  # None: skipped (see note)
    note: str = ""


@dataclass
class Report:
    source: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]


def _ids(model: Model) -> dict[str, list[int]]:
    assert model.tokenizer is not None
    return {k: model.tokenizer.encode(t, bos=True) for k, t in TEXTS.items()}


def _ppl(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:])).item())


def _compare(name: str, ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rel: float,
             top1: float) -> list[Check]:
    """Max-abs logit difference relative to the largest reference logit, and top-1 agreement, over all texts."""
    diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    scale = max(ref[k].abs().max().item() for k in ref)
    agree = torch.cat([(ours[k].argmax(-1) == ref[k].argmax(-1)).float() for k in ref]).mean().item()
    return [Check(f"{name}: max |logit diff|", f"{diff:.3g} ({diff / scale:.2e} of max |logit| {scale:.1f})",
                  f"<= {rel:g} x max |logit|", diff <= rel * scale),
            Check(f"{name}: top-1 agreement", f"{agree:.1%}", f">= {top1:.0%}", agree >= top1)]


def _hf_checks(source: str | Path | None, ref: Model, ref_logits: dict[str, torch.Tensor]) -> list[Check]:
    """transformers on the same checkpoint (a GGUF through gguf_file=, a folder directly), fp32, eager."""
    try:
        import transformers
    except ImportError:
        return [Check("transformers parity", "skipped", "", None, "transformers is not installed: "
                      "pip install transformers (and gguf for GGUF files) to compare against it")]
    if ref.format in ("ckpt", "keras", "orbax"):
        what = {"ckpt": "gemma_pytorch .ckpt", "keras": "keras-hub presets", "orbax": "Orbax checkpoints"}[ref.format]
        return [Check("transformers parity", "skipped", "", None, f"transformers cannot read {what}; "
                      "`gemmakit convert --to hf` it and verify that folder")]
    transformers.utils.logging.disable_progress_bar()  # its bars would tear through our status line
    path = Path(source) if source is not None else _embedded()
    kwargs = {"gguf_file": path.name} if ref.format == "gguf" else {}
    folder = str(path.parent if ref.format == "gguf" else path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                           **kwargs).eval()
    ours_ids = _ids(ref)
    same = [k for k, t in TEXTS.items() if tok(t)["input_ids"] == ours_ids[k]]
    checks = [Check("tokenizer = transformers", f"{len(same)}/{len(TEXTS)} texts identical", "all",
                    len(same) == len(TEXTS))]
    with torch.no_grad():
        hf_logits = {k: hf(torch.tensor([ids])).logits[0].float() for k, ids in ours_ids.items()}
    return checks + _compare("reference vs transformers", ref_logits, hf_logits, HF_LOGITS_REL, HF_TOP1)


def _embedded() -> Path:
    from ..embedded import embedded_path

    return embedded_path(progress=False)


def _fast_checks(source: str | Path | None, ref_logits: dict[str, torch.Tensor], ids: dict[str, list[int]],
                 ) -> list[Check]:
    """The path a CPU user runs by default (quant="auto"), or the Q8 path when auto is the reference itself."""
    fast = load(source, progress=False)
    if not any(type(m).__name__.startswith("Q8") for m in fast.module.modules()):
        fast = load(source, quant="q8", progress=False)
    fast_logits = {k: fast.logits(v) for k, v in ids.items()}
    checks = _compare("fast vs reference", fast_logits, ref_logits, FAST_LOGITS_REL, FAST_TOP1)
    change = max(abs(_ppl(fast_logits[k], ids[k]) / _ppl(ref_logits[k], ids[k]) - 1) for k in ids)
    checks.append(Check("fast vs reference: perplexity", f"{change:.2%} largest change", f"<= {FAST_PERPLEXITY:.0%}",
                        change <= FAST_PERPLEXITY))
    return checks


def verify(source: str | Path | None = None, *, transformers: bool = True, fast: bool = True,
           on_step: Callable[[str], None] | None = None) -> Report:
    """Run every check on `source` (None: the embedded model) -> Report (.ok, .checks, .failures)."""
    step = on_step or (lambda _: None)
    step("loading the reference path (fp32)")
    ref = load(source, quant=None, dtype="float32", device="cpu", progress=False)
    if ref.tokenizer is None:
        raise GemmaError(f"{ref.source} has no tokenizer; verify needs one (put tokenizer.model beside it)")
    report = Report(ref.source)
    round_trip = [k for k, t in TEXTS.items() if ref.tokenizer.decode(ref.tokenizer.encode(t)) == t]
    report.checks.append(Check("tokenizer round trip", f"{len(round_trip)}/{len(TEXTS)} texts", "all",
                               len(round_trip) == len(TEXTS)))
    step("scoring the built-in texts")
    ids = _ids(ref)
    ref_logits = {k: ref.logits(v) for k, v in ids.items()}
    worst = max(_ppl(ref_logits[k], ids[k]) for k in SANE_TEXTS)
    report.checks.append(Check("perplexity on plain English/code", f"{worst:.1f}", f"<= {SANE_PERPLEXITY:g}",
                               worst <= SANE_PERPLEXITY,
                               "" if worst <= SANE_PERPLEXITY else "the weights are wrong: a working Gemma "
                               "predicts these texts well (norms converted without the +1? a wrong variant or "
                               "file?)"))
    if fast and ref.device.type == "cpu":
        step("comparing the fast path")
        report.checks += _fast_checks(source, ref_logits, ids)
    if transformers:
        step("loading the same checkpoint with transformers")
        report.checks += _hf_checks(source, ref, ref_logits)
    return report
