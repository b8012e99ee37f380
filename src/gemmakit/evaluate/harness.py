"""The `gemmakit` model type for EleutherAI's lm-evaluation-harness (`lm_eval --model gemmakit`).

    lm_eval --model gemmakit --model_args pretrained=PATH,quant=auto --tasks hellaswag

Requests are tokenized and windowed exactly as lm-eval's own Hugging Face model type (HFLM) does for Gemma, so
the two give the same numbers for the same weights: text gets <bos> in front (unless it already starts with
"<bos>"), control tokens in the harness's prompts are parsed (as transformers' tokenizers do), an empty context
becomes <bos>, contexts too long for `max_length` are cut from the left, and loglikelihood_rolling uses lm-eval's
own rolling windows with <bos> as the prefix token. Scoring runs through evaluate/scoring.py (batched rows, no
full-vocabulary logits kept), generation through Model.generate (batched, greedy unless the task samples).

lm-eval 0.4.x resolves --model only against its own registry; the entry point `lm_eval.models` (pyproject.toml)
serves versions with plugin discovery, and gemmakit-lm-eval.pth registers the name for 0.4.x
(src/_gemmakit_lm_eval.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in types first: get_model imports them only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .. import chat_templates as chat_template
from ..api import Model
from ..errors import GemmaError
from ..loader import load
from .scoring import score_batch

DEFAULT_BATCH = 8
DEFAULT_GEN_TOKENS = 256  # HFLM's max_gen_toks


def _int_or_default(value: Any, default: int) -> int:
    """lm-eval passes batch sizes as ints, digit strings or "auto" (here: our default)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    return int(value)


def _device(device: str | None) -> str:
    """lm_eval's CLI defaults to cuda:0; like HFLM, fall back to the CPU when there is no GPU."""
    import torch

    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "auto"
    return str(device)


@register_model("gemmakit")
class GemmakitLM(TemplateLM):
    """lm-eval model backed by gemmakit.load(pretrained, quant=...); the fast path by default on a CPU."""

    def __init__(self, pretrained: str | Model | None = None, quant: str = "auto", dtype: str = "auto",
                 device: str | None = None, adapter: str | None = None, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_GEN_TOKENS, **unused: Any) -> None:
        super().__init__()
        if unused:
            raise GemmaError(f"unknown model_args for gemmakit: {', '.join(sorted(unused))}; use pretrained, "
                             "quant, dtype, device, adapter, max_length, max_gen_toks")
        if isinstance(pretrained, Model):  # an already loaded model (Python use)
            self.model = pretrained
        else:
            source = None if pretrained in (None, "", "embedded") else pretrained
            self.model = load(source, quant=None if str(quant).lower() == "none" else quant, dtype=dtype,
                              device=_device(device), adapter=adapter, progress=False)
        if self.model.tokenizer is None:
            raise GemmaError("lm-eval needs a tokenizer; put tokenizer.model next to the weights")
        self.tok = self.model.tokenizer
        self.batch = max(1, _int_or_default(batch_size, DEFAULT_BATCH))
        self.context = int(max_length) if max_length else self.model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)

    # ---- what TemplateLM needs -----------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.context

    @property
    def tokenizer_name(self) -> str:
        return f"gemmakit-{self.model.config.family}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        bos = add_special_tokens if add_special_tokens is not None else not string.startswith("<bos>")
        return self.tok.encode(string, bos=bos, special=True)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's own chat template (chat_templates/), rendered as text with <bos> in front, as transformers does.
        Without a generation prompt, a final assistant message stays open for the model to continue (what
        lm-eval asks for; HFLM's continue_final_message)."""
        family = chat_template.template_for(self.tok)
        text = chat_template.render(chat_history, family=family, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and family == "gemma3" and chat_history[-1].get("role") == "assistant":
            text = text.removesuffix(chat_template.END + "\n")
        return text

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "gemma" if chat_template else ""

    # ---- scoring ---------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation, in batches
        of similar length (longest first, so a batch that runs out of memory does so at once)."""
        rows, starts = [], []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise GemmaError("lm-eval sent a request with an empty context or continuation")
            whole = (context + continuation)[-(self.context + 1):]
            rows.append(whole)
            starts.append(len(whole) - len(continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="gemmakit loglikelihood")
        for b in range(0, len(order), self.batch):
            idx = order[b:b + self.batch]
            for i, s in zip(idx, score_batch(self.model, [rows[i] for i in idx], [starts[i] for i in idx]),
                            strict=True):
                out[i] = (float(s.logprobs.sum()), bool(s.greedy.all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            bar.update(len(idx))
        bar.close()
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: lm-eval's rolling windows of max_length tokens, each token scored
        once with as much context as fits, <bos> as the first token's context."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.context, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, scores, strict=True):
            totals[n] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Batched generation per distinct set of generation options; greedy unless the task asks to sample.
        The text is cut at the first stop sequence (`until`), and generation ends at <eos>/<end_of_turn>."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gemmakit generate_until")
        for idx in groups.values():
            options = dict(requests[idx[0]].args[1])
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", self.max_gen_toks))
            sampling = _sampling(options)
            idx.sort(key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(idx), self.batch):
                part = idx[b:b + self.batch]
                prompts = [self.tok_encode(requests[i].args[0])[-max(1, self.context - max_new):] for i in part]
                results = self.model.generate(prompts, max_new, stop=until or None, **sampling)
                for i, r in zip(part, results, strict=True):
                    out[i] = r.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, r.text)
                bar.update(len(part))
        bar.close()
        return out  # type: ignore[return-value]

    def get_model_info(self) -> dict:
        return {"model_source": self.model.source, "model_format": self.model.format,
                "model_dtype": str(self.model.dtype)}


def _sampling(options: dict[str, Any]) -> dict[str, Any]:
    """lm-eval generation kwargs -> Model.generate options: greedy unless do_sample (or a temperature > 0)."""
    temperature = float(options.pop("temperature", 0.0) or 0.0)
    do_sample = bool(options.pop("do_sample", temperature > 0))
    out: dict[str, Any] = {"temperature": temperature if do_sample else 0.0}
    if do_sample:
        for key in ("top_k", "top_p", "min_p", "seed"):
            if options.get(key) is not None:
                out[key] = options[key]
        out.setdefault("seed", 1234)
    if options.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(options["repetition_penalty"])
    return out
