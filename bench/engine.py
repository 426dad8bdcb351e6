"""Engine speed on this machine: embedded vLLM vs the same engine behind its OpenAI server (HTTP).

Models, built on the fly (no downloads): the tiny test Llama (2 layers, hidden 128) and Megrez-3B's
real shape (vocabulary 122880, hidden 2560, 40/10 heads) with 2 of its 32 layers and dummy weights.
Both run float32 and eager (as the tests do). For each model and path:

- time to first token (TTFT) and decode speed on fresh prompts (prefix cache reset before each run);
- prefix-cache hits across requests: two unrelated questions 37 minutes apart under the search-mode
  system prompt, its time floored to the hour (our default) vs to the second;
- prefix-cache hits on a two-turn conversation: turn 2's prompt is turn 1's prompt plus the answer
  and a follow-up question; hit ratio = num_cached_tokens / prompt tokens. vLLM caches whole blocks
  only (128 tokens on CPU), so a partial last block is always recomputed.

    .venv/bin/python -m bench.engine [--runs 3] [--tokens 32] [--skip-shape] [--model PATH_OR_HUB_ID]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from engine.base import Engine, Sampling
from engine.config import EngineConfig
from engine.openai_engine import OpenAIEngine
from engine.protocol import Message, PromptEncoder, TimeGranularity, system_prompt
from engine.vllm_engine import VLLMEngine
from scripts.tiny_models import build_megrez_shape, build_tiny_llama, serve_in_process, tiny_engine_config

SERVED = "megrez-bench"
_ids = itertools.count()

SENTENCES = (
    "The weather changes quickly today according to the news.",
    "The exchange rate is reported by several sources as of 2024.",
    "The search engine was updated on Friday evening in Beijing and Shanghai.",
    "今天的天气变化很快，请注意。",
    "人民币汇率由多个来源报道[citation:1]。",
)


@dataclass(frozen=True, slots=True)
class Speed:
    ttft_s: float
    decode_tok_s: float


@dataclass(frozen=True, slots=True)
class CacheHits:
    turn1_prompt: int
    turn1_cached: int
    turn2_prompt: int
    turn2_cached: int


def contexts(seed: int, n: int = 6) -> str:
    """Distinct search contexts per seed, so that fresh prompts share nothing but the chat markup."""
    return "\n".join(f"[[citation:{i}]] {seed}-{i}: {SENTENCES[(seed + i) % len(SENTENCES)]} " * 3 for i in range(n))


async def timed(engine: Engine, prompt: list[int], tokens: int) -> Speed:
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    sampling = Sampling(max_tokens=tokens, min_tokens=tokens)
    async for delta in engine.stream(prompt, sampling, request_id=f"bench-{next(_ids)}"):
        now = time.perf_counter()
        if delta.token_ids and not count:
            first = now
        count += len(delta.token_ids)
        last = now
    return Speed(first - start, (count - 1) / (last - first) if count > 1 and last > first else 0.0)


async def speed(engine: Engine, local: VLLMEngine, encoder: PromptEncoder, runs: int, tokens: int) -> Speed:
    results = []
    for run in range(runs):
        await local.llm.reset_prefix_cache()
        prompt = encoder.encode([Message("user", f"Question {run}?\n{contexts(run)}")])
        results.append(await timed(engine, prompt, tokens))
    return Speed(statistics.median(r.ttft_s for r in results), statistics.median(r.decode_tok_s for r in results))


async def cache_hits(engine: Engine, local: VLLMEngine, encoder: PromptEncoder, tokens: int) -> CacheHits:
    await local.llm.reset_prefix_cache()
    turn1 = [Message("user", f"What changed today?\n{contexts(100)}")]
    answer, prompt1, cached1 = "", 0, 0
    async for delta in engine.stream(
        encoder.encode(turn1), Sampling(max_tokens=tokens), request_id=f"bench-{next(_ids)}"
    ):
        answer += delta.text
        prompt1 = delta.prompt_tokens or prompt1
        cached1 = delta.num_cached_tokens if delta.num_cached_tokens is not None else cached1
    turn2 = [*turn1, Message("assistant", answer), Message("user", "And the exchange rate?")]
    prompt2, cached2 = 0, 0
    async for delta in engine.stream(encoder.encode(turn2), Sampling(max_tokens=1), request_id=f"bench-{next(_ids)}"):
        prompt2 = delta.prompt_tokens or prompt2
        cached2 = delta.num_cached_tokens if delta.num_cached_tokens is not None else cached2
    return CacheHits(prompt1, cached1, prompt2, cached2)


async def system_prompt_hits(
    engine: Engine, local: VLLMEngine, encoder: PromptEncoder, granularity: TimeGranularity
) -> tuple[int, int]:
    """Cached tokens of a second, unrelated request 37 minutes and 1 second after a first one: both
    carry the search-mode system prompt, whose time line is floored to ``granularity``."""
    first = datetime(2024, 9, 20, 18, 5, 12)
    cached, prompt = 0, 0
    for now, question in ((first, "What changed today?"), (first + timedelta(minutes=37, seconds=1), "Who won?")):
        if now is first:
            await local.llm.reset_prefix_cache()
        system = system_prompt(now, search=True, granularity=granularity)
        ids = encoder.encode([Message("system", system), Message("user", f"{question}\n{contexts(7)}")])
        async for delta in engine.stream(ids, Sampling(max_tokens=1), request_id=f"bench-{next(_ids)}"):
            prompt = delta.prompt_tokens or prompt
            cached = delta.num_cached_tokens if delta.num_cached_tokens is not None else cached
    return cached, prompt


async def bench_model(
    name: str, config: EngineConfig, runs: int, tokens: int
) -> list[tuple[str, str, Speed, CacheHits]]:
    start = time.perf_counter()
    rows = []
    async with VLLMEngine(config) as local:
        print(f"{name}: engine started in {time.perf_counter() - start:.1f} s", flush=True)
        encoder = PromptEncoder(local.tokenizer)
        app = await local.openai_app(SERVED, ["--enable-prompt-tokens-details"])
        async with serve_in_process(app) as url:
            remote_config = EngineConfig(backend="openai", model=config.model, openai_base_url=url, openai_model=SERVED)
            async with OpenAIEngine(remote_config) as remote:
                for path, engine in (("embedded", local), ("remote", remote)):
                    await timed(engine, encoder.encode([Message("user", "warm-up")]), 2)
                    s = await speed(engine, local, encoder, runs, tokens)
                    c = await cache_hits(engine, local, encoder, tokens)
                    if path == "embedded":
                        for granularity in ("hour", "second"):
                            cached, prompt = await system_prompt_hits(engine, local, encoder, granularity)
                            print(
                                f"{name}: time floored to the {granularity}: next request reuses "
                                f"{cached}/{prompt} prompt tokens",
                                flush=True,
                            )
                    rows.append((name, path, s, c))
    return rows


async def main_async(args: argparse.Namespace) -> None:
    if args.model:
        rows = await bench_model(args.model, EngineConfig(model=args.model), args.runs, args.tokens)
        print_table(rows)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_llama(Path(tmp) / "tiny")
        rows += await bench_model("tiny", tiny_engine_config(tiny), args.runs, args.tokens)
        if not args.skip_shape:
            shape = build_megrez_shape(Path(tmp) / "shape")
            config = tiny_engine_config(shape, load_format="dummy", max_model_len=2048)
            rows += await bench_model("megrez-3b-shape-2L", config, args.runs, args.shape_tokens)
    print_table(rows)


def print_table(rows: list[tuple[str, str, Speed, CacheHits]]) -> None:
    print(
        f"\n{'model':20} {'path':9} {'TTFT ms':>8} {'decode tok/s':>13} {'turn 1 cached':>14} {'turn 2 cached':>14} {'hit ratio':>9}"
    )
    for name, path, s, c in rows:
        ratio = c.turn2_cached / c.turn2_prompt if c.turn2_prompt else 0.0
        print(
            f"{name:20} {path:9} {s.ttft_s * 1000:8.0f} {s.decode_tok_s:13.1f} "
            f"{f'{c.turn1_cached}/{c.turn1_prompt}':>14} {f'{c.turn2_cached}/{c.turn2_prompt}':>14} {ratio:9.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed requests per model and path (median shown)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request, tiny model")
    parser.add_argument("--shape-tokens", type=int, default=16, help="tokens generated per request, real shape")
    parser.add_argument("--skip-shape", action="store_true", help="only the tiny model")
    parser.add_argument(
        "--model",
        help="a real checkpoint (folder or hub id) to measure instead of the built-in test models (GPU hosts)",
    )
    args = parser.parse_args()
    # On a CPU host, a 1 GiB KV cache unless one is set (vLLM's default takes a share of RAM); GPUs ignore it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
