"""Plain text from a Markdown document: what the local corpus indexes, shows and gives the model.

A Markdown file's raw text is not what a reader sees: ``# Eiffel Tower`` in a source card, ``**``
and ``[…](…)`` in a passage, and the title twice at the top of every passage (the passage puts the
title on its first line, and the heading that gave the title was still in the text). So the document
is parsed — markdown-it-py, the CommonMark reference parser's Python port, with GFM tables and
strikethrough — and only what it renders as text is kept: one line per block (paragraph line, list
item, heading, table row with its cells joined by `` | ``, as trafilatura writes HTML tables), code
as written, an image as its alt text, links as their text, inline HTML left out and HTML blocks as
their text. Headings keep their words (they name what follows, and a search for them should find
it); the heading that is the document's title is the title, not text.

Static-site front matter (Hugo, Jekyll: ``---`` lines around ``key: value`` pairs) is read first: it
carries the title, the date and the page's own URL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import lxml.html
from markdown_it import MarkdownIt
from markdown_it.token import Token

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.DOTALL)
_PARSER = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
_INLINE_TEXT = {"text": None, "code_inline": None, "image": None, "softbreak": "\n", "hardbreak": "\n"}


@dataclass(frozen=True, slots=True)
class MarkdownText:
    """A Markdown document as plain text.

    Example::

        doc = markdown_text("---\\ndate: 2024-05-01\\n---\\n# Eiffel Tower\\n\\nBuilt by **Eiffel**.")
        doc.title, doc.text, doc.fields  # "Eiffel Tower", "Built by Eiffel.", {"date": "2024-05-01"}
    """

    title: str  # the front matter's title, else the first heading; "" when there is neither
    text: str  # the body, one line per block, without the heading that is the title
    fields: dict[str, str]  # the front matter's fields, keys lower-cased (date, url, canonical, …)


def markdown_text(source: str) -> MarkdownText:
    """``source`` (a whole Markdown file) as title, plain text and front-matter fields."""
    fields: dict[str, str] = {}
    if match := _FRONT_MATTER.match(source):
        fields = {
            key.strip().lower(): value.strip().strip("'\"")
            for key, _, value in (line.partition(":") for line in match.group(1).splitlines())
            if value.strip()
        }
        source = source[match.end() :]
    blocks: list[tuple[bool, str]] = []  # (a heading, its text)
    row: list[str] | None = None  # the cells of the table row being read
    tokens = _PARSER.parse(source)
    for i, token in enumerate(tokens):
        if token.type == "inline":
            text = _inline_text(token.children or [])
            if row is not None:
                row.append(text)
            else:
                blocks.append((tokens[i - 1].type == "heading_open", text))
        elif token.type in ("fence", "code_block"):
            blocks.append((False, token.content.rstrip("\n")))
        elif token.type == "html_block" and token.content.strip():
            blocks.append((False, lxml.html.fragment_fromstring(token.content, create_parent="div").text_content()))
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and row is not None:
            blocks.append((False, " | ".join(row)))
            row = None
    headings = [i for i, (heading, _) in enumerate(blocks) if heading]
    title = fields.get("title") or (blocks[headings[0]][1] if headings else "")
    if headings and blocks[headings[0]][1] == title:
        del blocks[headings[0]]
    text = "\n".join(line for _, block in blocks for line in block.splitlines() if line.strip())
    return MarkdownText(title=title, text=text, fields=fields)


def _inline_text(children: list[Token]) -> str:
    # Emphasis, links and inline HTML are markup: only their text stays (an image's alt text is its text).
    return "".join(_INLINE_TEXT[c.type] or c.content for c in children if c.type in _INLINE_TEXT)
