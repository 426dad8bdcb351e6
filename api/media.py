"""Images and audio in a chat request: decoded from base64 / data URLs or file parts, checked early.

Each item is checked before a turn starts, so a bad upload is a 4xx naming the item
(``images[1]: not an image``) rather than a failed turn: the count, the pixels and the seconds against
``settings.api``, and that it decodes. An image is checked without decoding a full-size pixel buffer:
its header gives the size (a decompression bomb is refused there, before any pixel is decoded); then
PIL's ``verify()`` walks the file's structure (a truncated or corrupt PNG fails its chunk checks), and
a JPEG, whose ``verify()`` checks nothing, is decoded at 1/8 scale, which reads every byte of it.
libsndfile reads a clip's format and length. The agent then does the full decoding and fitting
(``engine/omni/request.py``).
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
    from PIL import Image

    too_many = f"{name}: more than {config.max_image_pixels} pixels"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        if width * height > config.max_image_pixels:
            raise MediaRejected(f"{too_many} ({width}x{height})")
        with Image.open(io.BytesIO(data)) as image:  # verify() leaves its image unusable: a second open
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            if image.draft("RGB", (max(1, width // 8), max(1, height // 8))) is not None:  # JPEG only
                image.load()
    except MediaRejected:
        raise
    except Image.DecompressionBombError:
        raise MediaRejected(too_many) from None
    except Exception as exc:  # PIL parsing hostile bytes raises more than OSError (SyntaxError, struct.error, …)
        raise MediaRejected(f"{name}: not an image this service can read ({type(exc).__name__}: {exc})") from None
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
