"""The megrez-search command, run in-process on real pages and a local corpus."""

from __future__ import annotations

import gzip
import io
import json
import logging
import sys

import pytest

from api.cli import main
from scripts.corpora import DATA


def run(monkeypatch, capsys, argv, stdin: bytes = b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_stdin_reads_bytes_and_prints_main_text(monkeypatch, capsys):
    page = "<html><head><title>中文标题</title><meta charset='gbk'></head><body><nav>首页 登录</nav><article>"
    page += (
        "<p>" + "这是一段足够长的中文正文，用来检验编码识别与正文抽取是否正确。" * 6 + "</p></article></body></html>"
    )
    code, out, _ = run(monkeypatch, capsys, ["extract", "--json"], page.encode("gbk"))
    assert code == 0
    doc = json.loads(out)
    assert doc["title"] == "中文标题"
    assert "编码识别与正文抽取" in doc["text"]
    assert "登录" not in doc["text"]


def test_extract_batch_writes_jsonl_per_file(monkeypatch, capsys, tmp_path):
    sources = sorted((DATA / "extraction" / "aeb" / "html").glob("*.html.gz"))[:2]
    (tmp_path / "a.html").write_bytes(gzip.decompress(sources[0].read_bytes()))
    (tmp_path / "b.html.gz").write_bytes(sources[1].read_bytes())
    (tmp_path / "ignored.txt").write_text("not a page")
    code, out, _ = run(monkeypatch, capsys, ["extract", "--batch", str(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    gold = json.loads((DATA / "extraction" / "aeb" / "ground-truth.json").read_text())
    first_gold_words = gold[sources[0].name.removesuffix(".html.gz")]["articleBody"].split()[:8]
    assert " ".join(first_gold_words) in " ".join(rows[0]["text"].split())


def test_extract_batch_missing_dir_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, ["extract", "--batch", str(tmp_path / "nope")])
    assert code == 2 and out == ""
    assert "not a directory" in err


def test_select_packs_within_budget_in_prompt_order(monkeypatch, capsys):
    filler = " ".join(f"Unrelated sentence number {i} about gardening tools." for i in range(60))
    rows = [
        {
            "id": "q1",
            "question": "Who designed the Eiffel Tower?",
            "pages": [
                {"url": "https://a.example/garden", "title": "Gardening", "text": filler},
                {
                    "url": "https://b.example/eiffel",
                    "title": "Eiffel Tower",
                    "text": filler + " The Eiffel Tower was designed by the company of Gustave Eiffel.",
                },
            ],
        },
        {"id": "q2", "question": "Nothing?", "pages": []},
    ]
    stdin = "\n".join(json.dumps(r) for r in rows).encode()
    code, out, _ = run(monkeypatch, capsys, ["select", "--budget", "120"], stdin)
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["id"] == "q1" and second == {"id": "q2", "passages": []}
    assert first["passages"][0]["url"] == "https://b.example/eiffel"
    assert any("Gustave Eiffel" in p["text"] for p in first["passages"] if p["url"].endswith("/eiffel"))
    assert sum(len(p["text"]) for p in first["passages"]) <= 120 * 4


@pytest.mark.parametrize(
    ("stdin", "message"),
    [(b"{not json}\n", "line 1: not JSON"), (b'\n{"question": "q", "pages": [{"url": 1}]}\n', "line 2: each page")],
)
def test_select_rejects_bad_lines_with_their_number(monkeypatch, capsys, stdin, message):
    code, _, err = run(monkeypatch, capsys, ["select"], stdin)
    assert code == 2
    assert message in err


def test_search_local_corpus_with_fetch_prints_cited_passages(monkeypatch, capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "eiffel.md").write_text("# Eiffel Tower\n\nThe tower was designed by Gustave Eiffel's company in 1887.\n")
    (corpus / "tea.txt").write_text("Green tea is made from unoxidised leaves.\n")
    monkeypatch.setenv("MEGREZ_SEARCH__CORPUS_PATH", str(corpus))
    monkeypatch.setenv("MEGREZ_SEARCH__INDEX_DIR", str(tmp_path / "index"))
    code, out, err = run(
        monkeypatch, capsys, ["search", "who designed the Eiffel tower", "--backend", "local", "--fetch"]
    )
    assert code == 0, err
    assert "results from local" in err
    assert out.startswith("[1] Eiffel Tower\n") and "Gustave Eiffel" in out
    # The passages, then the source list: one source, the file the passage came from.
    assert out.splitlines()[-1] == "[1] Eiffel Tower — corpus:eiffel.md"  # never a file:// path of the server

    code, out, _ = run(monkeypatch, capsys, ["search", "green tea", "--backend", "local", "--json"])
    assert code == 0
    doc = json.loads(out)
    assert doc["backend"] == "local"
    assert doc["results"][0]["url"].endswith("tea.txt")
    assert "passages" not in doc


def test_search_without_usable_backend_is_a_usage_error(monkeypatch, capsys):
    code, _, err = run(monkeypatch, capsys, ["search", "anything", "--backend", "local"])
    assert code == 2
    assert "corpus_path is not set" in err


def test_search_that_finds_nothing_succeeds_and_says_so(monkeypatch, capsys, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "tea.txt").write_text("Green tea is made from unoxidised leaves.\n")
    monkeypatch.setenv("MEGREZ_SEARCH__CORPUS_PATH", str(corpus))
    monkeypatch.setenv("MEGREZ_SEARCH__INDEX_DIR", str(tmp_path / "index"))
    code, out, err = run(monkeypatch, capsys, ["search", "xylophone", "--backend", "local"])
    assert (code, out) == (0, "")
    assert err.splitlines()[-1] == "megrez-search search: no results (local: no results)"
    code, out, _ = run(monkeypatch, capsys, ["search", "xylophone", "--backend", "local", "--json"])
    assert code == 0 and json.loads(out)["results"] == []


def test_search_that_no_backend_answers_fails(monkeypatch, capsys):
    from scripts.net import free_port

    monkeypatch.setenv("MEGREZ_SEARCH__SEARXNG_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    code, out, err = run(monkeypatch, capsys, ["search", "anything", "--backend", "searxng", "--json"])
    assert code == 1 and out == ""
    assert "no search backend answered (searxng: " in err


@pytest.mark.parametrize("command", ["search", "extract", "ask", "serve", "support", "select"])
def test_help_documents_the_exit_status(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert all(f"  {status} " in help_text for status in (0, 1, 2, 130))


def test_support_scores_claim_passage_pairs(monkeypatch, capsys):
    passage = "The Eiffel Tower was designed by the company of Gustave Eiffel and built from 1887 to 1889."
    rows = [
        {"id": "yes", "claim": "The Eiffel Tower was built from 1887 to 1889.", "passage": passage},
        {"id": "no", "claim": "The Eiffel Tower was built in 1925 by Le Corbusier.", "passage": passage},
    ]
    stdin = "".join(json.dumps(r) + "\n" for r in rows).encode()
    code, out, _ = run(monkeypatch, capsys, ["support"], stdin)
    assert code == 0
    scores = {r["id"]: r for r in map(json.loads, out.splitlines())}
    assert scores["yes"]["supported"] and not scores["no"]["supported"]
    assert scores["yes"]["score"] > scores["no"]["score"]
    code, out, _ = run(monkeypatch, capsys, ["support", "--threshold", "0"], stdin)
    assert code == 0
    assert [(r["id"], r["supported"]) for r in map(json.loads, out.splitlines())] == [("yes", True), ("no", True)]


@pytest.mark.parametrize(
    ("stdin", "message"), [(b"{nope\n", "line 1: not JSON"), (b'\n{"id": 1, "claim": 3}\n', "line 2: expected")]
)
def test_support_rejects_bad_lines_with_their_number(monkeypatch, capsys, stdin, message):
    code, out, err = run(monkeypatch, capsys, ["support"], stdin)
    assert code == 2 and out == "" and message in err


def test_ask_with_an_unreadable_image_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, ["ask", "What is this?", "--image", str(tmp_path / "missing.png")])
    assert code == 2 and out == ""
    assert "--image" in err and "missing.png" in err


def test_the_command_module_imports_nothing_that_breaks_vllm_workers():
    """vLLM's spawned workers import the __main__ module again (``api.cli`` for the command) and scan every
    loaded module; llvmlite (numba, brought in by bm25s) makes that scan fail, so the module must not
    import it."""
    import subprocess

    code = "import sys, api.cli; print('llvmlite' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_bad_setting_is_a_one_line_usage_error(monkeypatch, capsys):
    monkeypatch.setenv("MEGREZ_AGENT__ANSWER_TOKENS", "0")
    code, out, err = run(monkeypatch, capsys, ["ask", "q"])
    assert code == 2 and out == "" and "MEGREZ_AGENT__ANSWER_TOKENS" in err and "Traceback" not in err


@pytest.fixture
def ask_setup(monkeypatch, tmp_path, tokenizer_dir):
    """``ask`` on the scripted engine (a new one per run, replaying the script) and the agent tests' corpus,
    with a log handler on stderr as an application embedding the agent would have."""
    from scripts.scripted_engine import ScriptedEngine
    from tests.agent_fixtures import DOCUMENTS, call

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    monkeypatch.setenv("MEGREZ_SEARCH__BACKENDS", '["local"]')
    monkeypatch.setenv("MEGREZ_SEARCH__CORPUS_PATH", str(corpus))
    monkeypatch.setenv("MEGREZ_SEARCH__INDEX_DIR", str(tmp_path / "index"))
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # ask would set it for good (vLLM's processes) otherwise
    script = [
        call("Eiffel Tower designer"),
        # Context 99 does not exist: the agent drops the marker and logs a warning.
        "Gustave Eiffel's company designed it [citation:1][citation:99].<|turn_end|>",
        "1. When was it built?\n2. How tall is it?<|turn_end|>",
    ]
    monkeypatch.setattr("engine.factory.build_engine", lambda config: ScriptedEngine(tokenizer_dir, list(script)))
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stream: what a log line would reach
    root.addHandler(handler)
    yield
    root.removeHandler(handler)


def test_ask_says_each_step_once_and_heads_sources_and_related(monkeypatch, capsys, ask_setup):
    code, out, err = run(monkeypatch, capsys, ["ask", "Who designed the Eiffel Tower?"])
    assert code == 0, err
    # The answer, a blank line, the cited sources under their header, a blank line, the follow-ups under theirs.
    answer, sources, related = out.split("\n\n")
    n = answer.removeprefix("Gustave Eiffel's company designed it [").removesuffix("].")
    assert n.isdigit()  # the marker of the missing context is gone
    assert sources == f"Sources\n[{n}] Eiffel Tower — https://en.wikipedia.org/wiki/Eiffel_Tower"
    assert related == "Related\n- When was it built?\n- How tall is it?\n"
    # Progress: the search said once, with its query; every line a step of its own; no log line.
    lines = err.splitlines()
    assert lines[:2] == ["· Thinking", "· Searching: Eiffel Tower designer"]
    assert f"· [{n}] Eiffel Tower — en.wikipedia.org" in lines
    assert len(lines) == len(set(lines)) and all(line.startswith("· ") for line in lines)
    assert "citation 99" not in err


def test_ask_json_prints_the_answer_alone(monkeypatch, capsys, ask_setup):
    code, out, err = run(monkeypatch, capsys, ["ask", "Who designed the Eiffel Tower?", "--json"])
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert answer["answer"].startswith("Gustave Eiffel's company designed it [")
    assert answer["related"] == ["When was it built?", "How tall is it?"]


def test_ask_verbose_shows_the_logs(monkeypatch, capsys, ask_setup):
    code, _, err = run(monkeypatch, capsys, ["ask", "Who designed the Eiffel Tower?", "--json", "-v"])
    assert code == 0
    assert "WARNING agent.citations: citation 99 points to no search context; dropped" in err
