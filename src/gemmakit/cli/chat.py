"""gemmakit chat: an interactive, streaming, multi-turn chat in the terminal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .. import chat_templates as chat_template
from ..api import Model
from ..errors import GemmaError
from ..loader import load
from ..sampling import SamplingParams
from ..watermark.synthid import Watermark
from .draft_opts import DraftOpt, DraftTokensOpt, load_draft
from .run import ModelOpt

HELP = (
    "/reset clears the conversation · /system TEXT sets the system prompt (/system alone clears it) · "
    "/save FILE writes the conversation as JSON · /load FILE reads one · /think on|off (Gemma 4) · /exit quits · "
    "Ctrl-C stops a reply · Ctrl-D quits"
)


class Session:
    """The conversation and the settings it is generated with; one reply per `reply()` call."""

    def __init__(
        self,
        model: Model,
        *,
        context: int,
        max_new_tokens: int,
        sampling: dict[str, Any],
        system: str | None = None,
        thinking: bool = False,
    ) -> None:
        self.model, self.context, self.max_new_tokens, self.sampling = (
            model,
            context,
            max_new_tokens,
            sampling,
        )
        self.system = system
        self.thinking = thinking  # Gemma 4's thinking mode: the model reasons (shown dimmed) before it answers
        self.history: list[dict[str, str]] = []  # user/assistant turns, alternating

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def ask(self, text: str) -> int:
        """Add a user message, dropping the oldest exchanges until the prompt leaves room for a reply.

        -> exchanges dropped; GemmaError (and no change) if even this message does not fit.
        """
        budget = self.context - min(self.max_new_tokens, self.context // 2)
        head = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*self.messages(), {"role": "user", "content": text}]
        kept, dropped = chat_template.fit(
            messages, lambda m: len(self.model.chat_ids(m, thinking=self.thinking)), budget
        )
        self.history = kept[len(head) :]
        return dropped

    def reply(self, out: Any, thoughts: Any = None) -> tuple[str, bool]:
        """Stream the reply to the last user message into out.write, the reasoning (Gemma 4 thinking) into
        thoughts.write when given; Ctrl-C stops it early.

        -> (reply, interrupted). The (possibly partial) reply joins the history, so the turns keep alternating;
        the reasoning does not (Gemma 4's template drops earlier reasoning anyway).
        """
        pieces: list[str] = []
        interrupted = False
        messages = self.messages()
        ids = self.model.chat_ids(messages, thinking=self.thinking)
        budget = min(self.max_new_tokens, self.context - len(ids))
        try:
            thought = False
            for delta in self.model.chat_deltas(messages, budget, thinking=self.thinking, **self.sampling):
                if delta.reasoning and thoughts is not None:
                    thoughts.write(delta.reasoning)
                    thoughts.flush()
                    thought = True
                if delta.content:
                    if thought and not pieces:
                        out.write("\n\n")  # the reply starts below the reasoning
                    pieces.append(delta.content)
                    out.write(delta.content)
                    out.flush()
        except KeyboardInterrupt:
            interrupted = True
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        return answer, interrupted

    def save(self, path: Path) -> None:
        """Write the conversation as JSON, atomically; a path that cannot be written is a GemmaError and the
        conversation stays as it is."""
        if path.is_dir():
            raise GemmaError(f"{path} is a folder; give a file name, e.g. /save {path / 'chat.json'}")
        if not path.parent.is_dir():
            raise GemmaError(f"{path}: the folder {path.parent} does not exist; create it or choose another path")
        text = json.dumps({"messages": self.messages()}, ensure_ascii=False, indent=2) + "\n"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise GemmaError(f"{path}: cannot save the conversation ({e.strerror or e}); choose another path") from None

    def load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise GemmaError(f"{path}: cannot read a saved conversation ({e})") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not messages:
            raise GemmaError(f'{path}: expected {{"messages": [...]}} as written by /save')
        chat_template.render(messages, family=self.model.chat_template)  # validates roles, order and contents
        system = messages[0]["content"] if messages[0]["role"] in chat_template.SYSTEM_ROLES else None
        history = messages[1:] if system is not None else messages
        if history and history[-1]["role"] == "user":
            history = history[:-1]  # a question without its answer: drop it, the turns must end with a reply
        self.system, self.history = system, list(history)


def chat(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", "-n", help="Longest reply in tokens.")
    ] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.7,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = 64,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    min_p: Annotated[
        float | None, typer.Option(help="Drop tokens below min_p x the top probability.")
    ] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="> 1 discourages repeats.")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same replies.")] = None,
    ctx_size: Annotated[
        int | None,
        typer.Option(
            help="Context for the conversation in tokens (default: the "
            "model's); older turns are dropped to fit."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    adapter: Annotated[str | None, typer.Option(help="LoRA adapter folder (PEFT format) to apply.")] = None,
    thinking: Annotated[
        bool, typer.Option(help="Gemma 4: reason before answering (the template's thinking mode).")
    ] = False,
    show_thinking: Annotated[
        bool, typer.Option(help="Show the reasoning, dimmed, before each reply (--hide-thinking to hide it).")
    ] = True,
    watermark: Annotated[str | None, typer.Option(help="SynthID-Text keys file: watermark the replies.")] = None,
    draft: DraftOpt = None,
    draft_tokens: DraftTokensOpt = 8,
) -> None:
    """Chat with a model in the terminal: streaming replies, multi-turn history, /reset /system /save /load.

    The embedded model is a base model, not chat-tuned: it follows the turn format but answers loosely; use an
    instruction-tuned Gemma (e.g. -m gemma-3-1b-it) for real conversations.

    Examples:  gemmakit chat
               gemmakit chat -m gemma-2-2b-it.Q8_0.gguf --system "Answer in French." -t 0.3
               gemmakit chat -m gemma-4-E2B-it --thinking
    """
    err = Console(stderr=True, highlight=False)
    sampling = dict(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
    )
    SamplingParams(**sampling)  # bad numbers (-t nan, a seed beyond 64 bits) fail now, not at the first reply
    sampling.update(draft=load_draft(draft), draft_tokens=draft_tokens)
    m = load(model, device=device, adapter=adapter)
    context = min(ctx_size or m.config.max_position_embeddings, m.config.max_position_embeddings)
    if watermark:
        sampling["logits_processors"] = Watermark(watermark)
    if thinking and m.chat_template != "gemma4":
        raise GemmaError(f"{m.source} has no thinking mode (a Gemma 4 chat template option); drop --thinking")
    session = Session(
        m, context=context, max_new_tokens=max_new_tokens, sampling=sampling, system=system, thinking=thinking
    )
    thoughts = _Dimmed(sys.stdout) if show_thinking else None
    err.print(f"[bold]gemmakit chat[/] · {escape(m.source)} · context {context} tokens\n[dim]{HELP}[/]")
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print("\n[dim](Ctrl-D or /exit quits)[/]")
            continue
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("/") and _command(session, text, err):
                return
            if text.startswith("/"):
                continue
            dropped = session.ask(text)
            if dropped:
                err.print(
                    f"[yellow](history trimmed: dropped the {dropped} oldest exchange(s) to fit the "
                    f"{context}-token context)[/]"
                )
            sys.stdout.write("\n")
            _, interrupted = session.reply(sys.stdout, thoughts)
            sys.stdout.write("\n")
            if interrupted:
                err.print("[dim]\\[stopped][/]")
        except GemmaError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}")


def _command(session: Session, text: str, err: Console) -> bool:
    """Run a /command; -> True to quit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/reset":
        session.history = []
        err.print("[dim](conversation cleared)[/]")
    elif name == "/system":
        session.system = arg or None
        err.print(f"[dim](system prompt {'set' if arg else 'cleared'})[/]")
    elif name in ("/save", "/load"):
        if not arg:
            raise GemmaError(f"{name} needs a file name, e.g. {name} chat.json")
        path = Path(arg).expanduser()
        if name == "/save":
            session.save(path)
            err.print(f"[dim](saved {len(session.messages())} messages to {escape(str(path))})[/]")
        else:
            session.load(path)
            err.print(f"[dim](loaded {len(session.messages())} messages from {escape(str(path))})[/]")
    elif name == "/think":
        if arg not in ("on", "off"):
            raise GemmaError("/think takes on or off")
        if arg == "on" and session.model.chat_template != "gemma4":
            raise GemmaError("this model has no thinking mode (a Gemma 4 chat template option)")
        session.thinking = arg == "on"
        err.print(f"[dim](thinking {arg})[/]")
    elif name == "/help":
        err.print(f"[dim]{HELP}[/]")
    else:
        err.print(f"[red]unknown command {escape(name)}[/] [dim]{HELP}[/]")
    return False


class _Dimmed:
    """Writes reasoning dimmed (ANSI faint) on a terminal, as it is elsewhere."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())

    def write(self, text: str) -> None:
        self.out.write(f"\x1b[2m{text}\x1b[22m" if self.tty else text)

    def flush(self) -> None:
        self.out.flush()
