"""Main text, title, date and language from an HTML page."""

from __future__ import annotations

from dataclasses import dataclass

import trafilatura

from retrieval.decode import decode_body


@dataclass(frozen=True, slots=True)
class Extracted:
    title: str
    text: str
    date: str | None = None
    language: str | None = None


def extract(html: str | bytes, url: str | None = None) -> Extracted:
    if isinstance(html, bytes):
        html = decode_body(html)
    doc = trafilatura.bare_extraction(html, url=url, with_metadata=True)
    if doc is None:
        return Extracted(title="", text="")
    return Extracted(title=doc.title or "", text=doc.text or "", date=doc.date, language=doc.language)
