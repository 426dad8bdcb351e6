"""Main text, title, date and language from an HTML page.

trafilatura does the first pass in its fast mode (no fallbacks), on a copy of the page from which
class/id-marked newsletter, share and related-story boxes are removed (it keeps those when they sit
inside the article element). Its output is checked against our own container extraction: the DOM
node that dominates the page's text after boilerplate is stripped. When the container holds far more
text than the fast pass, the fast pass has probably lost the content, and trafilatura runs again in
full mode, where it weighs its own result against readability's and jusText's: that full result is
kept when it is longer. Only then is the container itself considered. Listings, product pages and
forum threads are where trafilatura keeps too little (it drops link-heavy item lists and question
posts), so when the container still holds much more text we use it instead. On pages that declare
no type, the DOM region spanning trafilatura's paragraphs is taken when it is moderately larger: it
restores the headings and lists trafilatura dropped between them. What the page declares (schema.org
JSON-LD, og:type) picks the rule: articles trust trafilatura, product pages demand a much larger
surplus before switching (their containers carry related products and contact blocks), threads keep
their replies and skip the pre-pass (see ``_extract``). Lengths are counted in "units" (a CJK
character or a Latin word), because Chinese has no spaces and word counts would call a long article
short.

The full pass costs a second, slower trafilatura run (≈50 ms here) on the pages that trigger it: 74
of the 587 benchmark pages, mostly listings, threads and service pages. Declared articles whose whole
page text is under twice the fast pass skip the container too, as it cannot trigger there.
`bench.extraction` reports F1 by page type and speed against trafilatura's defaults.
"""

from __future__ import annotations

import re
import threading
from copy import deepcopy
from dataclasses import dataclass

import trafilatura
from htmldate import find_date
from lxml import etree
from lxml import html as lxml_html

from retrieval.decode import decode_body
from retrieval.tokenize import UNIT


@dataclass(frozen=True, slots=True)
class Extracted:
    title: str
    text: str
    date: str | None = None
    language: str | None = None


_MAX_CHARS = 5_000_000  # beyond this a "page" is a dump; parsing it would stall the fetcher

_DROP_TAGS = {
    "script", "style", "noscript", "template", "svg", "iframe", "form", "button", "select",
    "nav", "footer", "aside", "header", "menu", "dialog", "canvas", "video", "audio", "picture",
}  # fmt: skip
_CODE_TAGS = {"script", "style", "noscript", "template"}  # their text is code, never page text
_BLOCK_TAGS = {
    "p", "div", "section", "article", "main", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3",
    "h4", "h5", "h6", "blockquote", "pre", "table", "tr", "figure", "figcaption", "address", "hr",
    "details", "summary", "center", "td", "th", "tbody", "thead",
}  # fmt: skip
_BOILERPLATE = re.compile(
    r"(?:^|[\s_-])(?:nav|navbar|menu|breadcrumbs?|footer|sidebar|side-bar|cookie|consent|newsletter|"
    r"subscribe|social|share|sharing|related|recommended|promo|advert|ads?|banner|popup|modal|"
    r"masthead|site-header|skip|toolbar|pagination|signup|login)(?:$|[\s_-])",
    re.IGNORECASE,
)
_WS = re.compile(r"[ \t\r\f\v\u00a0\u200b\u3000]+")
# undecodable bytes and control characters: what binary junk decodes to, never content
_JUNK = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+")


def units(text: str) -> int:
    return len(UNIT.findall(text))


def clean_text(text: str) -> str:
    """Collapse runs of spaces, one paragraph per block separated by a blank line."""
    lines = (_WS.sub(" ", _JUNK.sub("", line)).strip() for line in text.splitlines())
    return "\n\n".join(line for line in lines if line)


def _attrs(el: etree._Element) -> str:
    return f"{el.get('class', '')} {el.get('id', '')} {el.get('role', '')}"


def _text_sizes(root: etree._Element) -> dict[etree._Element, int]:
    """Characters of text under each element, in one bottom-up pass (text_content() per node is quadratic)."""
    sizes: dict[etree._Element, int] = {}
    for el in reversed(list(root.iter())):
        n = len(el.text.strip()) if isinstance(el.tag, str) and el.text else 0
        for child in el:
            n += sizes.get(child, 0) + (len(child.tail.strip()) if child.tail else 0)
        sizes[el] = n
    return sizes


def _chars(el: etree._Element) -> int:
    """Characters of text under ``el``, ignoring whitespace around each text node."""
    return sum(len(t.strip()) for t in el.itertext())


def _strip_boilerplate(body: etree._Element) -> None:
    """Remove chrome: non-content tags, and class/id-marked blocks that do not hold most of the page."""
    sizes = _text_sizes(body)
    total = sizes[body] or 1
    doomed = []
    for el in body.iter():
        if (
            not isinstance(el.tag, str)
            or el.tag in _DROP_TAGS
            or el.get("aria-hidden") == "true"
            or el.get("hidden") is not None
        ):
            doomed.append(el)
        elif el.tag not in ("body", "main", "article") and _BOILERPLATE.search(_attrs(el)) and sizes[el] < 0.4 * total:
            # the size test keeps wrappers such as "has-sidebar" that enclose the whole page
            doomed.append(el)
    for el in doomed:
        if el.getparent() is not None:
            el.drop_tree()


_TRAILING_CHROME = re.compile(
    r"(?:^|[\s_-])(?:newsletter|subscribe|signup|share|sharing|social|related|recommended|"
    r"outbrain|taboola)(?:$|[\s_-])",
    re.IGNORECASE,
)


def _drop_marked(tree: etree._Element) -> None:
    """Remove class/id-marked newsletter boxes, share bars and related-story lists, which trafilatura
    keeps when they sit inside the article element. Code is dropped first so it does not count as text
    in the size guard, which spares page-wide wrappers such as "has-related-sidebar"."""
    body = tree.find(".//body")
    if body is None:
        return
    marked = [
        el
        for el in body.iter("*")
        if el.tag not in ("body", "main", "article")
        and (el.get("class") or el.get("id"))
        and _TRAILING_CHROME.search(_attrs(el))
    ]
    if not marked:  # nothing to remove: skip the size pass
        return
    # Tag-filtered iteration runs in C; a full Python pass over every node is what made this slow.
    for el in [*body.iter(*_CODE_TAGS), *body.iter(etree.Comment, etree.ProcessingInstruction)]:
        if el.getparent() is not None:
            el.drop_tree()
    total = _chars(body) or 1
    for el in marked:
        if el.getparent() is not None and _chars(el) < 0.2 * total:
            el.drop_tree()


def _container(body: etree._Element) -> etree._Element:
    """Descend while one child holds most of the remaining text: that child is the content."""
    sizes = _text_sizes(body)
    node = body
    while sizes[node]:
        best = max((c for c in node if isinstance(c.tag, str)), key=lambda c: sizes[c], default=None)
        if best is None or sizes[best] < 0.7 * sizes[node]:
            break
        node = best
    return node


# inline tags that style words in running text; any other inline element (span, a, label...) is a
# separate piece on screen (card titles, prices, brand names laid out by CSS), so it gets a space
_PHRASE_TAGS = {"b", "i", "em", "strong", "u", "s", "sup", "sub", "small", "mark", "abbr", "font", "code", "tt"}


_SPACED_PUNCT = re.compile(r" +(?=[,.;:!?])")


def _render(node: etree._Element) -> str:
    parts: list[str] = []

    def walk(el: etree._Element) -> None:
        block = el.tag in _BLOCK_TAGS
        if block:
            parts.append("\n")
        elif el.tag not in _PHRASE_TAGS:
            parts.append(" ")
        if el.tag == "br":
            parts.append("\n")
        if el.text:
            parts.append(el.text)
        for child in el:
            if isinstance(child.tag, str):
                walk(child)
            if child.tail:
                parts.append(child.tail)
        if block:
            parts.append("\n")
        elif el.tag not in _PHRASE_TAGS:
            parts.append(" ")

    walk(node)
    return _SPACED_PUNCT.sub("", clean_text("".join(parts)))


def stripped_body(tree: etree._Element) -> etree._Element:
    """A copy of the page's body without chrome, shared by the container and region candidates."""
    body = tree.find(".//body")
    body = deepcopy(tree if body is None else body)
    _strip_boilerplate(body)
    return body


def container_text(body: etree._Element) -> str:
    return _render(_container(body))


def _leaf_blocks(root: etree._Element) -> list[etree._Element]:
    """Block elements holding no other block, found in one bottom-up pass."""
    leaves, has_block = [], set()
    for el in reversed(list(root.iter())):
        if el.tag in _BLOCK_TAGS and el not in has_block:
            leaves.append(el)
        if (el.tag in _BLOCK_TAGS or el in has_block) and (parent := el.getparent()) is not None:
            has_block.add(parent)
    return leaves


def region_text(body: etree._Element, main: str) -> str:
    """Render the smallest region of the stripped body holding every paragraph trafilatura kept:
    the headings, lists and captions it dropped between them come back."""
    wanted = {_norm(line) for line in main.split("\n\n") if units(line) >= 3}
    hits = [el for el in _leaf_blocks(body) if _norm(el.text_content()) in wanted]
    if len(hits) < 2:
        return ""
    paths = [list(el.iterancestors())[::-1] + [el] for el in hits]
    common = body
    for level in zip(*paths):
        if any(node is not level[0] for node in level):
            break
        common = level[0]
    return _render(common)


_DATE_META = (
    "article:published_time", "datePublished", "date", "pubdate", "publishdate", "dc.date",
    "dc.date.issued", "og:published_time", "sailthru.date", "parsely-pub-date",
)  # fmt: skip


def _meta(tree: etree._Element, *names: str) -> str | None:
    wanted = {n.lower() for n in names}
    for m in tree.iter("meta"):
        key = (m.get("property") or m.get("name") or m.get("itemprop") or "").lower()
        if key in wanted and (content := (m.get("content") or "").strip()):
            return content
    return None


def _title(tree: etree._Element) -> str:
    title = _meta(tree, "og:title", "twitter:title")
    if not title:
        el = tree.find(".//title")
        title = el.text_content() if el is not None else ""
    if not title:
        el = tree.find(".//h1")
        title = el.text_content() if el is not None else ""
    return _WS.sub(" ", title).strip()


_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")


def _date(tree: etree._Element) -> str | None:
    """Declared publication date (meta tags, <time>), as YYYY-MM-DD; htmldate's heuristics only as a last resort."""
    raw = _meta(tree, *_DATE_META)
    if raw is None:
        time_el = tree.find(".//time[@datetime]")
        raw = time_el.get("datetime") if time_el is not None else None
    if raw and (m := _ISO_DATE.search(raw)):
        return "-".join(m.groups())
    try:
        return find_date(tree, extensive_search=False)
    except Exception:  # noqa: BLE001 -- htmldate is best effort; a date is never worth failing the page
        return None


def _language(tree: etree._Element) -> str | None:
    lang = tree.get("lang") or tree.get("xml:lang") or _meta(tree, "content-language", "og:locale")
    if not lang:
        return None
    return re.split(r"[-_]", lang.strip())[0].lower() or None


def _parse(html: str) -> etree._Element | None:
    html = html[:_MAX_CHARS].replace("\x00", "")
    if not html.strip():
        return None
    try:
        return lxml_html.document_fromstring(html)
    except (etree.ParserError, ValueError):
        return None


# One extraction at a time in the process. trafilatura and htmldate keep compiled lxml XPath objects
# and cleaners at module level, and lxml's XPath objects are not thread-safe: two fetch worker threads
# extracting at once crashed the interpreter (SIGABRT in libxml2 during htmldate's deepcopy while
# trafilatura pruned another tree). Extraction holds the GIL for most of its time anyway, so on a few
# cores serialising it costs little.
_EXTRACTION = threading.Lock()


def extract(html: str | bytes, url: str | None = None) -> Extracted:
    try:
        if isinstance(html, bytes):
            html = decode_body(html)
        with _EXTRACTION:
            tree = _parse(html)
            if tree is None:
                return Extracted(title="", text="")
            return _extract(tree, url)
    except Exception:  # noqa: BLE001 -- garbage input must degrade to "no text", never break a search
        return Extracted(title="", text="")


_LD_TYPE = re.compile(r'"@type"\s*:\s*(\[[^\]]*\]|"[^"]*")')
_ARTICLE_TYPE = re.compile(r"^(?:News|Blog|Scholarly|Tech|Report|ReportageNews)?(?:Article|Posting)$", re.IGNORECASE)
_PRODUCT_TYPES = {"product", "productgroup"}
# a thread's replies are what trafilatura calls comments; FAQ "Question"s are not threads, so not listed
_FORUM_TYPES = {"qapage", "discussionforumposting", "comment", "socialmediaposting"}
_MIN_ARTICLE_UNITS = 50
# every text node of the body outside code, in one C-level pass: an upper bound on any candidate's text
_PAGE_TEXT = etree.XPath(
    "//body//text()[not(ancestor::script or ancestor::style or ancestor::noscript or ancestor::template)]"
)


def _declared_types(tree: etree._Element) -> set[str]:
    """schema.org types from JSON-LD, plus og:type, lowercased.

    Microdata itemtypes are left out: listings mark each item up as a Product, which would make
    every shop category page look like a product page."""
    found: set[str] = set()
    for script in tree.iter("script"):
        if (script.get("type") or "").lower() == "application/ld+json" and script.text:
            for group in _LD_TYPE.findall(script.text):
                found.update(t.lower() for t in re.findall(r'"([^"]+)"', group))
    if og := (_meta(tree, "og:type") or "").lower():
        found.add("og:" + og)
    return found


def _is_article(types: set[str]) -> bool:
    return "og:article" in types or any(_ARTICLE_TYPE.match(t) for t in types if not t.startswith("og:"))


def _is_product(types: set[str]) -> bool:
    return bool(types & _PRODUCT_TYPES) or any(t.startswith("og:product") for t in types)


def _far_more(candidate_units: int, main_units: int, factor: int = 2) -> bool:
    """Does a candidate hold ``factor`` times trafilatura's text, plus a margin for stray chrome?"""
    return candidate_units >= factor * main_units + 20


def _for_trafilatura(tree: etree._Element, forum: bool) -> etree._Element:
    """A copy for trafilatura, which prunes the tree it is given."""
    pruned = deepcopy(tree)
    if not forum:
        # On WCXB's declared threads the pre-pass found nothing to remove but per-post share icons,
        # yet removing the page's code beforehand changed which posts trafilatura kept (0.86 → 0.66 F1
        # on one thread), so threads go to trafilatura as they are.
        _drop_marked(pruned)
    return pruned


def _extract(tree: etree._Element, url: str | None) -> Extracted:
    meta = Extracted(title=_title(tree), text="", date=_date(tree), language=_language(tree))
    types = _declared_types(tree)
    # comments only on threads, where the replies are the content; on news pages they are noise
    forum = bool(types & _FORUM_TYPES)
    options = {"url": url, "include_comments": forum, "include_tables": True}
    main = clean_text(trafilatura.extract(_for_trafilatura(tree, forum), fast=True, **options) or "")
    main_units = units(main)
    article = _is_article(types)
    if article and main_units >= _MIN_ARTICLE_UNITS and not _far_more(units(" ".join(_PAGE_TEXT(tree))), main_units):
        # the container is part of the page's text, so if the whole text is not far more, neither is the
        # container and the full pass below cannot trigger: most articles end here, without the cost of
        # stripping a copy of the page
        return _with_text(meta, _drop_title(tree, meta.title, main))
    body = stripped_body(tree)
    fallback = container_text(body)
    fallback_units = units(fallback)
    if _far_more(fallback_units, main_units) or (article and main_units < _MIN_ARTICLE_UNITS):
        full = clean_text(trafilatura.extract(_for_trafilatura(tree, forum), fast=False, **options) or "")
        if (full_units := units(full)) > main_units:
            main, main_units = full, full_units
    if article:
        text = main if main_units >= _MIN_ARTICLE_UNITS or fallback_units <= main_units else fallback
        return _with_text(meta, _drop_title(tree, meta.title, text))
    # listings and threads: trafilatura drops link-heavy items and question posts, so a container
    # holding twice the text (plus a margin for stray chrome) is the better answer. On product
    # pages the container's surplus is mostly related products and reviews, so demand far more.
    product = _is_product(types)
    factor = 4 if product else 2
    text = fallback if _far_more(fallback_units, main_units, factor) else main
    if text is main and not forum and not product:
        # pages that declare nothing (services, collections): trafilatura keeps the paragraphs but drops
        # the headings, spec lists and captions between them; the region spanning its paragraphs holds
        # them, and a modest surplus means that is what came back rather than a whole page of chrome
        region = region_text(body, main)
        if 1.2 * main_units <= units(region) <= 2.5 * main_units:
            text = region
    # a product's name heads its description (the name is what the page is about, and shoppers quote it);
    # an article's headline is the page's title, which every passage already carries
    return _with_text(meta, text if product else _drop_title(tree, meta.title, text))


def _norm(text: str) -> str:
    return " ".join(UNIT.findall(text.lower()))


def _drop_title(tree: etree._Element, title: str, text: str) -> str:
    """A first paragraph that repeats the page's headline is not body text: drop it."""
    first, _, rest = text.partition("\n\n")
    head = _norm(first)
    if not head or not rest:
        return text
    candidates = [title] + [el.text_content() for el in (tree.find(".//h1"), tree.find(".//title")) if el is not None]
    for candidate in map(_norm, candidates):
        # a headline inside a longer <title> ("Headline | Site") is most of it; a brand or section name
        # that opens the text ("L'atelier Nawbar" in "Necklace – L'atelier Nawbar") is a small part of it
        if candidate and (
            head == candidate or (len(head) > 10 and head in candidate and 2 * len(head) >= len(candidate))
        ):
            return rest
    return text


def _with_text(meta: Extracted, text: str) -> Extracted:
    return Extracted(title=meta.title, text=text, date=meta.date, language=meta.language)
