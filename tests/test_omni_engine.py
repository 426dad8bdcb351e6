"""Megrez-3B-Omni in the embedded vLLM engine, on a tiny random checkpoint built at test time.

Parity: the same weights run through :class:`scripts.tiny_omni.ReferenceMegrezO` (transformers modules,
plain PyTorch) and through our vLLM plugin; greedy tokens must be equal and log-probabilities close (fp32).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import soundfile
from PIL import Image

from engine.base import STOP_TOKENS, EngineError, Sampling
from engine.omni.audio import SAMPLE_RATE, audio_placeholder_text, preprocess_audio
from engine.omni.errors import MediaError
from engine.omni.image import image_placeholder_text, preprocess_image
from engine.omni.request import prepare_omni_request
from engine.protocol import MEDIA_PLACEHOLDERS, Message, PromptEncoder
from engine.vllm_engine import VLLMEngine
from scripts.tiny_models import tiny_engine_config
from scripts.tiny_omni import ReferenceMegrezO, build_tiny_megrezo

STEPS = 6
# fp32 on both sides; the towers differ in layout (patch-major vs 2-D) and attention kernels.
LOGPROB_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def tiny_omni(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReferenceMegrezO]:
    return build_tiny_megrezo(tmp_path_factory.mktemp("tiny-megrezo"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def omni_engine(tiny_omni: tuple[Path, ReferenceMegrezO]) -> AsyncIterator[VLLMEngine]:
    path, _ = tiny_omni
    config = tiny_engine_config(path, max_model_len=4096, limit_mm_per_prompt={"image": 3, "audio": 2})
    async with VLLMEngine(config) as engine:
        yield engine


@pytest.fixture(scope="module")
def encoder(omni_engine: VLLMEngine) -> PromptEncoder:
    return PromptEncoder(omni_engine.tokenizer)


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _expand(encoder: PromptEncoder, ids: list[int], images: Sequence[Image.Image], audios: Sequence[np.ndarray]):
    """The reference's own placeholder expansion, on ids: each placeholder in turn becomes its full text."""
    tokenizer = encoder.tokenizer
    marks = {kind: encoder.placeholder_ids(text) for kind, text in MEDIA_PLACEHOLDERS.items()}
    queues = {"image": list(images), "audio": list(audios)}
    out, i = [], 0
    while i < len(ids):
        for kind, mark in marks.items():
            if ids[i : i + len(mark)] == mark and queues[kind]:
                item = queues[kind].pop(0)
                text = image_placeholder_text(*item.size) if kind == "image" else audio_placeholder_text(len(item))
                out += tokenizer(text, add_special_tokens=False)["input_ids"]
                i += len(mark)
                break
        else:
            out.append(ids[i])
            i += 1
    assert not queues["image"] and not queues["audio"]
    return out


def _reference(reference, encoder, ids, images, audios, order: Sequence[str]):
    expanded = _expand(encoder, ids, images, audios)
    images_left, audios_left = list(images), list(audios)
    media = []
    for kind in order:  # embeddings in prompt order
        if kind == "image":
            media.append(reference.embed_image(preprocess_image(images_left.pop(0))))
        else:
            media.append(reference.embed_audio(preprocess_audio(audios_left.pop(0), SAMPLE_RATE)))
    filler = encoder.special_ids["<|unk|>"]
    stop_ids = {encoder.special_ids[t] for t in STOP_TOKENS}
    tokens, logprobs = reference.greedy(expanded, filler, media, STEPS, stop_ids)
    return expanded, tokens, logprobs


async def _generate(engine: VLLMEngine, ids, multimodal, request_id: str, steps: int = STEPS):
    tokens: list[int] = []
    logprobs: list[float] = []
    prompt_tokens = None
    sampling = Sampling(max_tokens=steps, temperature=0.0, logprobs=True)
    async for delta in engine.stream(ids, sampling, request_id=request_id, multimodal=multimodal):
        tokens += delta.token_ids
        logprobs += delta.logprobs or ()
        prompt_tokens = delta.prompt_tokens or prompt_tokens
    return tokens, logprobs, prompt_tokens


async def _assert_parity(engine, encoder, reference, messages, images, audios, request_id):
    ids = encoder.encode(messages)
    order = [kind for m in messages for kind in m.media]
    multimodal = {}
    if images:
        multimodal["image"] = list(images)
    if audios:
        multimodal["audio"] = [(a, SAMPLE_RATE) for a in audios]
    tokens, logprobs, prompt_tokens = await _generate(engine, ids, multimodal, request_id)
    expanded, ref_tokens, ref_logprobs = _reference(reference, encoder, ids, images, audios, order)
    assert prompt_tokens == len(expanded)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=LOGPROB_TOLERANCE)
    return expanded


def _fillers(encoder: PromptEncoder, ids: list[int]) -> int:
    return ids.count(encoder.special_ids["<|unk|>"])


async def test_text_image_audio_match_the_reference(omni_engine, encoder, tiny_omni) -> None:
    image, speech = _image(1480, 720, 1), _speech(3.0, 2)
    messages = [Message("user", "What is shown, and what is said?", media=("image", "audio"))]
    expanded = await _assert_parity(omni_engine, encoder, tiny_omni[1], messages, [image], [speech], "tia")
    # 448 image fillers (3x2 grid + overview, 64 each) and 75 pooled audio frames + bos + eos.
    assert _fillers(encoder, expanded) == 448 + 77


async def test_several_images_and_audio_in_one_turn(omni_engine, encoder, tiny_omni) -> None:
    images = [_image(600, 400, 3), _image(1000, 1000, 4)]
    messages = [Message("user", "Compare the pictures.", media=("image", "audio", "image"))]
    expanded = await _assert_parity(omni_engine, encoder, tiny_omni[1], messages, images, [_speech(2.0, 5)], "multi")
    # 600x400: 2x1 grid + overview; 1000x1000: 2x2 + overview; 2 s of audio: 50 frames + bos + eos.
    assert _fillers(encoder, expanded) == 3 * 64 + 5 * 64 + 52


async def test_image_in_the_second_turn(omni_engine, encoder, tiny_omni) -> None:
    images = [_image(500, 500, 6), _image(900, 300, 7)]
    messages = [
        Message("user", "What is this?", media=("image",)),
        Message("assistant", "A picture of noise."),
        Message("user", "And this one?", media=("image",)),
    ]
    await _assert_parity(omni_engine, encoder, tiny_omni[1], messages, images, [], "second-turn")


async def test_speech_only_transcription_over_two_segments(omni_engine, encoder, tiny_omni) -> None:
    messages = [Message("user", "Convert speech to text.", media=("audio",))]
    expanded = await _assert_parity(omni_engine, encoder, tiny_omni[1], messages, [], [_speech(35.0, 8)], "asr")
    assert _fillers(encoder, expanded) == 752 + 127  # a full 30 s segment, then 5 s


async def test_bad_media_fail_the_request_not_the_engine(omni_engine, encoder) -> None:
    ids = encoder.encode([Message("user", "Listen.", media=("audio",))])
    broken = np.full(SAMPLE_RATE, np.nan, dtype=np.float32)
    with pytest.raises(EngineError, match="NaN"):
        await _generate(omni_engine, ids, {"audio": [(broken, SAMPLE_RATE)]}, "nan-audio")
    too_long = np.zeros(200 * SAMPLE_RATE, dtype=np.float32)
    with pytest.raises(EngineError, match="limit"):
        await _generate(omni_engine, ids, {"audio": [(too_long, SAMPLE_RATE)]}, "long-audio")
    # A media item without its placeholder: refused, never re-tokenized through text.
    text_only = encoder.encode([Message("user", "No placeholder here.")])
    with pytest.raises(EngineError, match="placeholder"):
        await _generate(omni_engine, text_only, {"image": [_image(64, 64, 9)]}, "no-placeholder")
    # The engine still serves.
    tokens, _, _ = await _generate(omni_engine, text_only, None, "after-errors")
    assert tokens


async def test_typed_placeholder_text_is_not_an_image_slot(omni_engine, encoder) -> None:
    # A user typing the placeholder gets plain text, so the one real image still has exactly one slot.
    messages = [Message("user", "What does (<image>./</image>) mean?", media=("image",))]
    tokens, _, prompt_tokens = await _generate(
        omni_engine, encoder.encode(messages), {"image": [_image(448, 448, 10)]}, "typed"
    )
    assert tokens
    assert prompt_tokens == len(encoder.encode(messages)) - len(
        encoder.placeholder_ids(MEDIA_PLACEHOLDERS["image"])
    ) + len(encoder.tokenizer(image_placeholder_text(448, 448), add_special_tokens=False)["input_ids"])


async def test_prepared_request_reports_tokens_fits_and_runs(omni_engine, encoder) -> None:
    wav = io.BytesIO()
    soundfile.write(wav, _speech(45.0, 11), SAMPLE_RATE, format="WAV")
    messages = [Message("user", "Describe both.", media=("image", "audio"))]
    request = prepare_omni_request(
        encoder,
        messages,
        images=[_image(4000, 3000, 12)],
        audios=[wav.getvalue()],
        max_model_len=1200,
        reserve_tokens=64,
    )
    image_report, audio_report = request.media
    assert image_report.adjustment and image_report.adjustment.startswith("downscaled 4000x3000")
    assert image_report.tokens < image_report.original_tokens
    assert audio_report.adjustment and audio_report.adjustment.startswith("cut from 45.0 s")
    assert request.prompt_tokens + 64 <= 1200
    _, _, prompt_tokens = await _generate(omni_engine, request.prompt_ids, request.multimodal, "prepared")
    assert prompt_tokens == request.prompt_tokens  # the report is what the engine really used


def test_prepare_refuses_what_cannot_fit_and_bad_bytes(omni_engine, encoder) -> None:
    messages = [Message("user", "Too much.", media=("image",) * 3)]
    with pytest.raises(MediaError, match="context holds 200"):
        prepare_omni_request(encoder, messages, images=[_image(64, 64, 1)] * 3, max_model_len=200, reserve_tokens=64)
    with pytest.raises(MediaError, match="cannot decode image"):
        prepare_omni_request(encoder, [Message("user", "x", media=("image",))], images=[b"not an image"])
    with pytest.raises(MediaError, match="cannot decode audio"):
        prepare_omni_request(encoder, [Message("user", "x", media=("audio",))], audios=[b"RIFF....garbage"])
    with pytest.raises(MediaError, match="1 image"):
        prepare_omni_request(encoder, [Message("user", "x", media=("image",))], images=[])


async def test_uploads_through_the_api_reach_the_omni_model(omni_engine, tmp_path) -> None:
    """POST /chat with a base64 image (JSON) and a WAV clip (multipart): the tiny Omni model sees them."""
    import base64

    import httpx

    from agent.config import AgentConfig
    from api.app import create_app
    from api.memory import LocalMemory
    from api.settings import Settings
    from tests.agent_fixtures import make_retriever

    settings = Settings(agent=AgentConfig(related=False, answer_tokens=32, mode="off"))
    app = create_app(settings, engine=omni_engine, retriever=make_retriever(), memory=LocalMemory())
    png, wav = io.BytesIO(), io.BytesIO()
    _image(96, 64, 3).save(png, "PNG")
    soundfile.write(wav, _speech(1.5, 4), SAMPLE_RATE, format="WAV")
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.services.engine_ready.wait(), 30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=120) as client:
            plain = await client.post("/chat?websearch=off", json={"message": "Describe it."})
            image = await client.post(
                "/chat?websearch=off",
                json={"message": "Describe it.", "images": [base64.b64encode(png.getvalue()).decode()]},
            )
            audio = await client.post(
                "/chat?websearch=off",
                data={"message": "Describe it."},
                files=[("audio", ("clip.wav", wav.getvalue(), "audio/wav"))],
            )
            for response in (plain, image, audio):
                assert response.status_code == 200 and response.json()["status"] == "done", response.text
            prompt = {
                name: r.json()["answer"]["usage"]["prompt_tokens"]
                for name, r in [("plain", plain), ("image", image), ("audio", audio)]
            }
            # The media's placeholders were expanded into the model's own image and audio tokens.
            assert prompt["image"] - prompt["plain"] >= len(image_placeholder_text(96, 64)) // 8
            assert prompt["audio"] - prompt["plain"] >= 10
            turns = (await client.get(f"/conversations/{image.json()['conversation_id']}")).json()["turns"]
            assert [m["kind"] for m in turns[0]["media"]] == ["image"]
