"""Search terms and token estimates shared by the local corpus index and the passage ranker.

Latin-script words are lower-cased, stop-word filtered and stemmed (Snowball English);
CJK text has no spaces, so each CJK character and each adjacent pair becomes a term,
the usual way to index Chinese without a segmenter.
"""

from __future__ import annotations

import re
from functools import lru_cache

import Stemmer

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# CJK ideographs, kana and hangul: scripts written without spaces between words.
CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_CJK = re.compile(f"[{CJK_CHARS}]")
# A unit of text for length and overlap measures: one CJK character, or a run of other word characters.
UNIT = re.compile(rf"[{CJK_CHARS}]|[^\W{CJK_CHARS}]+")
_STEMMER = Stemmer.Stemmer("english")
STOPWORDS = frozenset(
    """a an and are as at be but by for from has have he her his i if in into is it its of on or
    she so that the their them they this to was were what when where which who whom why will with
    you your how did do does""".split()
)


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    return _STEMMER.stemWord(word)


def terms(text: str) -> list[str]:
    out: list[str] = []
    for match in _WORD.finditer(text.lower()):
        word = match.group()
        if _CJK.search(word):
            out.extend(_cjk_terms(word))
        elif word not in STOPWORDS:
            out.append(_stem(word))
    return out


def _cjk_terms(word: str) -> list[str]:
    """Unigrams and bigrams over runs of CJK characters; Latin pieces inside stay words."""
    out: list[str] = []
    for piece in re.split(f"({_CJK.pattern}+)", word):
        if not piece:
            continue
        if _CJK.match(piece):
            out.extend(piece)
            out.extend(piece[i : i + 2] for i in range(len(piece) - 1))
        elif piece not in STOPWORDS:
            out.append(_stem(piece))
    return out


def estimate_tokens(text: str) -> int:
    """Token count estimate for a Llama-style BPE when the real tokenizer is not at hand.

    About one token per CJK character, four characters per token for other text; it errs
    high for English prose so packed context does not overflow the real budget.
    """
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 3) // 4
