"""Megrez-3B-Omni on this machine: media preprocessing speed, and engine time for text+image prompts.

- Processor: our MiniCPM-V slicing + patch layout per image (several sizes) and Whisper features per
  30 s of audio, median of ``--runs``; the baseline in the same run is decoding the same PNG with PIL.
- Engine (tiny random MegrezO, fp32, eager; ``--shape`` adds the real widths with 1 layer per stack and
  dummy weights): time to first token for the same question without media (baseline), with a 1480x720
  image, with image + 5 s of audio, and the same image request again (vLLM's prefix and encoder caches).

    .venv/bin/python -m bench.omni [--runs 5] [--shape] [--model PATH_OR_HUB_ID]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from engine.base import Sampling
from engine.config import EngineConfig
from engine.omni.audio import SAMPLE_RATE, preprocess_audio
from engine.omni.image import load_image, preprocess_image, reshape_by_patch
from engine.protocol import Message, PromptEncoder
from engine.vllm_engine import VLLMEngine
from scripts.tiny_models import tiny_engine_config
from scripts.tiny_omni import build_megrezo_shape, build_tiny_megrezo

IMAGE_SIZES = ((448, 448), (1480, 720), (1344, 1344), (4000, 3000))
_ids = itertools.count()


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _photo(width: int, height: int) -> Image.Image:
    # Smooth gradients plus noise: closer to a photo than flat colour, for both PNG size and resampling.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) * 127 // max(width + height, 1)], -1)
    noise = np.random.default_rng(0).integers(0, 24, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def bench_processor(runs: int) -> None:
    print(f"Processor (median of {runs} runs)")
    print(f"{'input':>22} {'tokens':>7} {'decode PNG ms':>14} {'ours ms':>9} {'ratio':>6}")
    for width, height in IMAGE_SIZES:
        buf = io.BytesIO()
        _photo(width, height).save(buf, format="PNG")
        data = buf.getvalue()
        image = load_image(data)

        def ours(image: Image.Image = image) -> None:
            for p in preprocess_image(image).pixel_values:
                reshape_by_patch(p)

        decode = _median_ms(lambda data=data: load_image(data), runs)
        took = _median_ms(ours, runs)
        tokens = preprocess_image(image).num_tokens
        print(f"{f'image {width}x{height}':>22} {tokens:>7} {decode:>14.1f} {took:>9.1f} {took / decode:>6.2f}")
    for seconds in (30, 45):
        clip = np.random.default_rng(1).standard_normal(seconds * SAMPLE_RATE).astype(np.float32) * 0.1
        took = _median_ms(lambda clip=clip: preprocess_audio(clip, SAMPLE_RATE), runs)
        tokens = preprocess_audio(clip, SAMPLE_RATE).num_tokens
        per_30 = took * 30 / seconds
        print(f"{f'audio {seconds} s':>22} {tokens:>7} {'':>14} {took:>9.1f}   ({per_30:.1f} ms per 30 s)")
    clip = np.random.default_rng(2).standard_normal(30 * 44_100).astype(np.float32) * 0.1
    took = _median_ms(lambda: preprocess_audio(clip, 44_100), runs)
    print(f"{'audio 30 s @ 44.1 kHz':>22} {752:>7} {'':>14} {took:>9.1f}   (soxr resampling included)")


async def _ttft(engine: VLLMEngine, ids: list[int], multimodal: dict | None) -> float:
    start = time.perf_counter()
    async for _ in engine.stream(ids, Sampling(max_tokens=1), request_id=f"omni-{next(_ids)}", multimodal=multimodal):
        break
    return time.perf_counter() - start


async def bench_engine(label: str, path: Path | str, runs: int, *, real: bool = False, **overrides: object) -> None:
    limits = {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 1, "audio": 1}}
    # Real checkpoints run with the engine's defaults (bf16 on GPU, compiled); test models fp32 and eager.
    config = EngineConfig(model=str(path), **limits) if real else tiny_engine_config(Path(path), **limits, **overrides)
    start = time.perf_counter()
    async with VLLMEngine(config) as engine:
        print(f"\nEngine: {label} (start {time.perf_counter() - start:.1f} s); time to first token, median of {runs}")
        encoder = PromptEncoder(engine.tokenizer)
        question = "Describe what you see and hear in detail."
        clip = np.random.default_rng(3).standard_normal(5 * SAMPLE_RATE).astype(np.float32) * 0.1
        cases = {
            "text only (baseline)": ([Message("user", question)], None, False),
            "text + image 1480x720": ([Message("user", question, media=("image",))], "image", False),
            "text + image + 5 s audio": ([Message("user", question, media=("image", "audio"))], "both", False),
            "same image again (cached)": ([Message("user", question, media=("image",))], "image", True),
        }
        baseline = None
        for case, (name, (messages, media, repeat)) in enumerate(cases.items()):
            times = []
            for run in range(runs):
                await engine.llm.reset_prefix_cache()
                # A fresh image each run defeats vLLM's processor and encoder caches, except when measuring them.
                image = _photo(1480, 720) if repeat else _photo(1470 - 3 * case - run, 720)  # same 3x2 grid
                multimodal = None
                if media in ("image", "both"):
                    multimodal = {"image": [image]}
                if media == "both":
                    multimodal["audio"] = [(clip[: len(clip) - run], SAMPLE_RATE)]
                ids = encoder.encode(messages)
                if repeat:
                    await _ttft(engine, ids, multimodal)  # warm the caches with this exact image
                times.append(await _ttft(engine, ids, multimodal))
            took = statistics.median(times)
            baseline = baseline or took
            print(f"  {name:<28} {took * 1000:>9.0f} ms  ({took / baseline:.1f}x baseline)")


async def main(runs: int, shape: bool, model: str | None) -> None:
    bench_processor(runs)
    if model:
        await bench_engine(model, model, runs, real=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tiny, _ = build_tiny_megrezo(Path(tmp) / "tiny")
        await bench_engine("tiny MegrezO (hidden 128, 2 layers per stack)", tiny, runs)
        if shape:
            real = build_megrezo_shape(Path(tmp) / "shape", llm_layers=1, vision_layers=1, audio_layers=1)
            await bench_engine(
                "Megrez-3B-Omni widths, 1 layer per stack, dummy weights", real, runs, load_format="dummy"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--shape", action="store_true", help="also run the real widths (≈1 min start, slow)")
    parser.add_argument("--model", help="a real Megrez-3B-Omni checkpoint (folder or hub id) instead of test models")
    args = parser.parse_args()
    # On a CPU host, a 1 GiB KV cache unless one is set (vLLM's default takes a share of RAM); GPUs ignore it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    asyncio.run(main(args.runs, args.shape, args.model))
