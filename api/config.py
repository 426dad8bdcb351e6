"""HTTP API settings: one request's limits (``settings.api``), keys (``settings.auth``), rates (``settings.rate``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ApiConfig(BaseModel):
    max_body_bytes: int = Field(default=25_000_000, ge=1024, description="Largest request body (uploads included).")
    max_message_chars: int = Field(default=8000, ge=1, description="Longest question.")
    max_images: int = Field(default=4, ge=0, description="Images per request.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Pixels per image (width × height).")
    max_audio: int = Field(default=2, ge=0, description="Audio clips per request.")
    max_audio_seconds: float = Field(default=120.0, gt=0, description="Length of one audio clip.")


class AuthConfig(BaseModel):
    """``settings.auth`` (``MEGREZ_AUTH__*``): who may call the service."""

    api_keys: list[str] = Field(
        default=[],
        description='Accepted API keys, a JSON list; an entry "sha256:<hex>" is a key given by its SHA-256. '
        "Empty: no keys needed.",
    )


class RateConfig(BaseModel):
    """``settings.rate`` (``MEGREZ_RATE__*``): per key (or per client IP without keys), shared through Redis."""

    requests: str = Field(default="300/minute", description="Requests per key, in the `limits` notation; '' = none.")
    concurrent_turns: int = Field(default=8, ge=1, description="Turns one key may have running at once.")
