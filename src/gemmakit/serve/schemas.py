"""OpenAI request bodies, validated strictly: wrong types, out-of-range values and unknown fields are 400s.

Fields follow OpenAI's API reference. Those that change nothing for a local text model (`user`, `metadata`,
`store`, ...) are accepted and ignored; those gemmakit cannot honour (audio, logprobs with echo, ...) are
refused when set to anything but their default, so a client never gets silently different behaviour. `top_k`,
`min_p`, `repetition_penalty` and `ignore_eos` are extensions, as in vLLM and llama.cpp.

Every field is checked completely here, before anything reaches the engine: integers in range (a seed fits 64 bits
for each of the n choices), floats finite and usable, text that encodes (`check_json`: no lone surrogates, no
nesting deeper than MAX_DEPTH). A request the engine cannot run is a 400 here, never a failure beside others.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import GemmaError
from ..sampling import PENALTY_RANGE, SEED_MAX, SEED_MIN

MAX_N = 16
MAX_DEPTH = 100  # JSON nesting a request may use (tool schemas nest a few levels; 10,000 would recurse away)
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class Sampling(Strict):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # 0 = greedy, as OpenAI takes it
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # extensions (vLLM / llama.cpp names)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    ignore_eos: bool = False

    def check_sampling(self) -> None:
        """What field constraints cannot say: choice j samples with seed + j, which must fit 64 bits too."""
        if self.seed is not None and self.seed + self.n - 1 > SEED_MAX:
            raise ParamError("seed", f"seed + n - 1 must fit 64 bits (choice j samples with seed + j): use a seed "
                             f"<= {SEED_MAX - self.n + 1} with n={self.n}")
        self.stops()

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise ParamError("stop", "at most 16 stop sequences are supported")
        return tuple(s for s in stops if s)

    def bias(self, vocab_size: int) -> dict[int, float]:
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12) or not 0 <= int(key) < vocab_size:
                raise ParamError(
                    "logit_bias", f"logit_bias keys must be token ids in 0..{vocab_size - 1}, got {key!r}"
                )
            if not -100 <= value <= 100:
                raise ParamError("logit_bias", f"logit_bias values must lie in [-100, 100], got {value}")
            out[int(key)] = float(value)
        return out


class ChatRequest(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0: an empty reply with its usage, as OpenAI answers it
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # accepted and ignored: nothing to do for them locally
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # function calling (serve/structured.py)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # refused unless left at their defaults
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    # thinking (Gemma 4): vLLM's and llama.cpp's chat_template_kwargs.enable_thinking, or OpenAI's reasoning_effort
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None

    def check(self) -> None:
        """Refuse what this server cannot honour (run after validation: raises ParamError, a 400)."""
        self.check_sampling()
        if self.functions or self.function_call not in (None, "none"):
            raise ParamError("functions", "the deprecated 'functions'/'function_call' are not supported; "
                             "use 'tools' and 'tool_choice'")
        if self.modalities not in (None, ["text"]):
            raise ParamError("modalities", "only the 'text' modality is supported")
        for name in ("audio", "prediction", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                raise ParamError(name, f"'{name}' is not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true")

    def thinking(self, default: bool) -> bool:
        """Whether this request asks for the thinking mode: chat_template_kwargs.enable_thinking, else
        reasoning_effort ("none" is off; Gemma 4 has no effort levels, so any other is on), else `default`."""
        kwargs = self.chat_template_kwargs or {}
        if unknown := sorted(set(kwargs) - {"enable_thinking"}):
            raise ParamError("chat_template_kwargs", f"unsupported chat_template_kwargs {unknown}; gemmakit's "
                             "chat templates take only 'enable_thinking'")
        if "enable_thinking" in kwargs:
            if not isinstance(kwargs["enable_thinking"], bool):
                raise ParamError("chat_template_kwargs", "chat_template_kwargs.enable_thinking must be true or false")
            return kwargs["enable_thinking"]
        if self.reasoning_effort is not None:
            if self.reasoning_effort not in REASONING_EFFORTS:
                raise ParamError("reasoning_effort", f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
            return self.reasoning_effort != "none"
        return default

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 echoes/usage only
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def check(self) -> None:
        """Refuse what this server cannot honour (run after validation: raises ParamError, a 400)."""
        self.check_sampling()
        if self.suffix:
            raise ParamError("suffix", "suffix (fill-in-the-middle) is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ParamError("best_of", "best_of must equal n: ranking candidates is not supported")
        if self.echo and self.logprobs is not None:
            raise ParamError("echo", "echo together with logprobs (prompt logprobs) is not supported")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ParamError("prompt", "prompt must not be empty")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ParamError(GemmaError):
    """A request field with a bad value: becomes a 400 naming the field."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def check_json(data: Any) -> None:
    """ParamError (a 400 naming the field) for JSON deeper than MAX_DEPTH, a number beyond float range, or a
    string that is not text (a lone
    surrogate such as "\\ud800", which JSON's escapes allow but no tokenizer or UTF-8 writer takes). Iterative, so
    a hostile depth cannot exhaust the stack here."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise ParamError(_top(path), f"{path or 'the body'} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            _check_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):  # 1e400 parses as inf
            raise ParamError(_top(path), f"{path or 'a number'} is {value}: numbers must be finite")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(value))


def _check_text(text: str, path: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParamError(_top(path), f"{path or 'a key'} holds {text[e.start:e.end]!a} at index {e.start}, a lone "
                         "UTF-16 surrogate that is no character; send valid Unicode text") from None


def _top(path: str) -> str | None:
    """The request field a path is under (OpenAI's `param`): messages[3].content -> messages."""
    return path.split(".")[0].split("[")[0] or None
