"""Citation support check on the attribution dev files: ours (:mod:`agent.support`) against the simple
lexical baselines of the data README, recomputed in the same run.

Data (read in place): ``../shared/data/attribution/{attributionbench,wice}-dev.jsonl``, the **dev**
split (the rest is held aside). Score = support; AUROC for detecting ``not_supported``; F1 and
balanced accuracy of ``not_supported`` at our stored threshold and at the F1-best threshold.

Ours is reported honestly: on AttributionBench out-of-fold (5-fold cross-validation grouped by
question, refitting the logistic regression per fold; the "@ours" columns use each fold model's
F1-best threshold found on its own training folds), on WiCE cross-dataset (the constants fitted on AttributionBench,
never on WiCE), and in-sample (the stored constants on the data they were fitted on), marked so.

    .venv/bin/python -m bench.support          # the table
    .venv/bin/python -m bench.support --fit    # also print the constants for agent/support.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from agent import support
from agent.support import FEATURES, SupportChecker, strip_markers, support_features
from retrieval.tokenize import STOPWORDS, terms
from scripts.corpora import DATA

ATTRIBUTION = DATA / "attribution"
FILES = {"attributionbench": "attributionbench-dev.jsonl", "wice": "wice-dev.jsonl"}
FOLDS = 5
L2 = 3.0
_WORD = re.compile(r"[^\W_]+")
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s+|\n+")


def load(name: str) -> list[dict]:
    """Rows of one dev file; a missing file is an error that says where the data should be."""
    path = ATTRIBUTION / FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the attribution dev data must be in ../shared/data/attribution "
            "(or $MEGREZ_SHARED_DATA/attribution), see its README.md"
        )
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def not_supported(rows: Sequence[dict]) -> np.ndarray:
    return np.array([r["label"] == "not_supported" for r in rows], dtype=bool)


# --- metrics: scores are support (higher = supported), the positive class is not_supported -------


def auroc(scores: Sequence[float], positive: np.ndarray) -> float:
    """Probability that a not_supported row scores below a supported one (ties count half)."""
    s = -np.asarray(scores, dtype=float)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mean_rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based ranks, ties averaged
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((mean_rank[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_bacc(scores: Sequence[float], positive: np.ndarray, threshold: float) -> tuple[float, float]:
    """F1 and balanced accuracy of flagging ``score < threshold`` as not_supported."""
    flagged = np.asarray(scores) < threshold
    tp, fp = (flagged & positive).sum(), (flagged & ~positive).sum()
    fn, tn = (~flagged & positive).sum(), (~flagged & ~positive).sum()
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return float(f1), float(0.5 * (tp / (tp + fn) + tn / (tn + fp)))


def best_threshold(scores: Sequence[float], positive: np.ndarray) -> float:
    """The F1-best threshold for not_supported (flag ``score < t``), midway between distinct scores."""
    values = np.unique(scores)
    cuts = np.r_[(values[:-1] + values[1:]) / 2, values[-1] + 1e-9]
    return float(max(cuts, key=lambda t: f1_bacc(scores, positive, t)[0]))


# --- the README's baselines ----------------------------------------------------------------------


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def baseline_recall(claim: str, passage: str) -> float:
    """(a) Share of the claim's distinct content words (not stemmed) found in the passage."""
    words = content_words(strip_markers(claim))
    return len(words & set(_WORD.findall(passage.lower()))) / len(words) if words else 0.0


def baseline_windows(claim: str, passage: str, idf: Callable[[str], float]) -> float:
    """(b) IDF-weighted claim-term recall, best over windows of one or two passage sentences."""
    wanted = set(terms(strip_markers(claim)))
    if not wanted:
        return 0.0
    sentences = [set(terms(s)) for s in _SENTENCE.split(passage) if s.strip()] or [set()]
    windows = sentences + [a | b for a, b in zip(sentences, sentences[1:])]
    # Summed in sorted order: set order varies with the hash seed, and float sums with it.
    return max(sum(map(idf, sorted(wanted & w))) for w in windows) / sum(map(idf, sorted(wanted)))


def char_grams(text: str, n: int = 4) -> set[str]:
    joined = " ".join(_WORD.findall(text.lower()))
    return {joined[i : i + n] for i in range(len(joined) - n + 1)}


def baseline_chargrams(claim: str, passage: str) -> float:
    """(c) Share of the claim's character 4-grams found in the passage."""
    wanted = char_grams(strip_markers(claim))
    return len(wanted & char_grams(passage)) / len(wanted) if wanted else 0.0


def idf_of(rows: Sequence[dict]) -> Callable[[str], float]:
    """IDF over the file's own passages (what baseline (b) is allowed; ours uses none)."""
    df = Counter(t for r in rows for t in set(terms(r["passage"])))
    return lambda t: math.log((len(rows) + 1) / (df.get(t, 0) + 0.5))


# --- fitting ours --------------------------------------------------------------------------------


def feature_matrix(rows: Sequence[dict]) -> np.ndarray:
    return np.array([support_features(r["claim"], r["passage"], question=r.get("question")) for r in rows])


def fit(x: np.ndarray, supported: np.ndarray, l2: float = L2) -> tuple[np.ndarray, float]:
    """Logistic regression by Newton's method, L2 on standardised features (not the bias);
    returns weights and bias on the raw feature scale."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    penalty = l2 * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    w = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-z @ w))
        step = np.linalg.solve((z * (p * (1 - p))[:, None]).T @ z + penalty, z.T @ (p - supported) + penalty @ w)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    weights = w[:-1] / sd
    return weights, float(w[-1] - weights @ mu)


def predict(x: np.ndarray, weights: np.ndarray, bias: float) -> np.ndarray:
    return 1 / (1 + np.exp(-(x @ weights + bias)))


def fold_of(group: str) -> int:
    # Salted: the dev split itself is sha1(group) % 100, so the folds must not reuse that hash.
    return int(hashlib.sha1(f"fold:{group}".encode()).hexdigest(), 16) % FOLDS


def out_of_fold(rows: Sequence[dict], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold scores, and for each row the F1-best threshold of the model that scored it
    (found on that model's training folds), so thresholded figures are held out too."""
    folds = np.array([fold_of(r["group"]) for r in rows])
    supported, positive = ~not_supported(rows), not_supported(rows)
    scores, thresholds = np.zeros(len(rows)), np.zeros(len(rows))
    for k in range(FOLDS):
        train, test = folds != k, folds == k
        weights, bias = fit(x[train], supported[train])
        scores[test] = predict(x[test], weights, bias)
        thresholds[test] = best_threshold(predict(x[train], weights, bias), positive[train])
    return scores, thresholds


@lru_cache(maxsize=1)
def calibration() -> dict:
    """Final weights (all AttributionBench dev) and threshold (F1-best over the out-of-fold scores)."""
    rows = load("attributionbench")
    x = feature_matrix(rows)
    weights, bias = fit(x, ~not_supported(rows))
    oof, fold_thresholds = out_of_fold(rows, x)
    return {"weights": weights, "bias": bias, "threshold": best_threshold(oof, not_supported(rows)),
            "oof": oof, "fold_thresholds": fold_thresholds}  # fmt: skip


# --- the report ----------------------------------------------------------------------------------


def row(name: str, scores: Sequence[float], positive: np.ndarray, threshold: float | np.ndarray | None) -> list[str]:
    """One table row: AUROC, F1/BAcc at ``threshold`` (``None``: not applicable, per-row array: out-of-fold),
    F1/BAcc at the F1-best threshold of these very scores."""
    best = best_threshold(scores, positive)
    f1_best, bacc_best = f1_bacc(scores, positive, best)
    ours = ["-", "-"]
    if threshold is not None:
        # Per-row thresholds (out-of-fold) compare elementwise; the stored one is a scalar.
        flagged_scores = np.asarray(scores) - np.asarray(threshold)
        ours = [f"{v:.3f}" for v in f1_bacc(flagged_scores, positive, 0.0)]
    return [name, f"{auroc(scores, positive):.3f}", *ours, f"{f1_best:.3f}", f"{bacc_best:.3f}"]


def baselines(rows: Sequence[dict]) -> dict[str, list[float]]:
    """The README's baselines (a), (b), (c), scored on ``rows``."""
    idf = idf_of(rows)
    return {
        "(a) content-word recall": [baseline_recall(r["claim"], r["passage"]) for r in rows],
        "(b) IDF max over 1-2 sentences": [baseline_windows(r["claim"], r["passage"], idf) for r in rows],
        "(c) char 4-gram containment": [baseline_chargrams(r["claim"], r["passage"]) for r in rows],
    }


def report() -> list[list[str]]:
    cal, checker, threshold = calibration(), SupportChecker(), support.DEFAULT_THRESHOLD
    out = []
    for name in FILES:
        rows = load(name)
        positive = not_supported(rows)
        out.append([f"{name} (dev, n={len(rows)}, {positive.mean():.1%} not_supported)", "", "", "", "", ""])
        out.extend(row(method, scores, positive, None) for method, scores in baselines(rows).items())
        stored = [checker.check(r["claim"], [r["passage"]], question=r.get("question")).score for r in rows]
        if name == "attributionbench":
            oof_name = f"ours, out-of-fold ({FOLDS}-fold by question)"
            out.append(row(oof_name, cal["oof"], positive, cal["fold_thresholds"]))
            out.append(row("ours, in-sample (stored constants)", stored, positive, threshold))
        else:
            out.append(row("ours, cross-dataset (fit on attributionbench)", stored, positive, threshold))
    return out


def by_subset(rows: Sequence[dict], scores: Sequence[float]) -> str:
    """AUROC per source subset, ``name n=.. AUROC``, to show where lexical overlap works and where not."""
    subsets = np.array([r["subset"] for r in rows])
    positive, scores = not_supported(rows), np.asarray(scores)
    parts = [f"{s} (n={(subsets == s).sum()}) {auroc(scores[subsets == s], positive[subsets == s]):.3f}"
             for s in sorted(set(subsets))]  # fmt: skip
    return ", ".join(parts)


def cost_per_citation_us() -> float:
    """Mean wall time of one ``SupportChecker.check`` over every row of both files, one thread."""
    checker = SupportChecker()
    rows = [r for name in FILES for r in load(name)]
    start = time.perf_counter()
    for r in rows:
        checker.check(r["claim"], [r["passage"]], question=r.get("question"))
    return 1e6 * (time.perf_counter() - start) / len(rows)


def print_table(rows: list[list[str]]) -> None:
    header = ["method", "AUROC", "F1 @ours", "BAcc @ours", "F1 @best", "BAcc @best"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def print_constants() -> None:
    cal = calibration()
    weights = ", ".join(f"{w:.4f}" for w in cal["weights"])
    print(f"FEATURES = {FEATURES!r}")
    print(f"WEIGHTS = ({weights})")
    print(f"BIAS = {cal['bias']:.4f}")
    print(f"DEFAULT_THRESHOLD = {cal['threshold']:.4f}")
    stale = not (np.allclose(cal["weights"], support.WEIGHTS, atol=1e-3) and abs(cal["bias"] - support.BIAS) < 1e-3
                 and abs(cal["threshold"] - support.DEFAULT_THRESHOLD) < 1e-3)  # fmt: skip
    print("agent/support.py constants: " + ("STALE, paste the lines above" if stale else "up to date"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fit", action="store_true", help="print the fitted constants for agent/support.py")
    args = parser.parse_args(argv)
    try:
        for name in FILES:
            load(name)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    if args.fit:
        print_constants()
        print()
    print(f"Citation support, dev split of {ATTRIBUTION} (AUROC for detecting not_supported; F1/BAcc of not_supported)")
    print_table(report())
    print(f"@ours: our stored threshold {support.DEFAULT_THRESHOLD:.4f} (out-of-fold row: each fold model's "
          "F1-best threshold on its training folds); "
          "@best: the F1-best threshold on that row's own scores (in-sample).")  # fmt: skip
    subsets = by_subset(load("attributionbench"), calibration()["oof"])
    print(f"attributionbench out-of-fold AUROC by subset: {subsets}")
    print(f"cost per citation (SupportChecker.check, one passage, mean over all rows, one thread): "
          f"{cost_per_citation_us():.0f} µs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
