"""A request, once parsed, turned into engine jobs: its prompts as token ids, its token budget, its constraint's
logits processors, and n jobs per prompt with their sampling settings. Every refusal is an ApiError naming the
parameter; nothing here touches HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from .. import tool_calls
from ..api import ProcessorFactory
from ..errors import GemmaError
from ..sampling import SamplingParams
from . import schemas
from .engine import Engine
from .events import Event, Job
from .output import ApiError


def completion_prompts(body: schemas.CompletionRequest, engine: Engine) -> list[list[int]]:
    """The request's prompts as token ids: text may spell control tokens (hand-made turns), ids must be in range."""
    tok = engine.model.tokenizer
    prompts = []
    for p in body.prompts():
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            # Like vLLM and llama.cpp, a raw prompt may spell control tokens (hand-made turns); <bos> once.
            ids = tok.encode(p, bos=True, special=True)
            prompts.append(ids[1:] if ids[1:2] == [tok.bos_id] else ids)
        else:
            if not p or not all(0 <= t < engine.vocab_size for t in p):
                raise ApiError(
                    400,
                    f"token prompts must be non-empty lists of ids in 0..{engine.vocab_size - 1}",
                    param="prompt",
                )
            prompts.append(list(p))
    return prompts



def token_budget(
    engine: Engine, prompt_len: int, requested: int | None, param: str, prompt_param: str,
    default: int | None = None,
) -> int:
    """Tokens a request may generate: as asked, or `default` (None: up to the end of the context) capped by the
    room left; refuse what cannot fit."""
    ctx = engine.context
    if prompt_len >= ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, your {prompt_param} "
            f"resulted in {prompt_len} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = ctx - prompt_len
    if requested is None:
        return room if default is None else min(room, default)
    if requested > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_param}, {requested} in "
            f"the completion). Please reduce the length of the {prompt_param} or {param}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


async def processors(engine: Engine, constraint: dict[str, Any], param: str, banned: Sequence[int] = ()
                     ) -> ProcessorFactory | None:
    """The per-sequence processors of a constrained request (compiled off the event loop: the first one also
    builds the engine's tokenizer), or None; a bad schema or grammar is a 400 naming `param`. `banned` token ids
    are forbidden in every step (Gemma 4's <|tool_call> with tool_choice "none")."""
    ban = (lambda: [tool_calls.BanTokens(banned)]) if banned else None
    if not constraint:
        return ban
    try:
        compiled = await asyncio.to_thread(lambda: engine.model.constraint(**constraint))
    except GemmaError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None
    return compiled.processors(ban)


def make_jobs(
    body: schemas.Sampling, engine: Engine, prompts: Sequence[list[int]], max_new: int, logprobs: int | None,
    factory: ProcessorFactory | None = None,
    *,
    reasoning: bool = False,
) -> list[Job]:
    """n jobs per prompt; with a seed, choice j uses seed + j so the choices differ yet repeat exactly."""
    stop, bias = body.stops(), body.bias(engine.vocab_size)
    jobs = []
    for prompt in prompts:
        for j in range(body.n):
            try:
                params = SamplingParams(
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_k=body.top_k,
                    top_p=body.top_p,
                    min_p=body.min_p,
                    repetition_penalty=body.repetition_penalty,
                    seed=None if body.seed is None else body.seed + j,
                )
            except GemmaError as e:
                raise ApiError(400, str(e)) from None
            jobs.append(
                Job(
                    prompt,
                    max_new,
                    sink=_unset_sink,
                    params=params,
                    stop=stop,
                    ignore_eos=body.ignore_eos and factory is None,  # a grammar ends with a stop token
                    logprobs=logprobs,
                    logit_bias=bias,
                    frequency_penalty=body.frequency_penalty,
                    presence_penalty=body.presence_penalty,
                    processors=list(factory()) if factory else [],
                    split_reasoning=reasoning,
                )
            )
    return jobs


def _unset_sink(event: Event) -> None:
    raise RuntimeError("job submitted without a sink")
