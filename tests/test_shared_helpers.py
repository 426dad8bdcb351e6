"""Tests and benchmarks share their helpers through ``scripts/``, never ``tests/``.

The test session keeps itself off the hub (``HF_HUB_OFFLINE=1`` in ``tests/conftest.py``); a benchmark
given a hub id (``bench.engine --model``, ``bench.omni --model``) must be free to download it, so
nothing a benchmark imports may set that, or import from ``tests/``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_benchmarks_import_nothing_from_tests():
    benchmarks = sorted((ROOT / "bench").glob("*.py"))
    assert len(benchmarks) > 5
    offending = {
        path.name: sorted(m for m in imported_modules(path) if m == "tests" or m.startswith("tests."))
        for path in benchmarks
    }
    assert {name: mods for name, mods in offending.items() if mods} == {}


def test_the_shared_model_builders_leave_the_hub_reachable():
    code = (
        "import os, scripts.tiny_models, scripts.tiny_omni; from huggingface_hub import constants; "
        "print(os.environ.get('HF_HUB_OFFLINE'), constants.HF_HUB_OFFLINE)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]
