"""The recipes end to end on small inputs: chunks tile the document, summaries of a document ten times the
context, retrieval of the right file, the cached index refreshed when a file changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmakit.errors import GemmaError
from gemmakit.recipes import Index, chunks, read_document, retrieve, summarize
from gemmakit.recipes.ask import INDEX_DIR, MANIFEST
from reference import texts


def _document(paragraphs: int = 30) -> str:
    """Paragraphs of varied sentences, one of them a single very long 'word' (forces the hardest cut)."""
    out = []
    for i in range(paragraphs):
        sentences = [f"Section {i} describes step {j} of building the dam on the river, which took the town "
                     f"{i + j} weeks of careful work." for j in range(4)]
        out.append(" ".join(sentences))
    out.insert(3, "x" * 3000)
    return "\n\n".join(out)


def test_chunks_tile_the_text_and_fit(fast_model):
    text = _document()
    size = lambda s: len(fast_model.tokenizer.encode(s, bos=False))  # noqa: E731
    spans = chunks(text, size, 120)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # no gap, no overlap
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(size(text[a:b]) <= 125 for a, b in spans)  # pieces counted one by one; joints may add a token
    ends = [text[b - 2:b] for a, b in spans[:-1] if "x" not in text[a:b]]
    assert sum(e.endswith(("\n\n", ". ")) for e in ends) >= len(ends) - 1  # cut at paragraphs and sentences


def test_summary_of_a_document_ten_times_the_context(fast_model):
    text = _document(11)
    n_tokens = len(fast_model.tokenizer.encode(text))
    seen, streamed = [], []
    result = summarize(text, model=fast_model, context=128, max_new_tokens=8, on_chunk=lambda d, t: seen.append(
        (d, t)), on_text=streamed.append)
    assert n_tokens >= 10 * 128
    assert len(result.chunks) >= 10 and seen[-1] == (len(result.chunks), len(result.chunks))
    assert "".join(text[a:b] for a, b in result.chunks) == text
    assert result.text and "".join(streamed).strip() == result.text
    assert len(result.partials) == len(result.chunks)


def test_refine_and_bad_input(fast_model):
    text = _document(2)
    result = summarize(text, model=fast_model, context=160, max_new_tokens=8, mode="refine")
    assert len(result.chunks) >= 2 and len(result.partials) == len(result.chunks) and result.text
    with pytest.raises(GemmaError, match="empty"):
        summarize("  \n", model=fast_model)
    with pytest.raises(GemmaError, match="--ctx"):
        summarize(text, model=fast_model, context=64, max_new_tokens=60)


def _docs(folder: Path) -> Path:
    folder.mkdir()
    (folder / "refunds.md").write_text("# Refunds\n\nCustomers may return a product within 30 days for a full "
                                       "refund. Opened software is exchanged, never refunded.\n")
    (folder / "shipping.md").write_text("# Shipping\n\nOrders leave the warehouse in Lyon within two business "
                                        "days. Express delivery costs 12 euros.\n")
    (folder / "notes.txt").write_text(texts()["prose"])
    return folder


def test_retrieval_finds_the_right_file_and_refreshes_on_change(tmp_path):
    docs = _docs(tmp_path / "docs")
    reindexed = []
    Index.open(docs, on_reindex=reindexed.append)
    assert sorted(reindexed) == ["notes.txt", "refunds.md", "shipping.md"]
    assert retrieve("How much does express delivery cost?", docs, k=2)[0].file == "shipping.md"
    assert retrieve("refund for opened software", docs, k=2)[0].file == "refunds.md"
    manifest = json.loads((docs / INDEX_DIR / MANIFEST).read_text())
    assert set(manifest["files"]) == {"notes.txt", "refunds.md", "shipping.md"}
    reindexed.clear()
    Index.open(docs, on_reindex=reindexed.append)
    assert reindexed == []  # unchanged files: the cached index is used as is
    (docs / "shipping.md").write_text("# Shipping\n\nParcels travel by zeppelin from Lyon.\n")
    Index.open(docs, on_reindex=reindexed.append)
    assert reindexed == ["shipping.md"]
    assert retrieve("zeppelin", docs, k=1)[0].file == "shipping.md"
    assert not retrieve("express delivery euros", docs, k=3) or all(
        p.file != "shipping.md" for p in retrieve("express delivery euros", docs, k=3))
    assert [p.name for p in (docs / INDEX_DIR).iterdir() if p.name.startswith("bm25-")].__len__() == 1
    assert not [p for p in (docs / INDEX_DIR).iterdir() if p.name.startswith(".tmp")]


def test_ask_cli_streams_an_answer_with_sources(tmp_path):
    docs = _docs(tmp_path / "docs")
    p = subprocess.run([sys.executable, "-m", "gemmakit", "ask", "How much does express delivery cost?", "--docs",
                        str(docs), "--k", "2", "-n", "12", "--show-sources"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("[shipping.md]") and "12 euros" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "gemmakit", "ask", "q", "--docs", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "not a folder" in bad.stderr


def _pdf(text: str) -> bytes:
    """A one-page PDF that shows `text` in Helvetica, with a correct cross-reference table."""
    stream = f"BT /F1 12 Tf 10 50 Td ({text}) Tj ET"
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 100] /Contents 4 0 R "
            "/Resources << /Font << /F1 5 0 R >> >> >>",
            f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_read_document_types(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nBody.")
    assert read_document(tmp_path / "a.md") == "# Title\n\nBody."
    (tmp_path / "b.docx").write_bytes(b"PK")
    with pytest.raises(GemmaError, match="unsupported"):
        read_document(tmp_path / "b.docx")
    pypdf = pytest.importorskip("pypdf")
    (tmp_path / "c.pdf").write_bytes(_pdf("Hello from a PDF page"))
    assert read_document(tmp_path / "c.pdf") == "Hello from a PDF page"
    writer = pypdf.PdfWriter()
    writer.add_blank_page(72, 72)
    with open(tmp_path / "blank.pdf", "wb") as f:
        writer.write(f)
    with pytest.raises(GemmaError, match="no extractable text"):
        read_document(tmp_path / "blank.pdf")
