"""Model: the loaded network + tokenizer, with the public methods users and other subsystems call."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import chat as chat_template
from .config import GemmaConfig
from .errors import GemmaError
from .generate import Generation, GenerationResult, check_prompt
from .model import Gemma
from .sampling import SamplingParams
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
Messages = Sequence[chat_template.Message]


@dataclass
class Model:
    module: Gemma
    tokenizer: Tokenizer | None
    source: str  # where the weights came from, for display
    format: str  # "gguf", "hf" or "ckpt"
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

    def _generation(self, prompt: Prompt | Sequence[Prompt], *, max_new_tokens: int, temperature: float,
                    top_k: int | None, top_p: float | None, min_p: float | None,
                    repetition_penalty: float | None, seed: int | None, stop: str | Sequence[str] | None,
                    ignore_eos: bool, lookup: int = 0) -> tuple[Generation, bool]:
        batched = not isinstance(prompt, str) and len(prompt) > 0 and not isinstance(prompt[0], int)
        prompts = [self.encode(p) for p in prompt] if batched else [self.encode(prompt)]
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        gen = Generation(self.module, self.tokenizer, prompts, max_new_tokens=max_new_tokens, params=params,
                         stop=stops, ignore_eos=ignore_eos, lookup=lookup)
        return gen, batched

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False, lookup: int = 0,
                 ) -> GenerationResult | list[GenerationResult]:
        """Continue a prompt (text or token ids); a list of prompts is generated as one batch -> list of results.

        temperature=0 is greedy; the same seed gives the same text. Stops at EOS/<end_of_turn> (unless
        ignore_eos), at any `stop` string (cut from the text), or after max_new_tokens / at the context length.
        """
        gen, batched = self._generation(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, min_p=min_p,
                                        repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                        ignore_eos=ignore_eos, lookup=lookup)
        results = gen.results()
        return results if batched else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: str | Sequence[str] | None = None, ignore_eos: bool = False, lookup: int = 0) -> Iterator[str]:
        """Like generate() for one prompt, yielding text pieces as they are produced (never a split character)."""
        gen, batched = self._generation(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, min_p=min_p,
                                        repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                        ignore_eos=ignore_eos, lookup=lookup)
        if batched:
            raise GemmaError("stream() takes one prompt; use generate() for a batch")
        for step in gen:
            piece, _ = step[0]
            if piece:
                yield piece
        self.last_result = gen.results()[0]

    def chat_ids(self, messages: Messages) -> list[int]:
        """The prompt ids of a conversation in Gemma's turn format (chat.py), ending with the model's turn."""
        if self.tokenizer is None:
            raise GemmaError("this model was loaded without a tokenizer; chat needs one")
        return chat_template.encode(self.tokenizer, messages)

    def chat(self, messages: Messages, max_new_tokens: int = 256, **sampling: Any) -> GenerationResult:
        """The assistant's reply to a conversation [{"role": "system"|"user"|"assistant", "content": ...}].

        Takes generate()'s sampling options; the reply ends at <end_of_turn>. A system message is folded into
        the first user turn (Gemma has no system role).
        """
        return self.generate(self.chat_ids(messages), max_new_tokens, **sampling)

    def chat_stream(self, messages: Messages, max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        """Like chat(), yielding the reply's text pieces as they are produced; last_result holds the result."""
        return self.stream(self.chat_ids(messages), max_new_tokens, **sampling)
