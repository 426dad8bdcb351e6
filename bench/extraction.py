"""Main-text extraction benchmark: trafilatura's defaults against ours, in one run.

Datasets (read in place from the shared data folder, see its README):
  aeb       4-word shingles of lowercase \\w+ tokens, P and R averaged over pages, F1 of the averages
  wcxb-dev  bag-of-words F1 of lowercase \\w+ tokens averaged per page, by page type, plus the
            share of `with` snippets found and of `without` snippets leaked
  zh        as aeb, but each CJK character is a token (Latin words stay whole)

Both extractors get the same decoded text; decoding is shared work and is not timed.

    python -m bench.extraction [--limit N] [--split even|odd|all] [--json] [--data DIR]

--split keeps half of each set, for tuning on one half and checking on the other: wcxb pages by
the parity of their numeric id, aeb and zh pages by the parity of their position in sorted id order.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trafilatura

from retrieval.decode import decode_body
from retrieval.extract import extract
from retrieval.tokenize import UNIT

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "extraction"

_WORD = re.compile(r"\w+")


@dataclass(slots=True)
class Page:
    id: str
    html: str
    gold: str
    url: str | None = None
    page_type: str = ""
    with_: list[str] = field(default_factory=list)
    without: list[str] = field(default_factory=list)


def _decode_file(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return decode_body(raw)


SPLITS = ("all", "even", "odd")


def _split(ids: Iterable[str], split: str, parity: Callable[[int, str], int]) -> list[str]:
    ordered = sorted(ids)
    if split == "all":
        return ordered
    want = 0 if split == "even" else 1
    return [i for pos, i in enumerate(ordered) if parity(pos, i) % 2 == want]


def _by_position(pos: int, _id: str) -> int:
    return pos


def _by_number(_pos: int, page_id: str) -> int:
    return int(page_id)


def load_aeb(root: Path, limit: int | None, split: str = "all") -> list[Page]:
    truth = json.loads((root / "ground-truth.json").read_text(encoding="utf-8"))
    ids = _split(truth, split, _by_position)[:limit]
    return [
        Page(i, _decode_file(root / "html" / f"{i}.html.gz"), truth[i]["articleBody"], truth[i].get("url")) for i in ids
    ]


def load_wcxb(root: Path, limit: int | None, split: str = "all") -> list[Page]:
    meta = json.loads((root / "metadata.json").read_text(encoding="utf-8"))["files"]
    pages = []
    for i in _split(meta, split, _by_number)[:limit]:
        doc = json.loads((root / "ground-truth" / f"{i}.json").read_text(encoding="utf-8"))
        gt = doc["ground_truth"]
        pages.append(
            Page(
                i,
                _decode_file(root / "html" / f"{i}.html.gz"),
                gt.get("main_content") or "",
                doc.get("url"),
                meta[i]["page_type"],
                list(gt.get("with") or []),
                list(gt.get("without") or []),
            )
        )
    return pages


def load_zh(root: Path, limit: int | None, split: str = "all") -> list[Page]:
    truth = json.loads((root / "eval" / "cleaned_ground.json").read_text(encoding="utf-8"))
    ids = _split(truth, split, _by_position)[:limit]
    return [
        Page(i, _decode_file(root / "original" / f"{i}.html"), truth[i]["articleBody"], truth[i].get("url"))
        for i in ids
    ]


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def zh_tokens(text: str) -> list[str]:
    return UNIT.findall(text.lower())


def shingles(tokens: list[str], n: int = 4) -> Counter[tuple[str, ...]]:
    if len(tokens) < n:
        return Counter([tuple(tokens)]) if tokens else Counter()
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def overlap_pr(pred: Counter, gold: Counter) -> tuple[float, float]:
    """Multiset precision and recall; an empty prediction scores 0 on both (no credit for abstaining)."""
    tp = sum((pred & gold).values())
    p_total, g_total = sum(pred.values()), sum(gold.values())
    if not p_total:
        return (1.0, 1.0) if not g_total else (0.0, 0.0)
    return tp / p_total, (tp / g_total if g_total else 1.0)


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def contains(haystack_tokens: str, snippet: str) -> bool:
    """Snippet match on the token stream, so punctuation and spacing differences do not count."""
    needle = " ".join(words(snippet))
    return bool(needle) and f" {needle} " in haystack_tokens


def run(pages: list[Page]) -> dict[str, tuple[list[str], float]]:
    """Every extractor on every page, interleaved page by page (first one, then the other, the order
    alternating), so machine load that drifts during the run weighs on both timings alike."""
    outputs: dict[str, list[str]] = {name: [] for name in EXTRACTORS}
    seconds: dict[str, float] = dict.fromkeys(EXTRACTORS, 0.0)
    order = list(EXTRACTORS.items())
    for i, page in enumerate(pages):
        for name, fn in order if i % 2 == 0 else reversed(order):
            start = time.perf_counter()
            out = fn(page)
            seconds[name] += time.perf_counter() - start
            outputs[name].append(out or "")
    return {name: (outputs[name], seconds[name]) for name in EXTRACTORS}


def score_shingles(pages: list[Page], outputs: list[str], tokenize: Callable[[str], list[str]]) -> dict[str, float]:
    ps, rs = [], []
    for page, out in zip(pages, outputs, strict=True):
        p, r = overlap_pr(shingles(tokenize(out)), shingles(tokenize(page.gold)))
        ps.append(p)
        rs.append(r)
    p, r = sum(ps) / len(ps), sum(rs) / len(rs)
    return {"p": p, "r": r, "f1": f1(p, r), "n": len(pages)}


def score_wcxb(pages: list[Page], outputs: list[str]) -> dict[str, dict[str, float]]:
    by_type: dict[str, list[tuple[float, float, float, float, float]]] = defaultdict(list)
    for page, out in zip(pages, outputs, strict=True):
        p, r = overlap_pr(Counter(words(out)), Counter(words(page.gold)))
        stream = " " + " ".join(words(out)) + " "
        found = [contains(stream, s) for s in page.with_ if words(s)]
        leaked = [contains(stream, s) for s in page.without if words(s)]
        row = (
            p,
            r,
            f1(p, r),
            sum(found) / len(found) if found else float("nan"),
            sum(leaked) / len(leaked) if leaked else float("nan"),
        )
        by_type[page.page_type].append(row)
        by_type["ALL"].append(row)
    result = {}
    for kind, rows in by_type.items():
        cols = list(zip(*rows))

        def mean(xs: Iterable[float]) -> float:
            vals = [x for x in xs if not math.isnan(x)]
            return sum(vals) / len(vals) if vals else float("nan")

        result[kind] = {
            "p": mean(cols[0]),
            "r": mean(cols[1]),
            "f1": mean(cols[2]),
            "with": mean(cols[3]),
            "without": mean(cols[4]),
            "n": len(rows),
        }
    return result


def trafilatura_default(page: Page) -> str:
    return trafilatura.extract(page.html, url=page.url) or ""


def ours(page: Page) -> str:
    return extract(page.html, url=page.url).text


EXTRACTORS: dict[str, Callable[[Page], str]] = {"trafilatura": trafilatura_default, "ours": ours}


def evaluate(data: Path, limit: int | None, split: str = "all") -> dict:
    sets = {
        "aeb": (load_aeb(data / "aeb", limit, split), lambda ps, outs: score_shingles(ps, outs, words)),
        "wcxb-dev": (load_wcxb(data / "wcxb-dev", limit, split), score_wcxb),
        "zh": (load_zh(data / "zh", limit, split), lambda ps, outs: score_shingles(ps, outs, zh_tokens)),
    }
    report: dict = {"split": split, "sets": {}, "speed": {}}
    seconds: dict[str, float] = defaultdict(float)
    count = 0
    for name, (pages, scorer) in sets.items():
        report["sets"][name] = {}
        count += len(pages)
        for ex_name, (outputs, spent) in run(pages).items():
            seconds[ex_name] += spent
            report["sets"][name][ex_name] = scorer(pages, outputs)
    for ex_name in EXTRACTORS:
        report["speed"][ex_name] = {
            "pages": count,
            "seconds": seconds[ex_name],
            "pages_per_s": count / seconds[ex_name],
        }
    report["speed"]["ratio_ours_over_trafilatura"] = (
        report["speed"]["ours"]["pages_per_s"] / report["speed"]["trafilatura"]["pages_per_s"]
    )
    return report


def print_table(report: dict) -> None:
    names = list(EXTRACTORS)
    print(f"split: {report['split']}")
    print(f"{'set':<22}{'n':>5}  " + "  ".join(f"{n + ' P/R/F1':>26}" for n in names))
    for set_name, by_ex in report["sets"].items():
        if set_name == "wcxb-dev":
            kinds = sorted(by_ex[names[0]], key=lambda k: (k != "ALL", k))
            for kind in kinds:
                label = f"wcxb-dev {kind}"
                n = by_ex[names[0]][kind]["n"]
                cells = []
                for ex in names:
                    m = by_ex[ex][kind]
                    cells.append(f"{m['p']:.3f}/{m['r']:.3f}/{m['f1']:.3f} w{m['with']:.2f} x{m['without']:.2f}")
                print(f"{label:<22}{n:>5}  " + "  ".join(f"{c:>26}" for c in cells))
        else:
            n = by_ex[names[0]]["n"]
            cells = [f"{by_ex[ex]['p']:.3f}/{by_ex[ex]['r']:.3f}/{by_ex[ex]['f1']:.3f}" for ex in names]
            print(f"{set_name:<22}{n:>5}  " + "  ".join(f"{c:>26}" for c in cells))
    print("(wcxb: w = share of `with` snippets found, x = share of `without` snippets leaked)")
    for ex in names:
        s = report["speed"][ex]
        print(f"speed {ex:<12} {s['pages']} pages in {s['seconds']:.1f} s = {s['pages_per_s']:.1f} pages/s")
    print(f"speed ratio ours/trafilatura: {report['speed']['ratio_ours_over_trafilatura']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="pages per dataset, for a quick run")
    parser.add_argument("--split", choices=SPLITS, default="all", help="half of each set: tune on even, check on odd")
    parser.add_argument("--json", action="store_true", help="print machine-readable figures instead of a table")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the extraction data folder")
    args = parser.parse_args(argv)
    report = evaluate(args.data, args.limit, args.split)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
