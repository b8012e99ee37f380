"""`gemmakit chat` in a real pseudo-terminal (pexpect), on the embedded model: streaming replies, Ctrl-C stops a
reply without leaving, /system, history trimming with a visible note, /save, /load, /reset, /exit."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = "\r\n> "


def test_interactive_chat(tmp_path: Path):
    # A context of 384: replies may run to ~200-340 tokens (seconds even at 100 tok/s, so Ctrl-C arrives while one
    # streams), and a prompt may hold 384 - 192 tokens: the second message (9 sentences, 184 tokens with the system
    # prompt) fits alone but not with the first exchange (>= 23 tokens more).
    cmd = [sys.executable, "-m", "gemmakit", "chat", "--ctx-size", "384", "--max-new-tokens", "400", "-t", "0"]
    child = pexpect.spawn(
        cmd[0],
        cmd[1:],
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 200),
        env={"COLUMNS": "200", "TERM": "dumb", "PYTHONUNBUFFERED": "1"},
        # Ctrl-C must reach the chat even when the suite itself runs with SIGINT ignored (`make test &` from a
        # script: the child would inherit SIG_IGN, Python would install no KeyboardInterrupt handler, and the
        # reply would run to its end)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        child.expect("gemmakit chat")
        child.expect(PROMPT)
        # a reply streams; Ctrl-C stops it and the chat goes on
        child.sendline("Write a very long story about a dragon and a knight.")
        child.expect(r"\r\n\r\n")  # the reply starts on a fresh line
        child.expect(r"\S{3}")  # some text has streamed
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(PROMPT)
        child.sendline("/system Answer briefly.")
        child.expect(r"system prompt set")
        child.expect(PROMPT)
        # the next message no longer fits with the history: the oldest exchange is dropped, visibly
        child.sendline(" ".join(["Now tell me everything you know about castles, moats, towers and drawbridges in Europe."] * 9))
        child.expect(r"history trimmed: dropped the 1 oldest exchange")
        child.expect(r"\r\n\r\n")
        child.expect(r"\S{3}")
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(PROMPT)
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect("saved 3 messages")
        child.expect(PROMPT)
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.sendline(f"/load {saved}")
        child.expect("loaded 3 messages")
        child.sendline("/nonsense")
        child.expect("unknown command")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[0]["content"] == "Answer briefly." and "castles" in messages[1]["content"]
    assert messages[2]["content"].strip()  # the partial reply is kept
