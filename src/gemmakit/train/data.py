"""Training data: JSONL in three shapes -> token ids with a loss mask, truncation counts, packing and batches.

One JSON object per line:
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  loss on assistant turns only
    (optionally "tools": OpenAI function declarations, with assistant "tool_calls" and "tool" results in the
    messages, rendered as at inference: Gemma 4's native tokens, Gemma 1/2/3's prompt format of tool_calls/gemma3_json.py)
  {"prompt": "...", "completion": "..."}                                      loss on the completion (+ <eos>)
  {"text": "..."}                                                             loss on every token (+ <eos>)

Chat rendering follows the Gemma chat templates exactly (spec §5.7; turns from chat_templates/): `<bos>`, then per turn
`<start_of_turn>{user|model}\\n{content.strip()}<end_of_turn>\\n`, a Gemma 3 system prompt folded into the first user
turn as `{system}\\n\\n`, Gemma 1/2 refusing system turns. A Gemma 4 tokenizer (one with `<|turn>`) gets Gemma 4's
official template instead (chat_gemma4.segments: native system turn, `<|turn>{role}\\n...<turn|>\\n`). Turn markers
are inserted as ids and the text between them is encoded as plain text, so a dataset cannot forge control tokens.
The loss covers an assistant turn's content and its end-of-turn marker, which teaches the model to stop.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..chat_templates import SYSTEM_ROLES, template_for, turns
from ..chat_templates import gemma4 as chat_gemma4
from ..errors import GemmaError
from ..tokenizer import Tokenizer
from ..tool_calls.calls import checked_tools
from ..tool_calls.gemma3_json import plain_messages


@dataclass
class Example:
    ids: list[int]
    train: list[bool]  # train[i]: ids[i] is a prediction target (loss on predicting it from ids[:i])
    line: int = 0  # line number in the source file (first line of a packed row)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_targets(self) -> int:
        return sum(self.train[1:])


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0  # examples longer than max_len, cut to it
    tokens_cut: int = 0  # tokens those cuts removed
    dropped: int = 0  # examples with no trainable token left after truncation
    tokens: int = 0
    targets: int = 0
    shapes: dict[str, int] = field(default_factory=dict)  # "messages" / "prompt" / "text" -> count


class ChatFormat:
    """Token-level Gemma turn format for one tokenizer and model family (spec §5.7)."""

    def __init__(self, tokenizer: Tokenizer, family: str) -> None:
        self.tok, self.family = tokenizer, family
        start, end = tokenizer.token_id("<start_of_turn>"), tokenizer.token_id("<end_of_turn>")
        if start is None or end is None:
            raise GemmaError(
                "this tokenizer has no <start_of_turn>/<end_of_turn> tokens, so chat data cannot be "
                'rendered; use {"prompt", "completion"} or {"text"} lines'
            )
        self.start, self.end = start, end

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               parallel: bool = True) -> tuple[list[int], list[bool]]:
        """(ids, train flags) for a conversation; turn validation and text are chat.turns' (the one template).
        Tools, calls and results become plain turns as the server renders them (gemma3_json.plain_messages): the
        assistant's JSON calls are trained, the tool results (user turns) are not."""
        if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages if isinstance(m, dict)):
            messages = plain_messages(messages, checked_tools(tools) if tools else None, parallel)
        if (
            messages
            and isinstance(messages[0], dict)
            and messages[0].get("role") in SYSTEM_ROLES
            and self.family in ("gemma", "gemma2")
        ):
            raise ValueError("Gemma 1/2 chat templates have no system role; fold it into the first user turn")
        ids, train = [self.tok.bos_id], [False]
        nl = self.tok.encode("\n", bos=False)
        for role, text in turns(messages):
            if role == "user":
                part = [self.start, *self.tok.encode(f"user\n{text}", bos=False), self.end]
                ids += part
                train += [False] * len(part)
            else:  # loss on the answer and its <end_of_turn>, not on the "model\n" header
                head = [self.start, *self.tok.encode("model\n", bos=False)]
                body = [*self.tok.encode(text, bos=False), self.end]
                ids += head + body
                train += [False] * len(head) + [True] * len(body)
            ids += nl
            train += [False] * len(nl)
        if not any(train):
            raise ValueError("no assistant message to learn from")
        return ids, train


class Gemma4ChatFormat:
    """Gemma 4's turn format: the official template's pieces (chat_gemma4.segments, no generation prompt), with the
    loss on what the model writes in its turns (text, tool calls, the closing <turn|>), not on the "model\\n" header
    or tool responses, which the template places inside the model's turn."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               parallel: bool = True) -> tuple[list[int], list[bool]]:
        """(ids, train flags); `tools` are declared in the system turn (never trained); calls and the
        <|tool_response> that ends them are trained, the responses are not (parallel: Gemma 4 needs no switch)."""
        ids: list[int] = []
        train: list[bool] = []
        model = False  # inside a model turn, outside a tool's answer
        for text, control in chat_gemma4.segments(messages, tools=tools, add_generation_prompt=False):
            if control:  # a marker written inside a model turn (<turn|>, <|tool_call>, ...) is the model's
                ids.append(self._marker(text))
                train.append(model)
                if text in (chat_gemma4.TURN_END, chat_gemma4.RESPONSE):
                    model = False  # the turn ends, or the tool's answer follows
                elif text == chat_gemma4.RESPONSE_END:
                    model = True  # the model goes on after the answer
                continue
            if ids and ids[-1] == self._marker(chat_gemma4.TURN) and text.startswith("model\n"):
                head = self.tok.encode("model\n", bos=False)
                ids += head
                train += [False] * len(head)
                text, model = text.removeprefix("model\n"), True
            part = self.tok.encode(text, bos=False) if text else []
            ids += part
            train += [model] * len(part)
        if not any(train):
            raise ValueError("no assistant message to learn from")
        return ids, train

    def _marker(self, text: str) -> int:
        token = self.tok.token_id(text)
        if token is None:
            raise ValueError(f"this tokenizer has no {text} token, which Gemma 4's chat template needs")
        return token


def chat_format(tokenizer: Tokenizer, family: str) -> ChatFormat | Gemma4ChatFormat | None:
    """The turn format training renders chats in: Gemma 4's for a tokenizer with <|turn>, else Gemma 1-3's."""
    if template_for(tokenizer) == "gemma4":
        return Gemma4ChatFormat(tokenizer)
    return ChatFormat(tokenizer, family) if tokenizer.token_id("<start_of_turn>") is not None else None


def encode_record(
    record: Any, tokenizer: Tokenizer, chat: ChatFormat | Gemma4ChatFormat | None
) -> tuple[str, list[int], list[bool]]:
    """(shape, ids, train flags) for one parsed JSONL record; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if not isinstance(record["messages"], list) or not all(
            isinstance(m, dict) for m in record["messages"]
        ):
            raise ValueError('"messages" must be a list of {"role", "content"} objects')
        if chat is None:
            raise ValueError("chat data needs a tokenizer with turn markers")
        tools = record.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ValueError('"tools" must be a list of OpenAI function declarations')
        return ("messages", *chat.render(record["messages"], tools, record.get("parallel_tool_calls") is not False))
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise ValueError('"prompt" and "completion" must both be strings, the completion non-empty')
        p = [tokenizer.bos_id, *tokenizer.encode(prompt, bos=False)]
        c = [*tokenizer.encode(completion, bos=False), tokenizer.eos_id]
        return "prompt", p + c, [False] * len(p) + [True] * len(c)
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError('"text" must be a non-empty string')
        ids = [tokenizer.bos_id, *tokenizer.encode(record["text"], bos=False), tokenizer.eos_id]
        return "text", ids, [False] + [True] * (len(ids) - 1)
    raise ValueError(
        f'unknown record shape with keys {sorted(record)}; expected "messages", '
        '"prompt"+"completion" or "text"'
    )


def load_jsonl(
    path: str | Path, tokenizer: Tokenizer, family: str, *, max_len: int
) -> tuple[list[Example], DataStats]:
    """Read, validate and tokenize a JSONL file; examples longer than max_len tokens are cut (and counted)."""
    path = Path(path)
    if not path.is_file():
        raise GemmaError(f"{path} does not exist; pass a JSONL file with one JSON object per line")
    if max_len < 2:
        raise GemmaError(f"max_len must be at least 2 tokens, got {max_len}")
    chat = chat_format(tokenizer, family)
    stats, out = DataStats(), []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GemmaError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                shape, ids, train = encode_record(record, tokenizer, chat)
            except (ValueError, GemmaError) as e:
                raise GemmaError(f"{path}:{lineno}: {e}") from None
            stats.examples += 1
            stats.shapes[shape] = stats.shapes.get(shape, 0) + 1
            if len(ids) > max_len:
                stats.truncated += 1
                stats.tokens_cut += len(ids) - max_len
                ids, train = ids[:max_len], train[:max_len]
            ex = Example(ids, train, lineno)
            if ex.n_targets == 0:
                stats.dropped += 1
                continue
            stats.tokens += len(ids)
            stats.targets += ex.n_targets
            out.append(ex)
    if not out:
        raise GemmaError(
            f"{path} has no usable examples ({stats.examples} read, {stats.dropped} with nothing left "
            "to learn after truncation); check the file or raise --seq-len"
        )
    return out, stats


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random validation split (at least one example when val_fraction > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise GemmaError(f"the validation fraction must lie in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return examples, []
    if len(examples) < 2:
        raise GemmaError("a validation split needs at least 2 examples; pass --val-split 0")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    val = sorted(order[:n_val])
    keep = sorted(order[n_val:])
    return [examples[i] for i in keep], [examples[i] for i in val]


def pack(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Concatenate examples greedily into rows of at most seq_len tokens (each keeps its own <bos>).

    Positions run on across a row and attention is causal over the whole row (TRL's ConstantLengthDataset
    convention): no padding is wasted, and the loss masks still apply per token.
    """
    rows: list[Example] = []
    cur = Example([], [], 0)
    for ex in examples:
        if cur.ids and len(cur) + len(ex) > seq_len:
            rows.append(cur)
            cur = Example([], [], 0)
        if not cur.ids:
            cur.line = ex.line
        cur.ids += ex.ids
        cur.train += ex.train
    if cur.ids:
        rows.append(cur)
    return rows


@dataclass
class Batch:
    ids: Tensor  # (B, T) inputs
    positions: Tensor  # (B, T), -1 on padding
    targets: Tensor  # (B, T) next tokens
    mask: Tensor  # (B, T) bool: target counts in the loss

    @property
    def n_targets(self) -> int:
        return int(self.mask.sum())

    @property
    def n_tokens(self) -> int:
        return int((self.positions >= 0).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.ids.to(device), self.positions.to(device), self.targets.to(device), self.mask.to(device)
        )


def collate(rows: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-padded inputs/targets for next-token prediction: inputs ids[:-1], targets ids[1:]."""
    width = max(len(r) for r in rows) - 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.full((len(rows), width), -1, dtype=torch.long)
    tgt = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = len(r) - 1
        ids[b, :n] = torch.tensor(r.ids[:-1])
        pos[b, :n] = torch.arange(n)
        tgt[b, :n] = torch.tensor(r.ids[1:])
        mask[b, :n] = torch.tensor(r.train[1:])
    return Batch(ids, pos, tgt, mask)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a permutation that depends only on (seed, epoch), so a resume replays it."""
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def step_rows(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step` (0-based) in the endless stream of shuffled epochs."""
    out: list[int] = []
    start = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        out += order[offset : offset + per_step - len(out)]
    return out
