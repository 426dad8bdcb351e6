"""Bytes to text for fetched pages and files: BOM, declared charset, then detection."""

from __future__ import annotations

import codecs
import re

from charset_normalizer import from_bytes

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([\w.:-]+)""", re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
# Pages labelled with a subset charset routinely contain characters of its superset.
_SUPERSETS = {"gb2312": "gb18030", "gbk": "gb18030", "ascii": "utf-8", "iso-8859-1": "cp1252", "latin-1": "cp1252"}


def _normalise(label: str) -> str | None:
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    return _SUPERSETS.get(name, _SUPERSETS.get(label.lower(), name))


def declared_charset(body: bytes, content_type: str | None = None) -> str | None:
    if content_type and (m := _HEADER_CHARSET.search(content_type)):
        return _normalise(m.group(1))
    if m := _META_CHARSET.search(body[:4096]):
        return _normalise(m.group(1).decode("ascii", "ignore"))
    return None


def decode_body(body: bytes, content_type: str | None = None) -> str:
    """Decode a page body; a declared charset that does not fit the bytes is not trusted."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if body.startswith(bom):
            return body.decode(enc, errors="replace")
    candidates = [declared_charset(body, content_type), "utf-8"]
    for enc in candidates:
        if enc:
            try:
                return body.decode(enc)
            except (UnicodeDecodeError, LookupError):
                continue
    best = from_bytes(body[:200_000]).best()
    if best is not None and best.encoding:
        enc = _normalise(best.encoding) or best.encoding
        return body.decode(enc, errors="replace")
    return body.decode("utf-8", errors="replace")
