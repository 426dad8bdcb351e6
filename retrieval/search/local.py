"""BM25 over a local corpus: the offline default, and the engine behind the test "fixture web".

The corpus is a folder of HTML/Markdown/text files (searched recursively) or a JSONL file of
``{"url", "title", "text", "published"?}`` documents. The index is built once and kept under
``index_dir`` in a folder named after a fingerprint of the corpus (paths, sizes, mtimes), so an
unchanged corpus loads without re-tokenising and a changed one is re-indexed.

A document's URL is the web address it declares (an absolute http(s) URL: a JSONL row's ``url``, a
Markdown front matter's ``canonical``/``url``, an HTML ``<link rel=canonical>``); without one it is named
by where it is in the corpus, ``corpus:nested/rivers.md`` or ``corpus:docs.jsonl:17`` (file and line).
Never a ``file:`` URL: results are shown to visitors, who have no business learning the server's paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bm25s
import lxml.html
import numpy as np

from retrieval.extract import extract
from retrieval.markdown import markdown_text
from retrieval.search.base import (
    BackendMisconfigured,
    TimeRange,
    check_time_range,
    corpus_url,
    is_web_url,
    normalize_url,
)
from retrieval.tokenize import terms
from retrieval.types import SearchResult

log = logging.getLogger(__name__)

# Bump when the stored layout or the way documents are read/tokenised changes (3: Markdown read as plain text).
INDEX_VERSION = 3
FILE_SUFFIXES = frozenset({".html", ".htm", ".md", ".markdown", ".txt"})
SNIPPET_CHARS = 300
_RANGE_DAYS = {"day": 1, "week": 7, "month": 31, "year": 366}


class LocalCorpusBackend:
    name = "local"

    def __init__(self, corpus_path: Path, index_dir: Path) -> None:
        self.corpus_path = Path(corpus_path)
        self.index_dir = Path(index_dir)
        self._index: _Index | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load or build the index now (blocking); searches do it on first use otherwise."""
        self._ensure()

    async def search(
        self, query: str, *, k: int, language: str | None = None, time_range: TimeRange | None = None
    ) -> list[SearchResult]:
        check_time_range(time_range)
        # The first call may build the index: seconds of CPU that must not stall the event loop.
        return await asyncio.to_thread(self.search_sync, query, k=k, time_range=time_range)

    def search_sync(self, query: str, *, k: int, time_range: TimeRange | None = None) -> list[SearchResult]:
        index = self._ensure()
        query_terms = list(dict.fromkeys(terms(query)))
        ids = index.bm25.get_tokens_ids(query_terms) if index.bm25 is not None else []
        if not ids:
            return []
        scores = index.bm25.get_scores_from_ids(ids)
        if time_range:
            cutoff = (datetime.now(UTC) - timedelta(days=_RANGE_DAYS[time_range])).timestamp()
            # Undated documents stay: nothing says they are stale.
            scores = np.where(np.isnan(index.published) | (index.published >= cutoff), scores, 0.0)
        # Extra candidates so duplicate URLs in the corpus do not leave the answer short.
        wanted = min(len(scores), 2 * k)
        top = np.argpartition(-scores, wanted - 1)[:wanted]
        top = top[np.argsort(-scores[top], kind="stable")]
        chosen: list[int] = []
        seen: set[str] = set()
        for i in top:
            if scores[i] <= 0 or len(chosen) == k:
                break
            key = index.url_keys[i]
            if key not in seen:
                seen.add(key)
                chosen.append(int(i))
        weights = {t: index.idf(t) for t in query_terms}
        results = []
        for rank, i in enumerate(chosen, start=1):
            doc = index.docs[i]
            results.append(
                SearchResult(
                    title=doc["title"],
                    url=doc["url"],
                    snippet=best_snippet(doc["text"], weights),
                    rank=rank,
                    engine=self.name,
                    published=doc.get("published"),
                )
            )
        return results

    def document(self, url: str) -> dict | None:
        """The stored ``{url, title, text, published}`` for a URL this backend returned."""
        index = self._ensure()
        i = index.by_url.get(normalize_url(url))
        return None if i is None else dict(index.docs[i])

    async def aclose(self) -> None:
        self._index = None

    def _ensure(self) -> _Index:
        if self._index is None:
            with self._lock:
                if self._index is None:
                    if not self.corpus_path.exists():
                        raise BackendMisconfigured(
                            self.name, f"corpus {self.corpus_path} does not exist (search.corpus_path)"
                        )
                    self._index = _open_index(self.corpus_path, self.index_dir)
        return self._index


@dataclass(slots=True)
class _Index:
    bm25: bm25s.BM25 | None  # None for an empty corpus
    docs: list[dict]
    published: np.ndarray  # POSIX seconds, NaN when unknown
    url_keys: list[str]  # normalised URL per document, for de-duplication
    by_url: dict[str, int]

    def idf(self, term: str) -> float:
        """Snippet weights: rarer query terms count for more."""
        tid = self.bm25.vocab_dict.get(term) if self.bm25 is not None else None
        if tid is None:
            return 0.0
        indptr = self.bm25.scores["indptr"]
        df = int(indptr[tid + 1] - indptr[tid])
        return math.log(1 + (len(self.docs) - df + 0.5) / (df + 0.5))


# --- building and persisting ------------------------------------------------------------


def corpus_fingerprint(corpus_path: Path) -> str:
    """Changes whenever a corpus file is added, removed, resized or touched."""
    h = hashlib.sha256(f"v{INDEX_VERSION}\0".encode() + os.fsencode(corpus_path.resolve()))
    for path in _corpus_files(corpus_path):
        st = path.stat()
        name = path.relative_to(corpus_path) if corpus_path.is_dir() else path.name
        h.update(b"\0" + os.fsencode(name) + f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def build_index(docs: list[dict]) -> bm25s.BM25:
    """BM25 over pre-tokenised documents, so bm25s sees exactly ``retrieval.tokenize.terms``."""
    vocab: dict[str, int] = {}
    ids = [[vocab.setdefault(t, len(vocab)) for t in terms(f"{doc['title']}\n{doc['text']}")] for doc in docs]
    bm25 = bm25s.BM25()
    bm25.index((ids, vocab), create_empty_token=False, show_progress=False)
    return bm25


def _open_index(corpus_path: Path, index_dir: Path) -> _Index:
    fingerprint = corpus_fingerprint(corpus_path)
    prefix = hashlib.sha256(os.fsencode(corpus_path.resolve())).hexdigest()[:12]
    folder = index_dir / f"{prefix}-{fingerprint[:24]}"
    if (folder / "meta.json").exists():
        try:
            return _load(folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("local index at %s is unreadable (%s); rebuilding", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    docs = read_corpus(corpus_path)
    log.info("indexing %d documents from %s", len(docs), corpus_path)
    bm25 = build_index(docs) if docs else None
    _save(folder, bm25, docs, fingerprint)
    for stale in index_dir.glob(f"{prefix}-*"):
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return _make_index(bm25, docs)


def _save(folder: Path, bm25: bm25s.BM25 | None, docs: list[dict], fingerprint: str) -> None:
    # Write beside the final folder and rename, so a crash or a second process never sees half an index.
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        if bm25 is not None:
            bm25.save(tmp / "bm25", show_progress=False)
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        meta = {"version": INDEX_VERSION, "fingerprint": fingerprint, "docs": len(docs)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
        # Another process finished the same index first; theirs is as good as ours.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> _Index:
    meta = json.loads((folder / "meta.json").read_text())
    with open(folder / "docs.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    if len(docs) != meta["docs"]:
        raise ValueError(f"expected {meta['docs']} documents, found {len(docs)}")
    bm25 = bm25s.BM25.load(folder / "bm25", show_progress=False) if docs else None
    return _make_index(bm25, docs)


def _make_index(bm25: bm25s.BM25 | None, docs: list[dict]) -> _Index:
    published = np.array([_timestamp(doc.get("published")) for doc in docs], dtype=np.float64)
    url_keys = [normalize_url(doc["url"]) for doc in docs]
    by_url: dict[str, int] = {}
    for i, key in enumerate(url_keys):
        by_url.setdefault(key, i)
    return _Index(bm25=bm25, docs=docs, published=published, url_keys=url_keys, by_url=by_url)


def _timestamp(value: str | None) -> float:
    if not value:
        return math.nan
    text = str(value).strip()
    try:
        when = datetime.fromisoformat(text if len(text) > 4 else f"{text}-01-01")
    except ValueError:
        return math.nan
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# --- reading the corpus -------------------------------------------------------------------


def _corpus_files(corpus_path: Path) -> list[Path]:
    if corpus_path.is_file():
        return [corpus_path]
    files = []
    for root, dirs, names in os.walk(corpus_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(
            Path(root) / n for n in sorted(names) if not n.startswith(".") and Path(n).suffix.lower() in FILE_SUFFIXES
        )
    return files


def read_corpus(corpus_path: Path) -> list[dict]:
    """Documents as ``{url, title, text, published}``; unreadable entries are logged and skipped."""
    if corpus_path.is_file():
        return _read_jsonl(corpus_path)
    docs = []
    for path in _corpus_files(corpus_path):
        try:
            doc = _read_file(path, path.relative_to(corpus_path).as_posix())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if doc["text"].strip():
            docs.append(doc)
    return docs


def _utf8(value: object) -> str:
    """``str(value)`` that UTF-8 can encode: JSON allows lone surrogates ("\\ud800"), the saved index does not."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                declared = _utf8(row["url"])
                doc = {
                    "url": declared if is_web_url(declared) else corpus_url(f"{path.name}:{n}"),
                    "title": _utf8(row.get("title") or ""),
                    "text": _utf8(row["text"]),
                    "published": _utf8(row["published"]) if row.get("published") else None,
                }
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("%s line %d: not a document (%s)", path, n, exc)
                continue
            docs.append(doc)
    return docs


def _read_file(path: Path, name: str) -> dict:
    """The document in the file at ``path``, ``name`` being its path inside the corpus."""
    url = corpus_url(name)
    # A file name that is not UTF-8 comes with lone surrogates, which the stored index cannot hold.
    stem = path.stem.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if path.suffix.lower() in (".html", ".htm"):
        return _read_html(path.read_bytes(), url, stem)
    text = path.read_text(encoding="utf-8", errors="replace")
    doc = {"url": url, "title": "", "text": text, "published": None}
    if path.suffix.lower() in (".md", ".markdown"):
        # Plain text, as a reader sees it; the front matter may name the title, the date and the page's URL.
        markdown = markdown_text(text)
        doc |= {"title": markdown.title, "text": markdown.text, "published": markdown.fields.get("date")}
        declared = markdown.fields.get("canonical") or markdown.fields.get("url") or ""
        if is_web_url(declared):
            doc["url"] = declared
    doc["title"] = doc["title"] or stem
    return doc


def _read_html(raw: bytes, url: str, fallback_title: str) -> dict:
    if not raw.strip():
        return {"url": url, "title": fallback_title, "text": "", "published": None}
    extracted = extract(raw, url)
    tree = lxml.html.fromstring(raw)
    canonical = tree.xpath('string(//link[translate(@rel, "CANONICAL", "canonical")="canonical"]/@href)').strip()
    title = extracted.title or (tree.findtext(".//title") or "").strip()
    text = extracted.text
    if not text.strip():
        # Pages too small for the main-text extractor still have words worth finding.
        body = tree.find(".//body")
        text = re.sub(r"\s+", " ", (body if body is not None else tree).text_content()).strip()
    return {
        "url": canonical if is_web_url(canonical) else url,
        "title": title or fallback_title,
        "text": text,
        "published": extracted.date,
    }


# --- snippets ------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|(?<=[。！？；])|\n+")


def _units(text: str) -> list[str]:
    """Sentences, with over-long ones cut into snippet-sized pieces."""
    out = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        while len(sentence) > SNIPPET_CHARS:
            cut = sentence.rfind(" ", SNIPPET_CHARS // 2, SNIPPET_CHARS)
            cut = cut if cut > 0 else SNIPPET_CHARS
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            out.append(sentence)
    return out


def best_snippet(text: str, weights: dict[str, float]) -> str:
    """The sentence that covers the most (idf-weighted) query terms, plus neighbours up to ~300 chars."""
    units = _units(text)
    if not units:
        return ""
    scored = [sum(weights.get(t, 0.0) for t in set(terms(u))) for u in units]
    best = max(range(len(units)), key=lambda i: (scored[i], -i))
    lo = hi = best
    size = len(units[best])
    # Grow forwards first (reads naturally), then backwards, while it fits.
    while hi + 1 < len(units) and size + 1 + len(units[hi + 1]) <= SNIPPET_CHARS:
        hi += 1
        size += 1 + len(units[hi])
    while lo > 0 and size + 1 + len(units[lo - 1]) <= SNIPPET_CHARS:
        lo -= 1
        size += 1 + len(units[lo])
    return " ".join(units[lo : hi + 1])
