import asyncio

from retrieval.cache import MemoryCache, RedisCache, make_cache


async def test_memory_cache_roundtrip_and_expiry(monkeypatch):
    cache = MemoryCache()
    await cache.set("k", {"a": [1, "二"]}, ttl_s=60)
    assert await cache.get("k") == {"a": [1, "二"]}
    await cache.set("gone", 1, ttl_s=0)
    assert await cache.get("gone") is None
    import retrieval.cache as mod

    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 61)
    assert await cache.get("k") is None


async def test_memory_cache_is_bounded_lru():
    cache = MemoryCache(max_entries=2)
    await cache.set("a", 1, 60)
    await cache.set("b", 2, 60)
    assert await cache.get("a") == 1  # a is now most recent
    await cache.set("c", 3, 60)
    assert await cache.get("b") is None
    assert await cache.get("a") == 1 and await cache.get("c") == 3


async def test_redis_cache_roundtrip_and_ttl(redis_url):
    cache = make_cache(redis_url, "test")
    assert isinstance(cache, RedisCache)
    await cache.set("q", ["x", "y"], ttl_s=1)
    assert await cache.get("q") == ["x", "y"]
    await asyncio.sleep(1.2)
    assert await cache.get("q") is None


async def test_redis_outage_is_a_miss_not_an_error():
    cache = RedisCache("redis://127.0.0.1:1/0", "test")
    await cache.set("k", 1, 60)
    assert await cache.get("k") is None
