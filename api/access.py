"""Who is calling, how often, how much at once: API keys, owners, rate limits, turn slots.

Keys (``MEGREZ_AUTH__API_KEYS``): when any are configured, every route except ``/healthz`` needs
``Authorization: Bearer <key>`` (401 otherwise). A key may be configured by its SHA-256
(``"sha256:<hex>"``) so the secret need not sit in the environment. Comparison is constant-time.

Owners: what a caller creates (conversations, their messages and streams) belongs to its *owner* —
``key-<first 16 hex of the key's SHA-256>``, or ``anonymous`` without keys — and another owner gets
404 on read, resume, stop and delete, as if it did not exist.

A 401 says ``WWW-Authenticate: Bearer`` (RFC 6750; ``error="invalid_token"`` for a wrong key).

Key guessing: requests with a wrong key are counted per client address (``MEGREZ_AUTH__WRONG_KEYS``,
e.g. ``10/minute``); an address over that count gets 429 with ``Retry-After`` on *every* route that
needs a key until its window moves on, whatever key it sends: were the right key still let through, a
guesser would learn when it found one. The client address is the direct peer, or ``X-Forwarded-For``
when the peer is a trusted proxy (``api/http_guard.py: server_config``).

Rate limits (``MEGREZ_RATE__REQUESTS``, e.g. ``300/minute``): a moving window per owner (per client
IP without keys) with the maintained ``limits`` package, in Redis when configured (shared by the
replicas; a Redis Cluster too: each window is one key) else in process; over the limit is a 429 with
``Retry-After``. Concurrent turns per owner (``MEGREZ_RATE__CONCURRENT_TURNS``) are counted by the memory
store (``acquire_slot``), across replicas. The limiter's store being down lets requests through (logged)
rather than refusing everyone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from fastapi import HTTPException, Request

from api.config import AuthConfig, RateConfig

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


def owner_of_key(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Access:
    """Checks a request's key and rate; one per app (built from the settings in the lifespan).

    Example::

        access = Access(AuthConfig(api_keys=["s3cret"]), RateConfig(), redis_url=None)
        owner = await access.check(request)  # raises HTTPException 401 / 429
    """

    def __init__(self, auth: AuthConfig, rate: RateConfig, *, redis_url: str | None) -> None:
        from limits import parse
        from limits.aio.strategies import MovingWindowRateLimiter

        self._digests = [
            bytes.fromhex(k.removeprefix("sha256:")) if k.startswith("sha256:") else hashlib.sha256(k.encode()).digest()
            for k in auth.api_keys
        ]
        self.rate = parse(rate.requests) if rate.requests else None
        self.wrong_keys = parse(auth.wrong_keys) if auth.wrong_keys and self._digests else None
        self.concurrent_turns = rate.concurrent_turns
        if redis_url:
            from limits.storage import storage_from_string

            # redis+cluster:// (retrieval/cache.py) is the limits package's own spelling for a cluster; it has no
            # TLS variant of it, so rediss+cluster:// is the same with ssl on.
            scheme, _, rest = redis_url.partition("://")
            tls = {"ssl": True} if scheme == "rediss+cluster" else {}
            url = f"async+{'redis+cluster' if tls else scheme}://{rest}"
            storage = storage_from_string(url, implementation="redispy", key_prefix="megrez:rate", **tls)
        else:
            from limits.aio.storage import MemoryStorage

            storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(storage)

    @property
    def keys_required(self) -> bool:
        return bool(self._digests)

    def owner(self, request: Request) -> str:
        """The caller's owner id; 401 when keys are configured and none (or a wrong one) was sent."""
        if not self._digests:
            return ANONYMOUS
        key = _bearer_key(request)
        if not key:
            raise _unauthorized("this service needs an API key: send Authorization: Bearer <key>", wrong=False)
        digest = hashlib.sha256(key.encode()).digest()
        if not any(hmac.compare_digest(digest, known) for known in self._digests):
            raise _unauthorized("the API key is not valid", wrong=True)
        return owner_of_key(key)

    async def check(self, request: Request) -> str:
        """The owner, after the key, the wrong-key count of the caller's address and the rate limit (401, or
        429 with ``Retry-After``)."""
        address = request.client.host if request.client else "unknown"
        if self.wrong_keys is not None and not await self._allowed(self._limiter.test, self.wrong_keys, address):
            retry = await self._retry_after(self.wrong_keys, address)
            raise HTTPException(
                429,
                f"too many requests with a wrong API key from {address}; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )
        try:
            owner = self.owner(request)
        except HTTPException:
            if self.wrong_keys is not None and _bearer_key(request):
                await self._allowed(self._limiter.hit, self.wrong_keys, address)
            raise
        if self.rate is not None:
            who = owner if self._digests else f"ip-{address}"
            if not await self._allowed(self._limiter.hit, self.rate, who):
                retry = await self._retry_after(self.rate, who)
                raise HTTPException(
                    429, f"rate limit of {self.rate} exceeded; retry in {retry} s", headers={"Retry-After": str(retry)}
                )
        request.state.owner = owner
        return owner

    async def _allowed(self, call, limit, *identifiers: str) -> bool:
        try:
            return await call(limit, *identifiers)
        except Exception as exc:  # the limiter's store is down: serve rather than refuse everyone
            log.warning("rate limit not checked (%s: %s)", type(exc).__name__, exc)
            return True

    async def _retry_after(self, limit, *identifiers: str) -> int:
        stats = await self._limiter.get_window_stats(limit, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))


def _bearer_key(request: Request) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def _unauthorized(message: str, *, wrong: bool) -> HTTPException:
    challenge = 'Bearer realm="megrez-search"' + (', error="invalid_token"' if wrong else "")
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})
