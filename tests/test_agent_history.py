"""History trimming: what earlier turns the prompt keeps, on TREC CAsT conversations (human rewrites)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.events import Answer, TranscriptMessage, TurnRecord
from agent.history import collapsed_messages, full_messages, trim_history
from engine.protocol import Message
from retrieval.tokenize import terms
from scripts.scripted_engine import ScriptedEngine
from tests.agent_fixtures import collect, final, make_agent, make_retriever

CAST = Path(__file__).resolve().parents[2] / "shared" / "data" / "rewrite" / "cast"
# A page-sized observation, as a search round leaves in a turn (≈1,500 tokens with the tiny tokenizer).
OBSERVATION = "[[citation:1]]\n" + "The search results describe the topic in some detail. " * 60


def record(question: str, answer: str, *, searched: bool = True) -> TurnRecord:
    transcript = []
    if searched:
        body = json.dumps({"name": "googleWebSearch", "arguments": {"query": question}}, ensure_ascii=False)
        transcript += [
            TranscriptMessage(role="assistant", content="", function_call=body),
            TranscriptMessage(role="observation", content=OBSERVATION),
        ]
    transcript.append(TranscriptMessage(role="assistant", content=answer))
    return TurnRecord(
        question=question, transcript=transcript, answer=Answer(answer=re.sub(r"\[citation:(\d+)\]", r"[\1]", answer))
    )


def cast_conversations() -> list[list[tuple[str, str]]]:
    """(raw utterance, human rewrite) per turn, for every CAsT 2019 and 2020 topic."""
    if not CAST.is_dir():
        pytest.fail(f"TREC CAsT data missing at {CAST} (see ../shared/data/README.md)")
    resolved = dict(
        line.split("\t", 1)
        for line in (CAST / "2019_evaluation_topics_annotated_resolved_v1.0.tsv").read_text().splitlines()
        if line
    )
    conversations = []
    for topic in json.loads((CAST / "2019_evaluation_topics_v1.0.json").read_text()):
        turns = [
            (t["raw_utterance"].strip(), resolved[f"{topic['number']}_{t['number']}"].strip()) for t in topic["turn"]
        ]
        conversations.append(turns)
    for topic in json.loads((CAST / "2020_manual_evaluation_topics_v1.0.json").read_text()):
        conversations.append(
            [(t["raw_utterance"].strip(), t["manual_rewritten_utterance"].strip()) for t in topic["turn"]]
        )
    return conversations


async def test_trimming_collapses_old_observations_before_dropping_turns():
    records = [record(f"question {i}", f"answer {i} [citation:1]") for i in range(4)]

    async def count(messages):
        return sum(len(m.content) + len(m.function_call or "") for m in messages)

    full = await count([m for r in records for m in full_messages(r)])
    collapsed_size = await count([m for r in records for m in collapsed_messages(r)])
    kept = await trim_history(records, full, count)
    assert (kept.collapsed, kept.dropped) == (0, 0)
    one_less = full - len(OBSERVATION) + 1
    kept = await trim_history(records, one_less, count)
    assert (kept.collapsed, kept.dropped) == (1, 0)
    assert kept.messages[:2] == [Message("user", "question 0"), Message("assistant", "answer 0")]  # markers gone
    assert kept.messages[2:5] == full_messages(records[1])[:3]  # newer turns keep their searches
    kept = await trim_history(records, collapsed_size - 1, count)
    assert kept.dropped == 1 and kept.messages[0] == Message("user", "question 1")
    assert (await trim_history(records, 0, count)).messages == []


async def test_cast_prompts_keep_every_turn_the_rewrite_depends_on(tokenizer_dir, corpus_backend):
    """For the last turn of each CAsT topic: the words the human rewrite adds to the raw question,
    wherever they occur in earlier questions, must still be in the prompt the model gets (4096 tokens)."""
    checked = 0
    for turns in cast_conversations():
        *earlier, (raw, rewrite) = turns
        history = [record(q, f"Here is what the sources say about {q.rstrip('?')} [citation:1].") for q, _ in earlier]
        engine = ScriptedEngine(tokenizer_dir, ["Noted.<|turn_end|>"], max_len=4096)
        events = await collect(make_agent(engine, make_retriever(corpus_backend)).run(raw, history=history))
        assert final(events).type == "answer"
        prompt = engine.requests[0].text
        assert len(engine.requests[0].prompt) + engine.requests[0].sampling.max_tokens <= 4096
        assert prompt.endswith(f"<|role_start|>user<|role_end|>{raw}<|turn_end|><|role_start|>assistant<|role_end|>")
        added = set(terms(rewrite)) - set(terms(raw))
        needed = [q for q, _ in earlier if added & set(terms(q))]
        missing = [q for q in needed if f"<|role_start|>user<|role_end|>{q}<|turn_end|>" not in prompt]
        assert not missing, (raw, rewrite, missing)
        checked += bool(needed)
    assert checked >= 40  # most topics' last turns depend on an earlier one
