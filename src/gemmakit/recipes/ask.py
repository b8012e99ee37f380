"""Search-augmented answers over a folder of documents: a BM25 index (bm25s) cached beside them, and with an
embedding model a dense index too (vectors.py), fused with BM25 by reciprocal rank fusion ("hybrid").

Documents (.md, .txt, .rst, and .pdf with pypdf) are cut into passages of about PASSAGE_WORDS words at paragraph
and sentence boundaries. The index lives in DOCS/.gemmakit-index/: a manifest (current.json) with each file's
sha256 and passages, and the bm25s matrices in a folder named after the manifest's content. A changed, added or
removed file is noticed by its hash and only it is re-read; the BM25 statistics are rebuilt over all passages
(they are global). Writes are atomic: the matrices go to a fresh folder, then the manifest is replaced with
os.replace, so a reader sees the old index or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..api import Model
from ..embed import EmbeddingModel
from ..errors import GemmaError
from .documents import DOC_SUFFIXES, chunks, read_document
from .vectors import DenseIndex, fuse

INDEX_DIR = ".gemmakit-index"
MANIFEST = "current.json"
VERSION = 1
PASSAGE_WORDS = 120
RETRIEVALS = ("bm25", "dense", "hybrid")
FUSION_DEPTH = 50  # hybrid: how deep each ranking goes before fusion (at least 10 x k)
PLAIN_PROMPT = ("Answer the question using only the sources below. After each fact, cite its source file in "
                "brackets, like [notes.md].\n\n{sources}\n\nQuestion: {question}\nAnswer:")


@dataclass
class Passage:
    file: str  # path relative to the docs folder
    start: int  # character offset in the file's text
    text: str
    score: float = 0.0


@dataclass
class Answer:
    text: str
    sources: list[Passage]


def _words(text: str) -> int:
    return len(text.split())


def _files(docs: Path) -> dict[str, Path]:
    if not docs.is_dir():
        raise GemmaError(f"--docs {docs} is not a folder; give the folder that holds your .md/.txt/.pdf files")
    found = {p.relative_to(docs).as_posix(): p for p in sorted(docs.rglob("*"))
             if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(docs).parts)}
    if not found:
        raise GemmaError(f"{docs} has no .md, .txt, .rst or .pdf files to search")
    return found


def _passages(path: Path) -> list[dict]:
    text = read_document(path)
    return [{"start": a, "text": text[a:b].strip()} for a, b in chunks(text, _words, PASSAGE_WORDS)
            if text[a:b].strip()]


class Index:
    """The passages of a docs folder and their BM25 index; `Index.open(docs)` builds or refreshes the cache."""

    def __init__(self, docs: Path, files: dict[str, dict], retriever, skipped: dict[str, str] | None = None) -> None:
        self.docs, self.files, self.retriever = docs, files, retriever
        self.skipped = skipped or {}  # file -> why it could not be read (unreadable, not UTF-8, a broken PDF)
        self.passages = [Passage(rel, p["start"], p["text"]) for rel, f in files.items() for p in f["passages"]]
        self.dense: DenseIndex | None = None  # set by open(embedder=...): one vector per passage, same order

    @classmethod
    def open(cls, docs: str | Path, *, on_reindex: Callable[[str], None] | None = None,
             on_skip: Callable[[str, str], None] | None = None, embedder: EmbeddingModel | None = None,
             on_embed: Callable[[str], None] | None = None) -> Index:
        """The folder's index, refreshed for changed files. A file that cannot be read (permissions, not UTF-8, a
        broken PDF) is left out, reported to `on_skip(file, reason)` and listed in `.skipped`: one bad file in a
        folder of many must not stop the rest. With `embedder`, passage vectors are built or refreshed as well
        (only files whose sha256 changed are embedded again)."""
        index = cls._open_bm25(Path(docs), on_reindex, on_skip)
        if embedder is not None:
            index.dense = DenseIndex.open(Path(docs) / INDEX_DIR, index.files, embedder, on_embed)
        return index

    @classmethod
    def _open_bm25(cls, docs: Path, on_reindex: Callable[[str], None] | None,
                   on_skip: Callable[[str, str], None] | None) -> Index:
        import bm25s

        root = docs / INDEX_DIR
        old = _read_manifest(root)
        files, skipped, changed = {}, {}, False
        for rel, path in _files(docs).items():
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                known = old.get("files", {}).get(rel)
                if known is not None and known["sha256"] == digest:
                    files[rel] = known
                    continue
                if on_reindex is not None:
                    on_reindex(rel)
                files[rel] = {"sha256": digest, "passages": _passages(path)}
            except (OSError, GemmaError) as e:
                skipped[rel] = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                if on_skip is not None:
                    on_skip(rel, skipped[rel])
                continue
            changed = True
        changed |= set(files) != set(old.get("files", {}))
        if not changed and (root / old.get("bm25", "-")).is_dir():
            return cls(docs, files, bm25s.BM25.load(str(root / old["bm25"]), show_progress=False), skipped)
        index = cls(docs, files, None, skipped)
        if not index.passages:
            raise GemmaError(f"{docs}: the documents have no text to search"
                             + (f" ({len(skipped)} file(s) could not be read)" if skipped else ""))
        retriever = bm25s.BM25()
        retriever.index(_tokens([p.text for p in index.passages]), show_progress=False)
        index.retriever = retriever
        _write(root, files, retriever)
        return index

    def search(self, query: str, k: int = 4, *, retrieval: str = "bm25") -> list[Passage]:
        """The k best passages for `query`, best first. retrieval: "bm25" (fewer when fewer match any query word),
        "dense" (nearest passage vectors) or "hybrid" (both rankings fused by reciprocal rank; `score` is the fused
        score). Dense and hybrid need the index opened with an embedder."""
        if k < 1:
            raise GemmaError(f"--k must be at least 1, got {k}")
        if retrieval not in RETRIEVALS:
            raise GemmaError(f"unknown retrieval {retrieval!r}; choose one of {', '.join(RETRIEVALS)}")
        if retrieval != "bm25" and self.dense is None:
            raise GemmaError(f"retrieval {retrieval!r} needs an embedding model: pass --embed-model PATH "
                             "(e.g. an EmbeddingGemma folder)")
        if retrieval == "bm25":
            hits = self._bm25(query, k, strict=True)
        elif retrieval == "dense":
            hits = self.dense.search(query, k)
        else:
            depth = max(FUSION_DEPTH, 10 * k)
            rankings = [[i for i, _ in self._bm25(query, depth, strict=False)],
                        [i for i, _ in self.dense.search(query, depth)]]
            hits = fuse(rankings)[:k]
        return [Passage(**{**asdict(self.passages[i]), "score": s}) for i, s in hits]

    def _bm25(self, query: str, n: int, *, strict: bool) -> list[tuple[int, float]]:
        words = _tokens([query])
        if not words[0]:
            if strict:
                raise GemmaError("the question has no searchable words; ask with a few keywords")
            return []
        ids, scores = self.retriever.retrieve(words, k=min(n, len(self.passages)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)


def _read_manifest(root: Path) -> dict:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("version") == VERSION else {}


def _write(root: Path, files: dict[str, dict], retriever) -> None:
    """Matrices into a new folder, then the manifest replaced atomically; stale folders removed after."""
    root.mkdir(exist_ok=True)
    body = json.dumps({"version": VERSION, "files": files}, sort_keys=True)
    name = "bm25-" + hashlib.sha256(body.encode()).hexdigest()[:16]
    if not (root / name).is_dir():
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        retriever.save(str(tmp), show_progress=False)
        os.replace(tmp, root / name)
    fd, tmp_manifest = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"version": VERSION, "files": files, "bm25": name}, f)
    os.replace(tmp_manifest, root / MANIFEST)
    for stale in root.glob("bm25-*"):
        if stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)


def retrieve(question: str, docs: str | Path, *, k: int = 4, retrieval: str | None = None,
             embedder: EmbeddingModel | None = None) -> list[Passage]:
    """The k passages of the docs folder that best match the question, best first: BM25, or with an embedding
    model hybrid (default) or dense."""
    retrieval = retrieval or ("hybrid" if embedder is not None else "bm25")
    return Index.open(docs, embedder=embedder if retrieval != "bm25" else None).search(question, k,
                                                                                       retrieval=retrieval)


def prompt(model: Model, question: str, sources: list[Passage], *, chat: bool = False) -> list[int]:
    """The question with its sources, each headed by its file name in brackets (what the answer cites)."""
    blocks = "\n\n".join(f"[{p.file}]\n{p.text}" for p in sources) or "(no source matched the question)"
    body = PLAIN_PROMPT.format(sources=blocks, question=question.strip())
    if chat:
        return model.chat_ids([{"role": "user", "content": body}])
    return model.encode(body)


def ask(question: str, docs: str | Path, *, model: Model | None = None, k: int = 4, max_new_tokens: int = 200,
        chat: bool = False, on_text: Callable[[str], None] | None = None, retrieval: str | None = None,
        embedder: EmbeddingModel | None = None, **sampling) -> Answer:
    """Answer `question` from the documents in `docs` (default model: the embedded one). on_text(piece)
    receives the answer as it is generated; the Answer carries the passages it was given. With `embedder` (an
    EmbeddingModel) retrieval is hybrid by default; `retrieval` picks "bm25", "dense" or "hybrid"."""
    if not question.strip():
        raise GemmaError("the question is empty")
    if model is None:
        from ..loader import load

        model = load(progress=False)
    sources = retrieve(question, docs, k=k, retrieval=retrieval, embedder=embedder)
    ids = prompt(model, question, sources, chat=chat)
    budget = model.config.max_position_embeddings - max_new_tokens
    while len(ids) > budget and len(sources) > 1:  # keep the best passages that fit
        sources = sources[:-1]
        ids = prompt(model, question, sources, chat=chat)
    stop = None if chat else ["\nQuestion:", "\n\n\n"]
    pieces = []
    for piece in model.stream(ids, max_new_tokens, stop=stop, **sampling):
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
    return Answer("".join(pieces).strip(), sources)
