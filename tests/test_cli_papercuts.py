"""What a new user hits first (issue 24): bad numbers on the command line, /save to a bad path in `chat`, one
unreadable file in `ask --docs`, `convert -o` to a path that cannot take the output, and `guard` with a model that
is not a classifier. Each is a clear one-line error (or warning), never a traceback, and nothing is lost.

Commands run in-process through gemmakit.cli.main, as the console script does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from gemmakit.cli import main
from gemmakit.cli.chat import Session, _command
from gemmakit.cli.convert import check_output
from gemmakit.errors import GemmaError
from gemmakit.recipes.ask import Index
from gemmakit.safety import Guard
from gemmakit.safety.guard import known_classifier


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `gemmakit ARGS`."""
    monkeypatch.setattr(sys, "argv", ["gemmakit", *args])
    monkeypatch.setenv("COLUMNS", "200")
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, message", [
    (["--seed", "99999999999999999999999"], "seed must be an integer in"),
    (["--seed", str(2**64)], "seed"),
    (["-t", "nan"], "temperature"),
    (["-t", "inf"], "temperature"),
    (["-t", "-1"], "temperature"),
    (["--top-p", "nan"], "top_p"),
    (["--repetition-penalty", "1e-300"], "repetition_penalty"),
])  # fmt: skip
def test_run_and_chat_refuse_bad_numbers_cleanly(monkeypatch, capsys, args, message):
    code, _, err = cli(monkeypatch, capsys, "run", "Hello", *args)
    assert code == 1 and message in err and "Traceback" not in err, err
    code, _, err = cli(monkeypatch, capsys, "chat", *args)  # before the model loads and the prompt opens
    assert code == 1 and message in err and "Traceback" not in err, err


def test_run_tiny_temperature_is_greedy(monkeypatch, capsys, fast_model):
    code, out, err = cli(
        monkeypatch, capsys, "run", "The capital of France is", "-t", "1e-300", "-n", "4", "--no-stats"
    )
    assert code == 0, err
    assert out == "The capital of France is" + fast_model.generate("The capital of France is", 4).text + "\n"


def test_chat_save_errors_keep_the_session(tmp_path: Path, embedded_model):
    session = Session(embedded_model, context=256, max_new_tokens=8, sampling={}, system="Be brief.")
    session.history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    err = Console(stderr=True)
    (tmp_path / "afile").write_text("x")
    for bad, message in (
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "c.json", "does not exist"),
        (tmp_path / "afile" / "c.json", "does not exist"),
    ):
        with pytest.raises(GemmaError, match=message):  # the chat loop prints it and carries on
            _command(session, f"/save {bad}", err)
    assert len(session.history) == 2 and not list(tmp_path.glob(".*tmp"))
    _command(session, f"/save {tmp_path / 'c.json'}", err)
    saved = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert saved == session.messages() and saved[0]["role"] == "system"


def test_ask_skips_unreadable_files(tmp_path: Path, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("Express delivery costs 12 euros and takes one day.\n")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (docs / "locked.md").write_text("secret")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.md":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    skipped = []
    index = Index.open(docs, on_skip=lambda rel, why: skipped.append((rel, why)))
    assert [rel for rel, _ in skipped] == ["latin1.txt", "locked.md"]
    assert "not UTF-8" in skipped[0][1] and skipped[1][1] == "Permission denied"
    assert set(index.files) == {"good.md"} and set(index.skipped) == {"latin1.txt", "locked.md"}
    assert index.search("express delivery")[0].file == "good.md"


def test_ask_cli_warns_once_per_file_and_counts(tmp_path: Path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("Express delivery costs 12 euros and takes one day.\n")
    (docs / "bad.txt").write_bytes(b"\xff\xfe\x00broken")
    code, _, err = cli(
        monkeypatch, capsys, "ask", "How much is express delivery?", "--docs", str(docs), "-n", "2"
    )
    assert code == 0, err
    assert err.count("skipped bad.txt") == 1 and "1 file(s) skipped" in err and "Traceback" not in err


def test_convert_checks_the_output_first(tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "exists.gguf").write_bytes(b"GGUF")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for args, message in (
        ([str(tmp_path)], "is a folder"),
        ([str(tmp_path / "exists.gguf")], "--force"),
        ([str(tmp_path / "afile" / "m.gguf")], "is a file, not a folder"),
        ([str(tmp_path / "hf"), "--to", "hf"], "--force"),
        ([str(tmp_path / "afile"), "--to", "hf"], "writes a folder"),
    ):
        code, _, err = cli(monkeypatch, capsys, "convert", "-o", *args)  # fails before loading anything
        assert code == 1 and message in err and "Traceback" not in err, (args, err)
    assert (tmp_path / "exists.gguf").read_bytes() == b"GGUF"
    check_output(tmp_path / "exists.gguf", "gguf", force=True)
    check_output(tmp_path / "new" / "deeper" / "m.gguf", "gguf", force=False)  # folders are created
    check_output(tmp_path / "hf2", "hf", force=False)


def test_convert_creates_missing_folders(tmp_path: Path, monkeypatch, capsys):
    from finetune_helpers import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "m", "gemma3", query_pre_attn_scalar=32.0)
    out = tmp_path / "a" / "b" / "m.gguf"
    code, _, err = cli(monkeypatch, capsys, "convert", "-m", str(folder), "-o", str(out), "--type", "f32")
    assert code == 0 and out.is_file(), err
    code, _, err = cli(monkeypatch, capsys, "convert", "-m", str(folder), "-o", str(out))
    assert code == 1 and "--force" in err


# ---- guard: say when the model is not a classifier ---------------------------------------------------------


def test_known_classifier_by_name(embedded_model):
    assert not known_classifier(embedded_model)
    for name in ("ShieldGemma 2b", "google/shieldgemma-2b", "shield-gemma-9b"):
        embedded_model.module.config = embedded_model.config.replace(name=name)
        try:
            assert known_classifier(embedded_model), name
        finally:
            embedded_model.module.config = embedded_model.config.replace(name="gemma-3-270m")


def test_guard_result_carries_the_warning(embedded_model):
    result = Guard(embedded_model, "hate")("What is the capital of France?")
    assert not result.classifier and "not known to be a ShieldGemma" in result.warning
    assert result.to_dict()["warning"] == result.warning
    trusted = Guard(embedded_model, "hate", classifier=True)("What is the capital of France?")
    assert trusted.classifier and trusted.warning is None and trusted.scores == result.scores


def test_guard_cli_without_a_model_gives_scores_but_no_verdict(monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "guard", "What is the capital of France?", "-p", "hate")
    assert code == 0 and "hate" in out and "violates" not in out and " ok" not in out
    assert "not known to be a ShieldGemma" in err and "no verdict" in err and "-m shieldgemma" in err
    code, out, err = cli(
        monkeypatch, capsys, "guard", "What is the capital of France?", "-p", "hate", "--json"
    )
    data = json.loads(out)
    assert data["flagged"] is None and data["violations"] is None and data["classifier"] is False
    assert "not known to be a ShieldGemma" in err


def test_serve_logs_a_moderator_that_is_no_classifier(embedded_model, caplog):
    import logging

    from gemmakit.serve.moderation import Moderator
    from test_serve import running_server, tiny_model

    moderator = Moderator(Guard(embedded_model, "hate"), inputs=True, outputs=False)
    with caplog.at_level(logging.WARNING, logger="gemmakit.serve"):
        with running_server({"tiny": tiny_model(embedded_model.tokenizer)}, moderator=moderator, context=64):
            pass
    assert "moderation:" in caplog.text and "not known to be a ShieldGemma" in caplog.text
