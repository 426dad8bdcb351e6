"""Images and audio in a chat request: decoded from base64 / data URLs or file parts, checked early.

Each item is checked before a turn starts, so a bad upload is a 4xx naming the item
(``images[1]: not an image``) rather than a failed turn: the count, that it decodes (PIL reads the
header, libsndfile the clip's format), the pixels and the seconds against ``settings.api``. The
agent then does the full decoding and fitting (``engine/omni/request.py``).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence

from agent.state import MediaItem
from api.config import ApiConfig
from engine.base import Engine, media_refusal


class MediaRejected(ValueError):
    """An upload that cannot be used; the message names the item."""


def decode_base64(value: str, name: str) -> bytes:
    """``data:image/png;base64,...`` or bare base64 → bytes."""
    payload = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaRejected(f"{name}: not valid base64 or a data URL ({exc})") from None
    if not data:
        raise MediaRejected(f"{name}: empty")
    return data


def check_image(data: bytes, name: str, config: ApiConfig) -> MediaItem:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaRejected(f"{name}: not an image this service can read ({exc})") from None
    if width * height > config.max_image_pixels:
        raise MediaRejected(f"{name}: {width}x{height} is more than {config.max_image_pixels} pixels")
    return MediaItem("image", data)


def check_audio(data: bytes, name: str, config: ApiConfig) -> MediaItem:
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise MediaRejected(f"{name}: not audio this service can read (WAV, FLAC, OGG, MP3): {exc}") from None
    if info.duration > config.max_audio_seconds:
        raise MediaRejected(f"{name}: {info.duration:.1f} s is longer than {config.max_audio_seconds:g} s")
    return MediaItem("audio", data)


def check_media(images: Sequence[bytes], audio: Sequence[bytes], config: ApiConfig, engine: Engine) -> list[MediaItem]:
    """The request's media as items for the agent, images first, in the order sent; ``engine``'s model
    must read each kind sent."""
    for name, kind, items in (("images", "image", images), ("audio", "audio", audio)):
        if items and (why := media_refusal(engine, [kind])):
            raise MediaRejected(f"{name}: {why}")
    if len(images) > config.max_images:
        raise MediaRejected(f"images: {len(images)} sent, at most {config.max_images} allowed")
    if len(audio) > config.max_audio:
        raise MediaRejected(f"audio: {len(audio)} sent, at most {config.max_audio} allowed")
    items = [check_image(data, f"images[{i}]", config) for i, data in enumerate(images)]
    return items + [check_audio(data, f"audio[{i}]", config) for i, data in enumerate(audio)]
