"""What a caller hands the engine and what it gets back: a Job per sequence, an Event per step of it, delivered to
the job's sink directly or through a Mailbox (one hand-off per step for an event loop). The engine (engine.py) and
the HTTP side (output.py, jobs.py, moderation.py) both speak these, so they sit apart from either."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..sampling import LogitsProcessor, SamplingParams


class QueueFull(Exception):
    """The engine's waiting queue is full; the client should retry later."""


@dataclass
class TokenLogprob:
    id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, best first


@dataclass
class Event:
    """What one sequence produced in one step, sent to its job's sink."""

    text: str  # new text, safe to show (stop strings cut, a possible stop prefix held back)
    tokens: list[
        TokenLogprob
    ]  # the token sampled in this step with its logprobs, when asked for (else empty)
    finish_reason: str | None  # "stop" or "length" once finished
    completion_tokens: int  # tokens sampled so far (including a final end-of-turn / EOS)
    error: str | None = None  # an internal failure; the sequence is over
    reasoning: str = ""  # new reasoning text (Gemma 4 thinking), kept out of `text`
    ids: list[int] = field(default_factory=list)  # the token chosen in this step, a final stop token included


@dataclass
class Job:
    """One sequence to generate: one choice of one request."""

    prompt: list[int]
    max_new_tokens: int
    sink: Callable[[Event], None]  # called from the engine thread; must not block
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's logprob and the top k
    logit_bias: dict[int, float] = field(default_factory=dict)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    processors: list[LogitsProcessor] = field(default_factory=list)  # this sequence's own (sampling.py contract)
    split_reasoning: bool = False  # route Gemma 4's <|channel>...<channel|> text to Event.reasoning
    cancelled: bool = False  # set by the server (e.g. the client went away); the engine frees the row
    # With a mailbox, the engine hands each step's events of all such jobs to mailbox.post([(job, event), ...]) at
    # once (e.g. one wake-up of an event loop), and the mailbox calls the sinks; without one, it calls the sink.
    mailbox: Mailbox | None = None


class Mailbox:
    """Delivers a step's events to their jobs' sinks, e.g. on an event loop; post must not block."""

    def post(self, items: list[tuple[Job, Event]]) -> None:
        raise NotImplementedError
