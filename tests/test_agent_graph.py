"""The agent's turn with a scripted engine: routing, prompts sent, numbering, events, failures."""

from __future__ import annotations

import pytest

from agent.events import (
    EVENT_ADAPTER,
    Answer,
    AnswerEvent,
    CitationEvent,
    ErrorEvent,
    Note,
    PreambleEvent,
    RelatedEvent,
    SourcesEvent,
    StatusEvent,
    TokenEvent,
    TranscriptMessage,
    TurnRecord,
)
from engine.base import EngineError, EngineUnavailable
from engine.protocol import (
    FORCED_SEARCH_PREFIX,
    FORCED_SEARCH_REGEX,
    Message,
    render_observation,
    render_prompt,
    system_prompt,
)
from prompts.agent import EMPTY_ANSWER, MALFORMED_CALL, NO_RESULTS, RELATED_REGEX
from retrieval.events import PageEvent
from scripts.scripted_engine import ScriptedEngine, contexts_of
from tests.agent_fixtures import NOW, call, collect, final, make_agent, make_retriever

QUESTION = "Who designed the Eiffel Tower?"


def engine(tokenizer_dir, *script, **kw) -> ScriptedEngine:
    return ScriptedEngine(tokenizer_dir, list(script), **kw)


def cite_all(request) -> str:
    """An answer citing every context of the prompt, one sentence each."""
    return " ".join(f"Fact {n} [citation:{n}]." for n in contexts_of(request.text)) + "<|turn_end|>"


def observation_of(engine: ScriptedEngine, request: int, index: int = -1) -> str:
    """An observation of request ``request``'s prompt (split on real chat tokens, not their spelling)."""
    return [content for role, content in engine.messages(engine.requests[request]) if role == "observation"][index]


RELATED = "1. When was it built?\n2. How tall is it?\n3. Who was Koechlin?<|turn_end|>"


async def test_small_talk_is_answered_without_search(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, "Hello! How can I help you today?<|turn_end|>")
    events = await collect(make_agent(eng, make_retriever(corpus_backend)).run("Hi there"))
    answer = final(events).answer
    assert answer.answer == "Hello! How can I help you today?"
    assert not answer.searched and answer.rounds == 0 and answer.sources == [] and answer.related == []
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == answer.answer
    assert len(eng.requests) == 1  # no follow-up generation for small talk
    expected = render_prompt([Message("system", system_prompt(NOW, search=True)), Message("user", "Hi there")])
    assert eng.requests[0].text == expected
    assert eng.requests[0].sampling.logit_bias == {}  # the model may call the tool


async def test_one_search_prompt_numbering_and_event_order(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, call("Eiffel Tower designer"), cite_all, RELATED)
    turn = make_agent(eng, make_retriever(corpus_backend)).run(QUESTION)
    events = await collect(turn)
    answer = final(events).answer
    types = [e.type for e in events]
    assert types.index("query") < types.index("sources") < types.index("page") < types.index("token")
    sources = next(e for e in events if isinstance(e, SourcesEvent)).sources
    assert [s.n for s in sources] == list(range(1, len(sources) + 1))
    assert answer.sources == sources and answer.queries == ["Eiffel Tower designer"] and answer.rounds == 1
    assert sum(isinstance(e, PageEvent) for e in events) == len(sources)

    # The observation is the vendor's template, byte for byte, with contexts numbered from 1.
    second = eng.requests[1].text
    obs = observation_of(eng, 1)
    numbers = contexts_of(second)
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)]
    texts = [c.passage for c in answer.citations]  # cite_all cites context i as its i-th citation
    assert obs == render_observation(QUESTION, "Eiffel Tower designer", texts)
    system = Message("system", system_prompt(NOW, search=True))
    call_message = Message("assistant", "", call("Eiffel Tower designer")[18:-16])
    assert second == render_prompt([system, Message("user", QUESTION), call_message, Message("observation", obs)])

    # Citations come out as source numbers, a citation event the first time each is cited.
    cited = [e.n for e in events if isinstance(e, CitationEvent)]
    assert cited and cited == [c.n for c in answer.citations] and len(cited) == len(numbers)
    assert all(f"[{n}]" in answer.answer for n in cited) and "citation:" not in answer.answer
    assert all(c.supported is not None and 0 <= c.score <= 1 for c in answer.citations)
    # Follow-ups: one regex-constrained generation after the answer.
    assert answer.related == ["When was it built?", "How tall is it?", "Who was Koechlin?"]
    assert eng.requests[2].sampling.regex == RELATED_REGEX
    assert isinstance(events[-2], RelatedEvent)
    assert turn.record is not None and [m.role for m in turn.record.transcript] == [
        "assistant",
        "observation",
        "assistant",
    ]
    assert turn.record.transcript[0].function_call is not None
    assert answer.usage.prompt_tokens == sum(len(r.prompt) for r in eng.requests)
    # Every event is JSON with a stable type, and reads back as the same event.
    for event in events:
        assert EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


async def test_two_searches_continue_numbering_and_the_last_generation_cannot_call(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, call("Eiffel Tower"), call("Maurice Koechlin engineer"), cite_all, RELATED)
    events = await collect(make_agent(eng, make_retriever(corpus_backend), max_rounds=2).run(QUESTION))
    answer = final(events).answer
    assert answer.rounds == 2 and answer.queries == ["Eiffel Tower", "Maurice Koechlin engineer"]
    first, second = (observation_of(eng, 2, i) for i in (0, 1))
    n1, n2 = contexts_of(first), contexts_of(second)
    assert n1 and n2 and [int(n) for n in n1 + n2] == list(range(1, len(n1) + len(n2) + 1))
    rounds = [e for e in events if isinstance(e, SourcesEvent)]
    numbers = [s.n for e in rounds for s in e.sources]
    assert numbers == list(range(1, len(numbers) + 1))  # sources continue too; repeats keep their number
    assert len({s.url for s in answer.sources}) == len(answer.sources)
    ban = eng.tokenizer.convert_tokens_to_ids("<|function_start|>")
    assert eng.requests[1].sampling.logit_bias == {}  # one search left
    assert eng.requests[2].sampling.logit_bias == {ban: -100.0}  # none left: the tool is banned
    # Each generation's prompt extends the previous one (the prefix cache reuses all of it).
    generation_prompt = "<|role_start|>assistant<|role_end|>"
    assert eng.requests[2].text.startswith(eng.requests[1].text.removesuffix(generation_prompt))
    assert eng.requests[1].text.startswith(eng.requests[0].text.removesuffix(generation_prompt))


async def test_a_third_call_is_banned_and_the_turn_still_answers(tokenizer_dir, corpus_backend):
    third = call("again") + "The Eiffel Tower was designed by Eiffel's company [citation:1].<|turn_end|>"
    eng = engine(tokenizer_dir, call("Eiffel Tower"), call("Gustave Eiffel"), "Let me search once more. " + third)
    events = await collect(make_agent(eng, make_retriever(corpus_backend), related=False).run(QUESTION))
    answer = final(events).answer
    assert answer.rounds == 2 and len(eng.requests) == 3
    assert "designed by Eiffel's company [1]" in answer.answer
    assert not any(isinstance(e, PreambleEvent) for e in events)


async def test_malformed_call_gets_one_repair_then_searches(tokenizer_dir, corpus_backend):
    bad = '<|function_start|>{"name": "googleWebSearch", "arguments": {"query": }<|function_end|>'
    eng = engine(tokenizer_dir, bad, call("Eiffel Tower designer"), cite_all, RELATED)
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION))).answer
    repair = observation_of(eng, 1)
    assert repair.startswith(MALFORMED_CALL.format(error="")) and "not valid JSON" in repair
    assert answer.rounds == 1 and answer.citations


async def test_second_bad_call_falls_back_to_a_forced_search(tokenizer_dir, corpus_backend):
    bad = '<|function_start|>{"name": "googleWebSearch"<|function_end|>'
    eng = engine(tokenizer_dir, bad, bad, 'Eiffel Tower architect"}}<|turn_end|>', cite_all, RELATED)
    events = await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION))
    answer = final(events).answer
    forced = eng.requests[2]
    assert forced.text.endswith(FORCED_SEARCH_PREFIX) and forced.sampling.regex == FORCED_SEARCH_REGEX
    assert forced.text.count("<|role_start|>observation") == 1  # the second bad call is not kept
    assert answer.queries == ["Eiffel Tower architect"] and answer.rounds == 1


async def test_unknown_function_is_answered_like_the_vendor_does(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, call("Paris", name="getWeather"), "I cannot check the weather.<|turn_end|>")
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run("Weather in Paris?"))).answer
    assert observation_of(eng, 1) == "getWeather不在可以使用的工具列表中"
    assert answer.answer == "I cannot check the weather." and not answer.searched


async def test_text_before_the_call_is_a_preamble_not_the_answer(tokenizer_dir, corpus_backend):
    eng = engine(
        tokenizer_dir, "Let me look that up. " + call("Eiffel Tower"), "Gustave Eiffel [citation:1].<|turn_end|>"
    )
    turn = make_agent(eng, make_retriever(corpus_backend), related=False).run(QUESTION)
    events = await collect(turn)
    preamble = next(e for e in events if isinstance(e, PreambleEvent))
    assert preamble.text == "Let me look that up. "
    assert final(events).answer.answer == "Gustave Eiffel [1]."
    first = turn.record.transcript[0]
    assert first.content == "Let me look that up. " and first.function_call.startswith('{"name": "googleWebSearch"')
    assert "Let me look that up. <|function_start|>" in eng.requests[1].text  # kept in the transcript


async def test_unknown_numbers_are_dropped_and_all_marker_forms_resolve(tokenizer_dir, corpus_backend):
    text = "Eiffel's company [citation:1,2]. Koechlin drew it【citation:2】. Wrong [citation:9]. Also [[citation:1]]."
    eng = engine(tokenizer_dir, call("Eiffel Tower"), text + "<|turn_end|>")
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend), related=False).run(QUESTION))).answer
    one, two = (c.n for c in answer.citations)  # the sources of contexts 1 and 2
    assert answer.answer == f"Eiffel's company [{one}][{two}]. Koechlin drew it[{two}]. Wrong. Also [{one}]."
    assert answer.sources[one - 1].url != answer.sources[two - 1].url


async def test_an_answer_that_never_cites_stands(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, call("Eiffel Tower"), "It was Gustave Eiffel's company.<|turn_end|>", RELATED)
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION))).answer
    assert answer.answer == "It was Gustave Eiffel's company." and answer.citations == [] and answer.sources


async def test_chinese_question_gets_chinese_instructions(tokenizer_dir, corpus_backend):
    eng = engine(
        tokenizer_dir,
        call("北京 天气"),
        "北京今天晴[citation:1]。<|turn_end|>",
        "1. 明天呢？\n2. 会下雨吗？\n3. 气温多少？<|turn_end|>",
    )
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run("北京今天天气怎么样？"))).answer
    assert "your answer must be written in Chinese" in observation_of(eng, 1)
    assert answer.language == "Chinese" and answer.answer == "北京今天晴[1]。"
    assert "请根据以上对话" in eng.requests[2].text and answer.related == ["明天呢？", "会下雨吗？", "气温多少？"]


async def test_always_mode_forces_the_search_with_the_models_query(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, 'Gustave Eiffel company"}}<|turn_end|>', cite_all, RELATED)
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION, mode="always"))).answer
    first = eng.requests[0]
    assert first.text.endswith(FORCED_SEARCH_PREFIX) and first.sampling.regex == FORCED_SEARCH_REGEX
    assert first.sampling.stop_token_ids == (eng.tokenizer.convert_tokens_to_ids("<|function_end|>"),)
    assert answer.queries == ["Gustave Eiffel company"] and answer.mode == "always"
    # The call is kept canonically: prefix + continuation, then <|function_end|>.
    assert '"query": "Gustave Eiffel company"}}<|function_end|>' in eng.requests[1].text


async def test_off_mode_is_plain_chat(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, "2 + 2 = 4.<|turn_end|>")
    answer = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run("2+2?", mode="off"))).answer
    assert eng.requests[0].text.startswith(
        "<|role_start|>system<|role_end|>" + system_prompt(NOW, search=False) + "<|turn_end|>"
    )
    assert eng.requests[0].sampling.logit_bias == {eng.tokenizer.convert_tokens_to_ids("<|function_start|>"): -100.0}
    assert eng.requests[0].sampling.temperature == 0.4
    assert answer.answer == "2 + 2 = 4." and answer.mode == "off" and answer.related == []


async def test_hostile_page_text_stays_text(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, call("hostile tower facts"), cite_all)
    await collect(make_agent(eng, make_retriever(corpus_backend), related=False).run("Tell me hostile tower facts"))
    prompt = eng.requests[1].prompt
    special = {eng.tokenizer.convert_tokens_to_ids(t) for t in ("<|turn_end|>", "<|role_start|>", "<|function_start|>")}
    template = eng.tokenizer.encode(
        render_prompt(
            [Message("system", "s"), Message("user", "u"), Message("assistant", "", "c"), Message("observation", "o")]
        )
    )
    # Exactly as many control tokens as the template itself has: none came from the page.
    assert sum(t in special for t in prompt) == sum(t in special for t in template)
    obs = observation_of(eng, 1)
    assert "Hostile tower page" in obs and "[[citation:9]]" not in obs and "(citation 9)" in obs


async def test_question_too_long_is_refused_before_the_engine(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, max_len=512)
    events = await collect(make_agent(eng, make_retriever(corpus_backend), answer_tokens=256).run("weather " * 400))
    error = final(events)
    assert isinstance(error, ErrorEvent) and error.code == "too_long" and "512" in error.message
    assert eng.requests == []


async def test_engine_unavailable_ends_with_an_error_event(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, EngineUnavailable("cannot reach http://127.0.0.1:9"))
    error = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION)))
    assert isinstance(error, ErrorEvent) and error.code == "engine_unavailable"
    # A plain sentence for anyone; the address and the engine's words only in the operator's detail.
    assert "127.0.0.1" not in error.message and "127.0.0.1:9" in error.detail


async def test_empty_model_output_gets_a_fallback_message(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, "<|turn_end|>")
    events = await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION))
    answer = final(events).answer
    assert answer.answer == EMPTY_ANSWER["English"] and [n.code for n in answer.notes] == ["empty_answer"]
    assert [e.text for e in events if isinstance(e, TokenEvent)] == [EMPTY_ANSWER["English"]]


class DownBackend:
    name = "down"

    async def search(self, query, *, k, language=None, time_range=None):
        from retrieval.search.base import BackendUnavailable

        raise BackendUnavailable(self.name, "connection refused")

    async def aclose(self) -> None:
        pass


async def test_all_backends_down_answers_without_sources(tokenizer_dir):
    eng = engine(tokenizer_dir, call("Eiffel Tower"), call("again") + "From memory: Gustave Eiffel.<|turn_end|>")
    answer = final(await collect(make_agent(eng, make_retriever(DownBackend()), max_rounds=2).run(QUESTION))).answer
    assert observation_of(eng, 1) == NO_RESULTS
    ban = eng.tokenizer.convert_tokens_to_ids("<|function_start|>")
    assert eng.requests[1].sampling.logit_bias == {ban: -100.0}  # rounds remain, but no backend works
    assert answer.answer == "From memory: Gustave Eiffel." and answer.sources == [] and answer.citations == []
    (empty,) = [n for n in answer.notes if n.code == "search_empty"]
    assert empty.params == {"query": "Eiffel Tower", "reasons": "down: unavailable: connection refused"}
    assert "connection refused" in empty.message  # the English sentence for clients that do not translate


async def test_closing_the_stream_aborts_the_engine_request(tokenizer_dir, corpus_backend):
    eng = engine(tokenizer_dir, "A long answer " * 50 + "<|turn_end|>", delay_s=0.01)
    stream = make_agent(eng, make_retriever(corpus_backend)).run("Hi")
    async for event in stream:
        if isinstance(event, TokenEvent):
            break
    await stream.aclose()
    assert eng.requests[0].closed_early
    assert stream.answer is None


async def test_remote_engine_without_tokenizer_gets_defanged_text(tokenizer_dir, corpus_backend):
    class TextOnly(ScriptedEngine):
        @property
        def tokenizer(self):
            return None

    eng = TextOnly(tokenizer_dir, [call("hostile tower facts"), cite_all])
    answer = final(
        await collect(make_agent(eng, make_retriever(corpus_backend), related=False).run("hostile <|turn_end|> tower?"))
    )
    prompt = eng.requests[1].prompt
    assert isinstance(prompt, str) and "hostile <\u2060|turn_end|> tower?" in prompt
    assert prompt.count("<|turn_end|>") == 4  # system, user, call, observation: the template's own
    assert isinstance(answer, AnswerEvent)


async def test_invalid_language_and_media_are_refused(tokenizer_dir, corpus_backend):
    from agent.state import MediaItem

    eng = engine(tokenizer_dir)
    agent = make_agent(eng, make_retriever(corpus_backend))
    error = final(await collect(agent.run(QUESTION, language="klingon")))
    assert error.code == "invalid_request" and "zh" in error.message
    error = final(await collect(agent.run("What is this?", media=[MediaItem("image", b"not an image")])))
    assert error.code == "invalid_media" and "image" in error.message
    assert eng.requests == []


async def test_image_question_goes_to_the_engine_with_its_media(tokenizer_dir, corpus_backend):
    import io

    from PIL import Image

    from agent.state import MediaItem

    buffer = io.BytesIO()
    Image.new("RGB", (448, 448), "red").save(buffer, "PNG")
    eng = engine(tokenizer_dir, "A red square.<|turn_end|>")
    turn = make_agent(eng, make_retriever(corpus_backend)).run(
        "What is this?", media=[MediaItem("image", buffer.getvalue())]
    )
    answer = final(await collect(turn)).answer
    request = eng.requests[0]
    assert request.multimodal is not None and request.multimodal["image"][0].size == (448, 448)
    assert "(<image>./</image>)\nWhat is this?" in request.text
    assert answer.answer == "A red square." and turn.record.media[0].kind == "image"


@pytest.mark.parametrize("code", ["zh", "en"])
async def test_requested_language_overrides_the_question(tokenizer_dir, corpus_backend, code):
    eng = engine(tokenizer_dir, call("Eiffel Tower"), "OK [citation:1].<|turn_end|>")
    answer = final(
        await collect(make_agent(eng, make_retriever(corpus_backend), related=False).run(QUESTION, language=code))
    ).answer
    expected = {"zh": "Chinese", "en": "English"}[code]
    assert answer.language == expected and f"must be written in {expected}" in observation_of(eng, 1)


async def test_a_forced_query_cut_by_its_token_limit_is_kept(tokenizer_dir, corpus_backend):
    long_query = "Eiffel Tower designer and engineers and the year it was built in Paris France"
    eng = engine(tokenizer_dir, long_query + '"}}<|turn_end|>', "OK.<|turn_end|>", RELATED)
    agent = make_agent(eng, make_retriever(corpus_backend), query_tokens=8)
    answer = final(await collect(agent.run(QUESTION, mode="always"))).answer
    assert answer.searched and len(answer.queries) == 1
    query = answer.queries[0]
    assert query and long_query.startswith(query) and query != long_query


async def test_a_first_search_on_long_pages_leaves_room_for_a_second(tokenizer_dir, tmp_path):
    import json
    import random

    from retrieval.search.local import LocalCorpusBackend

    words = "tower iron Paris engineer design plan company built height visitors lattice river city year".split()
    rng = random.Random(7)

    def page(i: int) -> str:  # distinct sentences (near-duplicates would be dropped by the selector)
        return " ".join(f"The Eiffel Tower {' '.join(rng.sample(words, 6))} {i * 1000 + j}." for j in range(150))

    docs = [{"url": f"https://example.org/tower/{i}", "title": f"Tower page {i}", "text": page(i)} for i in range(6)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    backend = LocalCorpusBackend(tmp_path / "long.jsonl", tmp_path / "index")
    eng = engine(tokenizer_dir, call("Eiffel Tower"), call("Gustave Eiffel 1884"), cite_all, RELATED)
    answer = final(await collect(make_agent(eng, make_retriever(backend)).run(QUESTION))).answer
    assert answer.rounds == 2  # the second call was allowed and ran
    assert eng.requests[1].sampling.logit_bias == {}
    assert len(eng.requests[1].prompt) > 2000  # the first round did fill most of the room it had
    assert all(len(r.prompt) + r.sampling.max_tokens <= 4096 for r in eng.requests)


async def test_a_call_the_engine_could_not_ban_is_ignored(tokenizer_dir, corpus_backend):
    class NoTokenIds(ScriptedEngine):
        async def tokenize(self, text):
            return [1, 2] if text == "<|function_start|>" else await super().tokenize(text)

    eng = NoTokenIds(tokenizer_dir, ["Four. " + call("2+2")])
    turn = make_agent(eng, make_retriever(corpus_backend)).run("2+2?", mode="off")
    answer = final(await collect(turn)).answer
    assert eng.requests[0].sampling.logit_bias == {}  # nothing to ban by id
    assert answer.answer == "Four. " and not answer.searched and len(eng.requests) == 1
    assert [n.code for n in answer.notes] == ["tool_call_ignored"]
    assert turn.record.transcript[0].function_call is None


async def test_a_call_with_nothing_before_it_is_asked_again_without_the_tool(tokenizer_dir, corpus_backend):
    """A remote server without a local tokenizer whose /tokenize cannot give the call token's id: the last
    generation cannot ban it; a model that calls anyway still ends the turn with an answer."""

    class NoTokenizerNoId(ScriptedEngine):
        @property
        def tokenizer(self):
            return None

        async def tokenize(self, text):
            return [1, 2] if text == "<|function_start|>" else await super().tokenize(text)

    answer_text = "Gustave Eiffel's company built it [citation:1].<|turn_end|>"
    eng = NoTokenizerNoId(tokenizer_dir, [call("Eiffel Tower"), call("Eiffel Tower again"), answer_text])
    turn = make_agent(eng, make_retriever(corpus_backend), max_rounds=1, related=False).run(QUESTION)
    answer = final(await collect(turn)).answer
    assert [r.sampling.logit_bias for r in eng.requests] == [{}, {}, {}]  # no id: nothing could be banned
    systems = [eng.messages(r)[0] for r in eng.requests]
    assert systems[1] == ("system", system_prompt(NOW, search=True))
    assert systems[2] == ("system", system_prompt(NOW, search=False))  # the retry: the tool left out
    assert [m[0] for m in eng.messages(eng.requests[2])[1:-1]] == ["user", "assistant", "observation"]
    assert answer.answer == "Gustave Eiffel's company built it [1]." and answer.rounds == 1
    assert "tool_call_retried" in [n.code for n in answer.notes]
    assert [m.role for m in turn.record.transcript] == ["assistant", "observation", "assistant"]


async def test_engine_failures_log_their_detail(tokenizer_dir, corpus_backend, caplog):
    eng = engine(tokenizer_dir, EngineError("invalid prompt: http://10.0.0.7:8000 said no"))
    with caplog.at_level("WARNING", logger="agent.graph"):
        error = final(await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION)))
    assert error.code == "engine_error" and "10.0.0.7" not in error.message and "10.0.0.7" in error.detail
    assert any("10.0.0.7" in r.getMessage() for r in caplog.records)


class BlockedResults:
    """Results whose pages cannot be fetched (private addresses: the SSRF guard refuses them)."""

    name = "blocked"

    async def search(self, query, *, k, language=None, time_range=None):
        from retrieval.types import SearchResult

        return [
            SearchResult(
                title=f"Eiffel page {i}",
                url=f"http://127.0.0.1:9/eiffel/{i}",
                rank=i,
                engine=self.name,
                snippet=f"The Eiffel Tower was designed by the company of Gustave Eiffel (snippet {i}).",
            )
            for i in range(1, 4)
        ]

    async def aclose(self) -> None:
        pass


async def test_every_page_failing_answers_from_snippets(tokenizer_dir):
    eng = engine(tokenizer_dir, call("Eiffel Tower"), cite_all, RELATED)
    events = await collect(make_agent(eng, make_retriever(BlockedResults())).run(QUESTION))
    answer = final(events).answer
    pages = [e for e in events if isinstance(e, PageEvent)]
    assert len(pages) == 3 and all(p.source == "snippet" and p.error for p in pages)
    assert "pages_failed" in [n.code for n in answer.notes]
    assert answer.citations and all("snippet" in c.passage for c in answer.citations)


async def test_results_without_usable_text_answer_without_sources(tokenizer_dir):
    class EmptyResults(BlockedResults):
        async def search(self, query, *, k, language=None, time_range=None):
            from dataclasses import replace

            return [replace(r, snippet="") for r in await super().search(query, k=k)]

    eng = engine(tokenizer_dir, call("Eiffel Tower"), "I could not find it.<|turn_end|>", RELATED)
    answer = final(await collect(make_agent(eng, make_retriever(EmptyResults())).run(QUESTION))).answer
    assert observation_of(eng, 1) == NO_RESULTS and answer.citations == []
    assert [n.code for n in answer.notes] == ["no_usable_text"]


async def test_an_engine_down_before_the_first_generation_ends_with_an_error_event(tokenizer_dir, corpus_backend):
    class Down(ScriptedEngine):
        async def tokenize(self, text):
            raise EngineUnavailable("cannot reach http://gpu-host:8000")

    error = final(await collect(make_agent(Down(tokenizer_dir), make_retriever(corpus_backend)).run(QUESTION)))
    assert error.code == "engine_unavailable" and "gpu-host" not in error.message and "gpu-host" in error.detail


async def test_statuses_and_notes_are_codes_with_their_values(tokenizer_dir, corpus_backend):
    """A client words each step itself (the page, in Chinese or English): the code and the values it names
    come with every status and note, the English sentence beside them."""
    eng = engine(tokenizer_dir, call("Eiffel Tower designer"), cite_all, RELATED)
    events = await collect(make_agent(eng, make_retriever(corpus_backend)).run(QUESTION))
    selected = next(e for e in events if isinstance(e, StatusEvent) and e.code == "selected")
    pages = len(final(events).answer.sources)
    assert [(e.stage, e.code, e.params) for e in events if isinstance(e, StatusEvent)] == [
        ("thinking", "thinking", {}),
        ("searching", "search_call", {}),
        ("searching", "searching", {"query": "Eiffel Tower designer"}),
        ("reading", "reading", {"pages": pages}),
        ("reading", "selected", {"passages": selected.params["passages"], "pages": selected.params["pages"]}),
        ("answering", "answering", {}),
        ("checking", "checking", {}),
        ("related", "related", {}),
    ]
    assert 0 < selected.params["pages"] <= selected.params["passages"]
    assert selected.message == f"Using {selected.params['passages']} passages from {selected.params['pages']} pages"

    # History that cannot fit: the note says how many turns were left out, as a number.
    long = "The tower is made of wrought iron. " * 60
    earlier = [
        TurnRecord(
            question=f"q{i}", transcript=[TranscriptMessage(role="assistant", content=long)], answer=Answer(answer=long)
        )
        for i in range(6)
    ]
    eng = engine(tokenizer_dir, "Hello.<|turn_end|>", max_len=2048)
    turn = make_agent(eng, make_retriever(corpus_backend), answer_tokens=256).run("Hi", mode="off", history=earlier)
    (note,) = final(await collect(turn)).answer.notes
    assert note.code == "history_trimmed" and isinstance(note.params["dropped"], int) and note.params["dropped"] >= 1
    assert note.message == f"history trimmed: {note.params['dropped']} earlier turn(s) left out to fit the context"


def test_a_note_stored_as_a_sentence_reads_back_as_code_other():
    stored = '{"answer": "a", "notes": ["all pages failed: answered from snippets"]}'
    (note,) = Answer.model_validate_json(stored).notes
    assert note == Note(code="other", message="all pages failed: answered from snippets")
    assert Answer.model_validate_json(Answer(answer="a", notes=[note]).model_dump_json()).notes == [note]
