"""Model: the loaded network + tokenizer, with the public methods users and other subsystems call."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from . import chat_templates as chat_template
from . import tool_calls
from .config import GemmaConfig
from .errors import GemmaError
from .generate import Generation, GenerationResult, check_prompt
from .grammar import Grammar, GrammarProcessor, compile_grammar, engine_tokenizer
from .model import Gemma
from .sampling import LogitsProcessor, SamplingParams
from .tokenizer import Tokenizer
from .tool_calls.calls import CallDelta, ToolCall

Prompt = str | Sequence[int]
Messages = Sequence[chat_template.Message]
Tools = Sequence[Mapping[str, Any]]
ProcessorFactory = Callable[[], Sequence[LogitsProcessor]]  # called once per sequence: processors keep row state
if TYPE_CHECKING:
    import os

    from .watermark.synthid import WatermarkConfig

    WatermarkKeys = str | os.PathLike[str] | Mapping[str, Any] | WatermarkConfig  # a keys file, its fields, itself


@dataclass
class Model:
    module: Gemma
    tokenizer: Tokenizer | None
    source: str  # where the weights came from, for display
    format: str  # "gguf", "hf", "keras", "orbax" or "ckpt"
    last_result: GenerationResult | None = None  # set when a stream() finishes: token ids and finish reason

    @property
    def config(self) -> GemmaConfig:
        return self.module.config

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise GemmaError("the prompt is empty; give some text (or the ids [2] for an unconditional start)")
            if self.tokenizer is None:
                raise GemmaError("this model was loaded without a tokenizer; pass token ids instead of text")
            return self.tokenizer.encode(prompt, bos=True)
        return [int(i) for i in prompt]

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Full-sequence fp32 logits: [T, V] for one list of ids, [B, T, V] for a batch.

        A ragged batch is right-padded; logits at padded positions are zero.
        """
        if isinstance(ids, Tensor):
            single = ids.dim() == 1
            rows = [ids.tolist()] if single else ids.tolist()
        else:
            single = len(ids) == 0 or not isinstance(ids[0], Sequence | Tensor)
            rows = [list(ids)] if single else [list(r) for r in ids]
        for r in rows:
            check_prompt(r, self.config.max_position_embeddings, self.config.vocab_size, room=0)
        width = max(len(r) for r in rows)
        ids_t = torch.zeros(len(rows), width, dtype=torch.long)
        pos = torch.full((len(rows), width), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            ids_t[b, : len(r)] = torch.tensor(r)
            pos[b, : len(r)] = torch.arange(len(r))
        out = self.module(ids_t.to(self.device), pos.to(self.device))
        out = out.masked_fill((pos < 0).to(self.device)[..., None], 0.0)
        return out[0] if single else out

    def _generation(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int, opts: GenerateOptions,
                    ) -> tuple[Generation, bool]:
        batched = not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts = [self.encode(p) for p in prompt] if batched else [self.encode(prompt)]
        params = opts.sampling
        stops = [opts.stop] if isinstance(opts.stop, str) else list(opts.stop or [])
        logits_processors = opts.logits_processors
        if opts.watermark is not None:
            # same layer, imported here: synthid.py imports this module
            from .watermark.synthid import Watermark, with_watermark

            logits_processors = with_watermark(logits_processors, Watermark(opts.watermark))
        constraint = None
        if opts.constrained:
            if stops or opts.ignore_eos:
                raise GemmaError("stop strings and ignore_eos cannot be combined with json_schema, regex or "
                                 "grammar: the grammar decides where the output ends")
            constraint = self.constraint(json_schema=opts.json_schema, regex=opts.regex, grammar=opts.grammar)
        factory = constraint.processors(logits_processors) if constraint else logits_processors
        processors = [list(factory()) for _ in prompts] if factory else None
        gen = Generation(self.module, self.tokenizer, prompts, max_new_tokens=max_new_tokens, params=params,
                         stop=stops, ignore_eos=opts.ignore_eos, lookup=opts.lookup, processors=processors,
                         parse=constraint.grammar.parse if constraint else None, draft=opts.draft,
                         draft_tokens=opts.draft_tokens)
        return gen, batched

    def constraint(self, *, json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                   lark: str | None = None) -> Constraint:
        """A compiled output constraint for this model's vocabulary (see grammar.py; `lark` is llguidance's Lark
        as is, never read as GBNF); GemmaError when invalid."""
        if self.tokenizer is None:
            raise GemmaError("constrained decoding needs the model's tokenizer; put tokenizer.model next to it")
        cfg = self.config
        compiled = compile_grammar(json_schema=json_schema, regex=regex, grammar=grammar, lark=lark)
        return Constraint(compiled, engine_tokenizer(self.tokenizer, cfg.vocab_size,
                                                     [cfg.eos_token_id, cfg.end_of_turn_id]))

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False, lookup: int = 0,
                 logits_processors: ProcessorFactory | None = None, json_schema: Any = None,
                 regex: str | None = None, grammar: str | None = None, watermark: WatermarkKeys | None = None,
                 draft: Any = None, draft_tokens: int = 8) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or token ids); a list of prompts is generated as one batch -> list of results.

        temperature=0 is greedy; the same seed gives the same text. Stops at EOS/<end_of_turn> (unless
        ignore_eos), at any `stop` string (cut from the text), or after max_new_tokens / at the context length.
        `logits_processors` is called once per sequence and returns that sequence's LogitsProcessors (sampling.py).
        Constrained decoding: `json_schema` (a dict or a pydantic model class), `regex`, or `grammar` (Lark, or
        GBNF as llama.cpp writes it); a result that ends with "stop" then always parses, and `.parsed` holds the
        JSON value (the validated pydantic object). "length" means the budget ran out first: raise max_new_tokens.
        `watermark` (a keys file path, a dict of its fields or a WatermarkConfig) marks the text with SynthID-Text,
        as `logits_processors=gemmakit.watermark.Watermark(keys)` does; detect it with gemmakit.watermark.detect.
        `draft`: a Gemma 4 assistant drafter (gemmakit.load(assistant_dir)) proposes up to `draft_tokens` tokens a
        round for this model to verify in one forward: the same output (greedy: the same tokens; sampling: the same
        distribution), faster when the drafter agrees; `.speculation` lists the rounds. Not with `lookup`.
        """
        gen, batched = self._generation(prompt, max_new_tokens, GenerateOptions.of(locals()))
        results = gen.results()
        return results if batched else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False, lookup: int = 0,
               logits_processors: ProcessorFactory | None = None, json_schema: Any = None,
               regex: str | None = None, grammar: str | None = None, watermark: WatermarkKeys | None = None,
               draft: Any = None, draft_tokens: int = 8) -> Iterator[str]:
        """Like generate() for one prompt, yielding text pieces as they are produced (never a split character)."""
        gen, batched = self._generation(prompt, max_new_tokens, GenerateOptions.of(locals()))
        if batched:
            raise GemmaError("stream() takes one prompt; use generate() for a batch")
        for step in gen:
            piece, _ = step[0]
            if piece:
                yield piece
        self.last_result = gen.results()[0]

    @property
    def chat_template(self) -> str:
        """The chat template this model's tokenizer belongs to: "gemma4", or "gemma3" for Gemma 1/2/3's."""
        return chat_template.template_for(self.tokenizer)

    def chat_ids(self, messages: Messages, *, tools: Tools | None = None, tool_choice: Any = None,
                 parallel_tool_calls: bool = True, thinking: bool = False) -> list[int]:
        """The prompt ids of a conversation in the model's chat template (chat_templates/), ending with the model's turn.

        `tools` (OpenAI function declarations) are rendered natively by Gemma 4's template and in Google's prompt
        format for Gemma 1/2/3 (tool_calls/gemma3_json.py); `thinking` is a Gemma 4 template option.
        """
        return self._tool_plan(tools, tool_choice, parallel_tool_calls, thinking).encode(self.tokenizer, messages)

    def _tool_plan(self, tools: Tools | None, tool_choice: Any, parallel: bool, thinking: bool) -> tool_calls.ToolPlan:
        if self.tokenizer is None:
            raise GemmaError("this model was loaded without a tokenizer; chat needs one")
        return tool_calls.plan(self.tokenizer, tools, tool_choice, parallel=parallel, thinking=thinking)

    def chat(self, messages: Messages, max_new_tokens: int = 256, *, tools: Tools | None = None,
             tool_choice: Any = None, parallel_tool_calls: bool = True, thinking: bool = False,
             **sampling: Any) -> ChatResult:
        """The assistant's reply to a conversation [{"role": "system"|"user"|"assistant"|"tool", "content": ...}].

        Takes generate()'s sampling options (`watermark=` too); the reply ends at the end of the model's turn. Gemma 4 has a system
        role and, with thinking=True, reasons before it answers: `.text` is the answer, `.reasoning` the
        reasoning (None when there was none). Gemma 1/2/3 fold a system message into the first user turn.

        With `tools` (OpenAI's function declarations) the model may call them (tool_choice "auto", the default),
        must ("required", or {"type": "function", "function": {"name": ...}}) or may not ("none"); calls are
        constrained to each function's parameters schema and come back parsed in `.tool_calls`, with
        finish_reason "tool_calls". Append `.message` to the history, run the calls, append each result as
        {"role": "tool", "tool_call_id": call.id, "content": ...}, and chat again.
        """
        deltas = self.chat_deltas(messages, max_new_tokens, tools=tools, tool_choice=tool_choice,
                                  parallel_tool_calls=parallel_tool_calls, thinking=thinking, **sampling)
        for _ in deltas:  # consumes the stream; last_result holds the reply
            pass
        result = self.last_result
        assert isinstance(result, ChatResult)
        return result

    def chat_stream(self, messages: Messages, max_new_tokens: int = 256, *, tools: Tools | None = None,
                    tool_choice: Any = None, parallel_tool_calls: bool = True, thinking: bool = False,
                    **sampling: Any) -> Iterator[str]:
        """Like chat(), yielding the reply's text pieces as they are produced; last_result holds the result."""
        for d in self.chat_deltas(messages, max_new_tokens, tools=tools, tool_choice=tool_choice,
                                  parallel_tool_calls=parallel_tool_calls, thinking=thinking, **sampling):
            if d.content:
                yield d.content

    def chat_deltas(self, messages: Messages, max_new_tokens: int = 256, *, tools: Tools | None = None,
                    tool_choice: Any = None, parallel_tool_calls: bool = True, thinking: bool = False,
                    **sampling: Any) -> Iterator[ChatDelta]:
        """Like chat_stream(), yielding (reasoning, content, call) pieces: Gemma 4's reasoning streams apart from
        the reply, and each tool call as OpenAI streams it (its id and name, then its arguments' JSON text piece by
        piece). last_result (a ChatResult) holds the whole reply when the stream ends."""
        plan = self._tool_plan(tools, tool_choice, parallel_tool_calls, thinking)
        prompt = plan.encode(self.tokenizer, messages)
        reader = plan.reader(self.tokenizer)
        opts = GenerateOptions(**sampling)
        banned = plan.banned(self.tokenizer)
        if reader is not None:
            opts = replace(opts, logits_processors=self._call_processors(plan, opts))
        elif banned:
            extra = opts.logits_processors
            opts = replace(opts, logits_processors=lambda: [tool_calls.BanTokens(banned), *(extra() if extra else ())])
        gen, _ = self._generation(prompt, max_new_tokens, opts)
        if reader is None:
            yield from self._text_deltas(gen)
            return
        row, seen, parts, reason = gen.rows[0], 0, [], "length"
        for step in gen:
            piece, finish = step[0]
            deltas = reader.feed(piece, row.ids[seen:])
            seen = len(row.ids)
            if finish is not None:
                closing, reason = reader.finish(finish)
                deltas += closing
            for d in deltas:
                parts.append(d)
                yield ChatDelta(d.reasoning, d.content, d.call)
        r = gen.results()[0]
        reasoning, content, _ = tool_calls.assemble(parts)
        self.last_result = ChatResult(content, r.token_ids, reason, r.prompt_tokens, None, r.speculation,
                                      reasoning=reasoning or None, tool_calls=reader.calls() or None)

    def _call_processors(self, plan: tool_calls.ToolPlan, opts: GenerateOptions) -> ProcessorFactory:
        """The grammar of the plan's calls, then the caller's own processors (a watermark...)."""
        given = [k for k in ("json_schema", "regex", "grammar") if getattr(opts, k) is not None]
        if given or opts.stop or opts.ignore_eos:
            raise GemmaError(f"{', '.join(given) or 'stop strings / ignore_eos'} cannot be combined with tools: the "
                             "reply is a call or text under the tools' grammar (use tool_choice='none')")
        return self.constraint(**plan.constraint(self.tokenizer)).processors(opts.logits_processors)

    def _text_deltas(self, gen: Generation) -> Iterator[ChatDelta]:
        """A reply without tool calls, Gemma 4's reasoning split off by its channel tokens."""
        splitter = chat_template.reasoning_splitter(self.tokenizer)
        row, seen, reasoning, content = gen.rows[0], 0, [], []
        for step in gen:
            piece, finish = step[0]
            if splitter is None:
                delta = ChatDelta("", piece)
            else:
                if len(row.ids) > seen:  # the token this step added: where a channel marker falls in the text
                    splitter.observe(row.ids[-1], len(row.text))
                    seen = len(row.ids)
                delta = ChatDelta(*splitter.split(piece))
                if finish is not None:
                    delta = ChatDelta(delta.reasoning + splitter.finish(), delta.content)
            reasoning.append(delta.reasoning)
            content.append(delta.content)
            if delta.reasoning or delta.content:
                yield delta
        r = gen.results()[0]
        self.last_result = ChatResult("".join(content), r.token_ids, r.finish_reason, r.prompt_tokens,
                                      r.parsed, r.speculation, reasoning="".join(reasoning) or None)


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar and the engine tokenizer of one model: makes each sequence's GrammarProcessor."""

    grammar: Grammar
    tokenizer: Any  # llguidance.LLTokenizer

    def processors(self, extra: ProcessorFactory | None = None) -> ProcessorFactory:
        """A factory of one sequence's processors: its grammar mask first, then `extra`'s (e.g. a watermark)."""
        return lambda: [GrammarProcessor(self.grammar, self.tokenizer), *(extra() if extra else ())]


@dataclass(frozen=True)
class GenerateOptions:
    """generate()/stream()'s keyword options as one value. The public methods list them one by one (for users,
    their editors and help()); inside the library they travel together, so a new option is added here and in
    those two signatures (tests/test_generate.py checks that the names and defaults match)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    ignore_eos: bool = False
    lookup: int = 0
    logits_processors: ProcessorFactory | None = None
    json_schema: Any = None
    regex: str | None = None
    grammar: str | None = None
    watermark: WatermarkKeys | None = None
    draft: Any = None  # a Gemma 4 assistant drafter (draft.Drafter)
    draft_tokens: int = 8

    @classmethod
    def of(cls, call: Mapping[str, Any]) -> GenerateOptions:
        """The options among a call's arguments (generate()'s or stream()'s `locals()`)."""
        return cls(**{f.name: call[f.name] for f in fields(cls)})

    @property
    def sampling(self) -> SamplingParams:
        """The sampler's part, checked when made: bad values fail before any compute."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, seed=self.seed)

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.grammar is not None


class ChatDelta(NamedTuple):
    """A piece of a streamed chat reply: reasoning text (Gemma 4's thinking), answer text, or a piece of a tool
    call (its id and name first, then its arguments' JSON text, as OpenAI streams tool_calls)."""

    reasoning: str
    content: str
    call: CallDelta | None = None


@dataclass
class ChatResult(GenerationResult):
    """A chat reply: `.text` is the answer; `.reasoning` is the reasoning before it (Gemma 4 thinking) or None;
    `.tool_calls` the calls it made (with finish_reason "tool_calls") or None. `token_ids` are every generated
    token, the reasoning's, the calls' and the markers included."""

    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None

    @property
    def message(self) -> dict[str, Any]:
        """The reply as an OpenAI assistant message, to append to the conversation (calls as `tool_calls`)."""
        out: dict[str, Any] = {"role": "assistant", "content": (self.text or None) if self.tool_calls else self.text}
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out
