"""Megrez-3B-Omni at its real widths and vocabulary (1 layer per stack, random weights via load_format="dummy").

Exercises what the tiny checkpoint cannot: the 122,880-token vocabulary with the real special-token ids,
SigLIP-so400m's 1152-wide tower on the 70x70 position grid, the 2560-wide resampler (20 heads, kv_proj
from 1152), Whisper-large-v3's 1280-wide encoder and the 1280 -> 2560 projection.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.base import Sampling
from engine.omni.audio import SAMPLE_RATE, audio_placeholder_text
from engine.omni.image import image_placeholder_text
from engine.protocol import MEDIA_PLACEHOLDERS, Message, PromptEncoder
from engine.vllm_engine import VLLMEngine
from scripts.tiny_models import tiny_engine_config
from scripts.tiny_omni import build_megrezo_shape


async def test_real_shape_runs_text_image_audio(tmp_path) -> None:
    path = build_megrezo_shape(tmp_path, llm_layers=1, vision_layers=1, audio_layers=1)
    config = tiny_engine_config(
        path, load_format="dummy", max_model_len=4096, limit_mm_per_prompt={"image": 1, "audio": 1}
    )
    async with VLLMEngine(config) as engine:
        encoder = PromptEncoder(engine.tokenizer)
        assert encoder.special_ids["<|unk|>"] == 120001
        messages = [Message("user", "What is shown and said?", media=("image", "audio"))]
        ids = encoder.encode(messages)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (720, 1480, 3), dtype=np.uint8))
        clip = np.random.default_rng(1).standard_normal(2 * SAMPLE_RATE).astype(np.float32) * 0.1
        tokens, prompt_tokens = [], None
        async for delta in engine.stream(
            ids,
            Sampling(max_tokens=3, temperature=0.0),
            request_id="real-shape",
            multimodal={"image": [image], "audio": [(clip, SAMPLE_RATE)]},
        ):
            tokens += delta.token_ids
            prompt_tokens = delta.prompt_tokens or prompt_tokens
        assert tokens and all(0 <= t < 122_880 for t in tokens)
        # The placeholders become 448 image fillers and 52 audio ones (bos, 50 frames, eos), with markers.
        expansion = engine.tokenizer(
            image_placeholder_text(1480, 720) + audio_placeholder_text(2 * SAMPLE_RATE), add_special_tokens=False
        )["input_ids"]
        assert expansion.count(120001) == 448 + 52
        placeholders = sum(len(encoder.placeholder_ids(MEDIA_PLACEHOLDERS[k])) for k in ("image", "audio"))
        assert prompt_tokens == len(ids) - placeholders + len(expansion)
