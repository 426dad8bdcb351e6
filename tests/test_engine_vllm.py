"""The embedded vLLM engine on tiny models (CPU): streaming, abort, stop tokens, structured output."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path

import pytest

from engine.base import STOP_TOKENS, Delta, Engine, EngineError, Sampling
from engine.factory import build_engine
from engine.parser import FunctionCallEvent, parse_forced_call
from engine.protocol import FORCED_SEARCH_REGEX, FUNCTION_END, Message, PromptEncoder
from engine.vllm_engine import VLLMEngine
from scripts.tiny_models import MEGREZ_SPECIAL_IDS, build_megrez_shape, tiny_engine_config

pytestmark = pytest.mark.slow

PROMPT = "<|role_start|>user<|role_end|>The weather today?<|turn_end|><|role_start|>assistant<|role_end|>"
_ids = itertools.count()


def rid() -> str:
    return f"test-{next(_ids)}"


async def collect(engine: Engine, prompt: str | list[int], sampling: Sampling) -> list[Delta]:
    return [d async for d in engine.stream(prompt, sampling, request_id=rid())]


async def wait_idle(engine: VLLMEngine) -> int:
    """Unfinished requests once the abort has gone through (it takes an event-loop round trip or two)."""
    for _ in range(100):
        if engine.llm.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    return engine.llm.get_num_unfinished_requests()


async def test_deltas_concatenate_to_the_completion(tiny_engine: VLLMEngine) -> None:
    deltas = await collect(tiny_engine, PROMPT, Sampling(max_tokens=16, logprobs=True))
    assert len(deltas) == 16
    assert [d.finish_reason for d in deltas] == [None] * 15 + ["length"]
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == 16
    assert "".join(d.text for d in deltas) == tiny_engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert deltas[0].prompt_tokens == await tiny_engine.count_tokens(PROMPT)


async def test_a_prompt_past_the_context_is_an_engine_error(tiny_engine: VLLMEngine) -> None:
    ids = tiny_engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    too_long = ids * (tiny_engine.max_model_len // len(ids) + 1)
    with pytest.raises(EngineError, match="maximum context length"):
        await collect(tiny_engine, too_long, Sampling(max_tokens=8))
    assert (await collect(tiny_engine, ids, Sampling(max_tokens=2)))[-1].finished  # still serving


async def test_token_id_prompt_equals_text_prompt(tiny_engine: VLLMEngine) -> None:
    ids = tiny_engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    by_text = await collect(tiny_engine, PROMPT, Sampling(max_tokens=8))
    by_ids = await collect(tiny_engine, ids, Sampling(max_tokens=8))
    assert [d.token_ids for d in by_ids] == [d.token_ids for d in by_text]
    assert by_ids[0].prompt_tokens == len(ids)


async def test_cancelling_the_consumer_aborts_the_request(tiny_engine: VLLMEngine) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in tiny_engine.stream(PROMPT, Sampling(max_tokens=1000, min_tokens=1000), request_id=rid()):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    assert tiny_engine.llm.get_num_unfinished_requests() == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await wait_idle(tiny_engine) == 0


async def test_closing_the_stream_aborts_the_request(tiny_engine: VLLMEngine) -> None:
    sampling = Sampling(max_tokens=1000, min_tokens=1000)
    async with contextlib.aclosing(tiny_engine.stream(PROMPT, sampling, request_id=rid())) as stream:
        async for _ in stream:
            break
    assert await wait_idle(tiny_engine) == 0


async def test_explicit_abort_ends_the_stream(tiny_engine: VLLMEngine) -> None:
    request_id = rid()
    deltas = []
    async for delta in tiny_engine.stream(PROMPT, Sampling(max_tokens=1000, min_tokens=1000), request_id=request_id):
        deltas.append(delta)
        if len(deltas) == 2:
            await tiny_engine.abort(request_id)
    assert deltas[-1].finish_reason == "abort"
    assert len(deltas) < 20
    assert await wait_idle(tiny_engine) == 0


@pytest.mark.parametrize("token", STOP_TOKENS)
async def test_megrez_stop_tokens_end_generation(tiny_engine: VLLMEngine, token: str) -> None:
    # A random model never picks a stop token on its own: bias it, and hold it off for 3 tokens.
    token_id = tiny_engine.tokenizer.get_vocab()[token]
    deltas = await collect(tiny_engine, PROMPT, Sampling(max_tokens=50, min_tokens=3, logit_bias={token_id: 100}))
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == 4 and ids[-1] == token_id
    assert deltas[-1].finish_reason == "stop"
    # <|turn_end|> is the model's EOS, which vLLM reports without a stop reason.
    assert deltas[-1].stop_reason in (token_id, None)
    assert token not in "".join(d.text for d in deltas)


async def test_stop_string_and_extra_stop_token_id(tiny_engine: VLLMEngine) -> None:
    free = await collect(tiny_engine, PROMPT, Sampling(max_tokens=8))
    third = free[2].token_ids[0]
    by_id = await collect(tiny_engine, PROMPT, Sampling(max_tokens=8, stop_token_ids=(third,)))
    assert [t for d in by_id for t in d.token_ids] == [t for d in free[:3] for t in d.token_ids]
    assert (by_id[-1].finish_reason, by_id[-1].stop_reason) == ("stop", third)

    stop = free[3].text.strip()
    assert stop
    by_string = await collect(tiny_engine, PROMPT, Sampling(max_tokens=8, stop=(stop,)))
    assert (by_string[-1].finish_reason, by_string[-1].stop_reason) == ("stop", stop)
    assert stop not in "".join(d.text for d in by_string)


async def test_forced_search_output_parses_as_a_call(tiny_engine: VLLMEngine) -> None:
    tok = tiny_engine.tokenizer
    prompt = PromptEncoder(tok).encode([Message("user", "北京今天的天气")], force_search=True)
    # Closing the query soon: bias the token that starts '"}}' (the regex then only allows stop tokens).
    close = tok.encode('"}}', add_special_tokens=False)[0]
    sampling = Sampling(
        max_tokens=40,
        regex=FORCED_SEARCH_REGEX,
        logit_bias={close: 30},
        stop_token_ids=(tok.get_vocab()[FUNCTION_END],),
    )
    deltas = await collect(tiny_engine, prompt, sampling)
    assert deltas[-1].finish_reason == "stop"
    call = parse_forced_call("".join(d.text for d in deltas))
    assert isinstance(call, FunctionCallEvent), call
    assert call.name == "googleWebSearch"
    assert isinstance(call.arguments["query"], str) and call.arguments["query"]


async def test_count_tokens_and_health(tiny_engine: VLLMEngine) -> None:
    text = "The exchange rate is reported by several sources. 人民币汇率变化很快。"
    assert await tiny_engine.count_tokens(text) == len(tiny_engine.tokenizer.encode(text, add_special_tokens=False))
    health = await tiny_engine.health()
    assert health.ok and health.backend == "vllm" and health.unfinished_requests == 0
    assert tiny_engine.max_model_len == 2048


async def test_dummy_megrez_3b_shape_generates(tmp_path: Path) -> None:
    """Real Megrez-3B vocabulary, head layout and rope, 2 of 32 layers (hf_overrides), random weights."""
    model_dir = build_megrez_shape(tmp_path / "megrez-shape", num_hidden_layers=32)
    config = tiny_engine_config(
        model_dir, load_format="dummy", hf_overrides={"num_hidden_layers": 2}, max_model_len=512
    )
    engine = build_engine(config)
    assert isinstance(engine, VLLMEngine)
    async with engine:
        assert engine.llm.model_config.architecture == "LlamaForCausalLM"
        hf_config = engine.llm.model_config.hf_config
        assert (hf_config.num_hidden_layers, hf_config.num_attention_heads, hf_config.num_key_value_heads) == (
            2,
            40,
            10,
        )
        # The vocabulary is far larger than the tiny tokenizer, which vLLM accepts.
        assert engine.llm.model_config.get_vocab_size() == 122880 > len(engine.tokenizer)
        eos = MEGREZ_SPECIAL_IDS["<|eos|>"]
        assert engine.tokenizer.encode("<|eos|>", add_special_tokens=False) == [eos]

        deltas = await collect(engine, PROMPT, Sampling(max_tokens=3))
        assert [t for d in deltas for t in d.token_ids] and deltas[-1].finish_reason == "length"
        stopped = await collect(engine, PROMPT, Sampling(max_tokens=5, min_tokens=1, logit_bias={eos: 100}))
        assert (stopped[-1].finish_reason, stopped[-1].stop_reason) == ("stop", eos)
