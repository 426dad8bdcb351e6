"""TTL caches for search results and fetched pages: Redis when configured, else in-process.

Values are JSON documents. A Redis outage must not take search down, so Redis errors are
logged and treated as cache misses.

:func:`redis_client` is where every Redis URL of the service becomes a client (the caches here, the
memory store in ``api/redis_memory.py``): a ``redis+cluster://`` or ``rediss+cluster://`` URL — what
``MEGREZ_REDIS_CLUSTER=true`` makes of ``MEGREZ_REDIS_URL`` (``api/settings.py``), the spelling the
``limits`` package uses too — names any node of a Redis Cluster and gets redis-py's cluster client,
which finds the others and sends each key to the node that holds its hash slot.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Cache(Protocol):
    async def get(self, key: str) -> Any | None: ...
    async def set(self, key: str, value: Any, ttl_s: int) -> None: ...


class MemoryCache:
    """Bounded LRU with per-entry expiry; enough for one process."""

    def __init__(self, max_entries: int = 2048) -> None:
        self._data: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._max = max_entries

    async def get(self, key: str) -> Any | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, raw = item
        if expires < time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return json.loads(raw)

    async def set(self, key: str, value: Any, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        self._data[key] = (time.monotonic() + ttl_s, json.dumps(value, ensure_ascii=False))
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)


CLUSTER_SUFFIX = "+cluster"  # redis+cluster://host:port: any node of a Redis Cluster


def redis_client(url: str, **options: Any):
    """A redis-py asyncio client for ``url``: ``redis.asyncio.RedisCluster`` when the scheme ends in ``+cluster``
    (the URL names any node), else ``redis.asyncio.Redis``. ``options`` go to the client as they are.

    Example::

        client = redis_client("redis+cluster://10.0.0.5:6379", decode_responses=True)
    """
    if is_cluster(url):
        from redis.asyncio.cluster import RedisCluster

        scheme, _, rest = url.partition("://")
        return RedisCluster.from_url(f"{scheme.removesuffix(CLUSTER_SUFFIX)}://{rest}", **options)
    import redis.asyncio as redis

    return redis.from_url(url, **options)


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.partition("://")[0].endswith(CLUSTER_SUFFIX)


class RedisCache:
    """The cache on Redis (a single server or a cluster: one key per entry), under ``<namespace>:``.

    Example::

        cache = RedisCache("redis://localhost:6379/0", "search")
    """

    def __init__(self, url: str, namespace: str) -> None:
        self._redis = redis_client(url)
        self._ns = namespace

    async def get(self, key: str) -> Any | None:
        try:
            raw = await self._redis.get(f"{self._ns}:{key}")
        except Exception as exc:  # noqa: BLE001 - any Redis failure degrades to a miss
            log.warning("redis cache get failed: %s", exc)
            return None
        return None if raw is None else json.loads(raw)

    async def set(self, key: str, value: Any, ttl_s: int) -> None:
        if ttl_s <= 0:
            return
        try:
            await self._redis.set(f"{self._ns}:{key}", json.dumps(value, ensure_ascii=False), ex=ttl_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("redis cache set failed: %s", exc)


def make_cache(redis_url: str | None, namespace: str) -> Cache:
    return RedisCache(redis_url, namespace) if redis_url else MemoryCache()
