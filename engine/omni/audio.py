"""Audio features and prompt-token counts for Megrez-3B-Omni's Whisper-style audio encoder.

MegrezO's encoder is Qwen-Audio's: 128-bin Whisper-large-v3 log-mel at 16 kHz over 30 s windows,
conv1 (stride 1) and conv2 (stride 2), average pooling by 2, and learned bos/eos embeddings. In the
vendor's ``AudioEncoder.encode`` (infinigence/Infini-Megrez-Omni ``vllm_demo/megrezo.py``) each
segment's output is ``[bos] + pooled[:span - 2] + [eos]`` with ``len == span``, and the whole span
is pasted into the prompt, so bos/eos DO occupy prompt tokens. Audio longer than 30 s is cut into
30 s segments, each encoded (and counted) on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import soxr
from transformers import WhisperFeatureExtractor

from engine.omni.errors import MediaError
from engine.protocol import MEDIA_PLACEHOLDERS

SAMPLE_RATE = 16_000
N_MELS = 128
HOP_LENGTH = 160  # samples per mel frame (10 ms)
SEGMENT_SECONDS = 30
SEGMENT_SAMPLES = SEGMENT_SECONDS * SAMPLE_RATE
MAX_AUDIO_SECONDS = 120.0  # our default cap: 4 segments (3008 tokens) is already most of a 4k context

# Whether segments share one <audio> block is not verifiable without the vendor's processor; we
# give each segment its own block. ASSUMED, like the image markers.
AUDIO_PLACEHOLDER = MEDIA_PLACEHOLDERS["audio"]  # what a prompt holds for one clip
AUDIO_START, AUDIO_END = "<audio>", "</audio>"
FILLER_TOKEN = "<|unk|>"


@dataclass(frozen=True)
class AudioInputs:
    """One preprocessed audio clip, split into 30 s segments.

    ``input_features`` is float32 ``(segments, 128, 3000)`` (each segment zero-padded to 30 s, as
    Whisper does); ``mel_frames`` / ``encoder_frames`` are the real (unpadded) lengths before and
    after the conv stack, which the encoder needs for its padding mask; ``span_tokens`` are the
    prompt tokens per segment, bos and eos included.
    """

    input_features: np.ndarray
    mel_frames: list[int]
    encoder_frames: list[int]
    span_tokens: list[int]
    num_samples: int

    @property
    def num_tokens(self) -> int:
        return sum(self.span_tokens)


def encoder_frames(mel_frames: int) -> int:
    """Frames after the encoder's convolutions: conv2 has kernel 3, stride 2, padding 1 (conv1 keeps the length)."""
    return (mel_frames - 1) // 2 + 1


def pooled_frames(encoder_frames: int) -> int:
    """Audio embeddings a segment yields (bos/eos not counted): AvgPool1d(2, stride 2) over its frames."""
    return (encoder_frames - 2) // 2 + 1


def _segment_span(num_samples: int) -> tuple[int, int, int]:
    """(mel frames, frames after conv2, prompt tokens incl. bos/eos) for one <=30 s segment."""
    mel = num_samples // HOP_LENGTH
    after_cnn = encoder_frames(mel)
    return mel, after_cnn, pooled_frames(after_cnn) + 2


def segment_lengths(num_samples: int) -> list[int]:
    """Lengths of the 30 s segments that 16 kHz audio of this many samples is cut into."""
    lengths = [SEGMENT_SAMPLES] * (num_samples // SEGMENT_SAMPLES)
    rest = num_samples % SEGMENT_SAMPLES
    # A tail too short to yield even one pooled frame (< 30 ms) would be bos/eos around nothing.
    if rest and _segment_span(rest)[2] > 2:
        lengths.append(rest)
    return lengths


def audio_token_count(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Prompt tokens for audio of this length: per 30 s segment, floor-based conv/pool lengths + 2.

    A full segment: 480000 samples -> 3000 mel frames -> 1500 -> 750 pooled -> 752 tokens.
    """
    if num_samples <= 0:
        raise MediaError("audio is empty")
    samples = num_samples if sample_rate == SAMPLE_RATE else _resampled_length(num_samples, sample_rate)
    lengths = segment_lengths(samples)
    if not lengths:
        raise MediaError(f"audio is too short ({num_samples} samples at {sample_rate} Hz)")
    return sum(_segment_span(n)[2] for n in lengths)


def _resampled_length(num_samples: int, sample_rate: int) -> int:
    return (num_samples * SAMPLE_RATE + sample_rate // 2) // sample_rate


def resample(waveform: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling with libsoxr (vLLM's default, torchaudio, is CUDA-linked on PyPI)."""
    if sample_rate == target_rate:
        return waveform
    return soxr.resample(waveform.astype(np.float32), sample_rate, target_rate).astype(np.float32)


def to_mono_float(waveform: np.ndarray) -> np.ndarray:
    arr = np.asarray(waveform)
    if arr.ndim == 2 and 0 not in arr.shape and min(arr.shape) <= 2 and arr.shape[0] != arr.shape[1]:
        # (channels, samples) or (samples, channels): the short axis is the channel axis.
        arr = arr.mean(axis=int(np.argmin(arr.shape)))
    elif arr.ndim != 1:
        raise MediaError(f"unsupported audio shape {arr.shape}; expected (samples,) or mono/stereo 2-D")
    if np.issubdtype(arr.dtype, np.integer):
        # Integer PCM: scale by the type's full range so int16 and int32 land in [-1, 1].
        arr = arr.astype(np.float64) / float(-np.iinfo(arr.dtype).min)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise MediaError(f"unsupported audio sample type {arr.dtype}")
    if arr.size == 0:
        raise MediaError("audio is empty")
    if not np.all(np.isfinite(arr)):
        raise MediaError("audio contains NaN or infinite samples")
    return arr.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _feature_extractor() -> WhisperFeatureExtractor:
    # Whisper-large-v3 front end, built from explicit arguments so nothing is fetched from a hub.
    return WhisperFeatureExtractor(
        feature_size=N_MELS, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH, chunk_length=SEGMENT_SECONDS, n_fft=400
    )


def preprocess_audio(waveform: np.ndarray, sample_rate: int, *, max_seconds: float = MAX_AUDIO_SECONDS) -> AudioInputs:
    """Validate, downmix, resample to 16 kHz and turn a clip into per-segment log-mel features."""
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise MediaError(f"invalid sample rate {sample_rate!r}")
    mono = to_mono_float(waveform)
    duration = mono.shape[0] / sample_rate
    if duration > max_seconds:
        raise MediaError(f"audio is {duration:.1f} s long; the limit is {max_seconds:g} s")
    audio = resample(mono, int(sample_rate))
    lengths = segment_lengths(audio.shape[0])
    if not lengths:
        raise MediaError(f"audio is too short ({duration * 1000:.0f} ms)")
    segments = [audio[i * SEGMENT_SAMPLES : i * SEGMENT_SAMPLES + n] for i, n in enumerate(lengths)]
    features = _feature_extractor()(segments, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    spans = [_segment_span(n) for n in lengths]
    return AudioInputs(
        input_features=features.astype(np.float32),
        mel_frames=[s[0] for s in spans],
        encoder_frames=[s[1] for s in spans],
        span_tokens=[s[2] for s in spans],
        num_samples=int(audio.shape[0]),
    )


def audio_placeholder_text(num_samples: int) -> str:
    """The prompt text replacing AUDIO_PLACEHOLDER for 16 kHz audio of this many samples."""
    return "".join(AUDIO_START + FILLER_TOKEN * _segment_span(n)[2] + AUDIO_END for n in segment_lengths(num_samples))
