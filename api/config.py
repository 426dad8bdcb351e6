"""HTTP API settings (``settings.api``; ``MEGREZ_API__*``): what one request may carry."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ApiConfig(BaseModel):
    max_body_bytes: int = Field(default=25_000_000, ge=1024, description="Largest request body (uploads included).")
    max_message_chars: int = Field(default=8000, ge=1, description="Longest question.")
    max_images: int = Field(default=4, ge=0, description="Images per request.")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="Pixels per image (width × height).")
    max_audio: int = Field(default=2, ge=0, description="Audio clips per request.")
    max_audio_seconds: float = Field(default=120.0, gt=0, description="Length of one audio clip.")
