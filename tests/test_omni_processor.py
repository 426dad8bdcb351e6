"""Megrez-3B-Omni's vLLM processor alone (no weights, no engine): registration, slicing, placeholder expansion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.omni.audio import SAMPLE_RATE, audio_token_count
from engine.omni.config import MegrezOConfig
from engine.omni.errors import MediaError
from engine.omni.image import image_token_count
from engine.protocol import MEDIA_PLACEHOLDERS, Message, PromptEncoder
from scripts.megrez_tokenizer import build_megrez_tokenizer
from scripts.tiny_omni import TINY_FIELDS, megrezo_config


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("megrezo-config")
    build_megrez_tokenizer(path)
    megrezo_config(path, TINY_FIELDS).save_pretrained(path)
    return path


def _processor(path: Path, *, trust_remote_code: bool = False):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does: runs our entry point
    config = ModelConfig(model=str(path), dtype="float32", trust_remote_code=trust_remote_code)
    return config, MULTIMODAL_REGISTRY.create_processor(config)


@pytest.fixture(scope="module")
def processor(checkpoint_dir: Path):
    return _processor(checkpoint_dir)[1]


def _apply(processor, messages: list[Message], mm_data: dict):
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.multimodal.processing.processor import TimingContext

    ids = PromptEncoder(processor.info.get_tokenizer()).encode(messages)
    items = processor.info.parse_mm_data(mm_data)
    return processor.apply(ProcessorInputs(prompt=ids, mm_data_items=items), TimingContext(enabled=False))


def _embeds(placeholder) -> int:
    return int(placeholder.is_embed.sum()) if placeholder.is_embed is not None else placeholder.length


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_the_entry_point_registers_our_config_and_model(checkpoint_dir: Path, trust_remote_code: bool) -> None:
    from vllm import ModelRegistry

    config, _ = _processor(checkpoint_dir, trust_remote_code=trust_remote_code)
    assert isinstance(config.hf_config, MegrezOConfig)
    assert config.hf_config.audio_config.n_state == 64
    assert "MegrezO" in ModelRegistry.get_supported_archs()
    assert config.is_multimodal_model


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((1480, 720), 448),  # the vendor's figure: 3x2 grid + overview
        ((720, 1480), 448),
        ((448, 448), 64),  # one tile: overview only
        ((100, 60), 64),  # small images are upscaled, not sliced
        ((1344, 1344), 640),  # the most: 3x3 grid + overview
        ((4000, 1000), 576),
        ((1000, 1000), 320),
    ],
)
def test_image_placeholder_expansion(processor, size: tuple[int, int], tokens: int) -> None:
    out = _apply(processor, [Message("user", "Describe.", media=("image",))], {"image": [Image.new("RGB", size)]})
    (placeholder,) = out["mm_placeholders"]["image"]
    assert _embeds(placeholder) == tokens == image_token_count(*size)
    filler = processor.info.filler_id
    span = out["prompt_token_ids"][placeholder.offset : placeholder.offset + placeholder.length]
    assert span.count(filler) == tokens  # embeddings land on the <|unk|> fillers only


@pytest.mark.parametrize(("seconds", "tokens"), [(1.0, 27), (30.0, 752), (45.0, 1129)])
def test_audio_placeholder_expansion(processor, seconds: float, tokens: int) -> None:
    clip = np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)
    out = _apply(processor, [Message("user", "Convert speech to text.", media=("audio",))], {"audio": [clip]})
    (placeholder,) = out["mm_placeholders"]["audio"]
    assert _embeds(placeholder) == tokens


def test_stereo_44k_audio_is_downmixed_and_resampled(processor) -> None:
    stereo = np.zeros((2, 44_100 * 2), dtype=np.float32)
    out = _apply(processor, [Message("user", "What is said?", media=("audio",))], {"audio": [(stereo, 44_100)]})
    (placeholder,) = out["mm_placeholders"]["audio"]
    assert _embeds(placeholder) == audio_token_count(44_100 * 2, 44_100) == 52


def test_several_images_and_mixed_modalities_keep_prompt_order(processor) -> None:
    messages = [
        Message("user", "First.", media=("image", "audio")),
        Message("assistant", "Noted."),
        Message("user", "Second.", media=("image",)),
    ]
    images = [Image.new("RGB", (1480, 720)), Image.new("RGB", (300, 300))]
    out = _apply(processor, messages, {"image": images, "audio": [np.zeros(SAMPLE_RATE, dtype=np.float32)]})
    first, second = out["mm_placeholders"]["image"]
    (audio,) = out["mm_placeholders"]["audio"]
    assert first.offset < audio.offset < second.offset
    assert [_embeds(first), _embeds(audio), _embeds(second)] == [448, 27, 64]
    # No placeholder text survives the expansion.
    tokenizer = processor.info.get_tokenizer()
    assert MEDIA_PLACEHOLDERS["image"] not in tokenizer.decode(out["prompt_token_ids"])


def test_bad_media_raise_clear_errors(processor) -> None:
    ask = [Message("user", "Listen.", media=("audio",))]
    with pytest.raises(MediaError, match="NaN"):
        _apply(processor, ask, {"audio": [np.full(SAMPLE_RATE, np.nan, dtype=np.float32)]})
    with pytest.raises(MediaError, match="too short"):
        _apply(processor, ask, {"audio": [np.zeros(100, dtype=np.float32)]})
    with pytest.raises(MediaError, match="aspect ratio"):
        _apply(processor, [Message("user", "Look.", media=("image",))], {"image": [Image.new("RGB", (5000, 20))]})
    with pytest.raises(MediaError, match="placeholder"):
        _apply(processor, [Message("user", "No slot.")], {"image": [Image.new("RGB", (64, 64))]})
