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
    turn_lease_s: float = Field(
        default=15.0,
        ge=1,
        description="A running turn's lease, renewed every third of it; a turn whose replica died is stored as "
        "failed, and its conversation and slot freed, once it runs out.",
    )
    store_retry_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a turn keeps retrying its writes while the conversation store (Redis) is down.",
    )
    event_write_ms: float = Field(
        default=100.0,
        ge=0,
        le=5000,
        description="How long a turn's events wait to be written to the store together (one round trip each "
        "interval); followers on the turn's own API process see them at once, those on other processes or "
        "replicas up to this much later. 0: each batch as soon as the write before it is back.",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest wait for a request's head (line and headers); 408 and close after."
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest pause between two pieces of a request body; 408 after."
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="API processes serving the port (`serve --workers`); more than 1 needs MEGREZ_REDIS_URL. "
        "On a GPU host, one per 2 cores (README, Self-hosting).",
    )
    trusted_proxies: list[str] = Field(
        default=[],
        description="Addresses or CIDRs of reverse proxies whose X-Forwarded-For names the client; empty: none.",
    )


class AuthConfig(BaseModel):
    """``settings.auth`` (``MEGREZ_AUTH__*``): who may call the service."""

    api_keys: list[str] = Field(
        default=[],
        description='Accepted API keys, a JSON list; an entry "sha256:<hex>" is a key given by its SHA-256. '
        "Empty: no keys needed.",
    )
    wrong_keys: str = Field(
        default="10/minute",
        description="Requests with a wrong key one client address may send, in the `limits` notation, before all "
        "its requests get 429 for the rest of the window; '' = no limit.",
    )


class RateConfig(BaseModel):
    """``settings.rate`` (``MEGREZ_RATE__*``): per key (or per client IP without keys), shared through Redis."""

    requests: str = Field(default="300/minute", description="Requests per key, in the `limits` notation; '' = none.")
    concurrent_turns: int = Field(default=8, ge=1, description="Turns one key may have running at once.")
