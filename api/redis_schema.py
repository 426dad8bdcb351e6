"""The memory store's Redis keys, the Lua scripts that change them, how they run, and the upgrade from the
previous schema.

Every key is under ``megrez:``. A ``{…}`` in a key is a hash tag: Redis Cluster places the key by what is
between the braces alone, so the keys of one conversation share a hash slot (one node), and so do an owner's.
``<cid>``, ``<mid>``, ``<owner>`` stand for the ids themselves.

=======================================  ======  ============================================================
key                                      type    what
=======================================  ======  ============================================================
``megrez:{c:<cid>}``                     hash    ``id``, ``title`` (first question, or renamed), ``created``,
                                                 ``updated``, ``owner``
``megrez:{c:<cid>}:turns``               list    one JSON :class:`api.memory.StoredTurn` per turn, oldest first
``megrez:{c:<cid>}:messages``            set     the conversation's message ids (deleted with it)
``megrez:{c:<cid>}:running``             string  the message id of its running turn: its lock, as long as the lease
``megrez:{c:<cid>}:msg:<mid>``           hash    ``conversation_id``, ``status`` (running/done/stopped/failed),
                                                 ``owner``, ``question``, ``media`` (JSON), ``lease`` (Redis time)
``megrez:{c:<cid>}:msg:<mid>:events``    stream  the message's events in order: fields ``type``, ``data`` (JSON)
``megrez:{o:<owner>}:convs``             zset    the owner's conversation ids scored by last update
``megrez:{o:<owner>}:slots``             zset    the owner's running turns and ``/v1`` requests, scored by lease end
``megrez:mid:<mid>``                     string  the message's conversation id: lookups by message id alone
                                                 (resume, stop, status) find its keys through it
``megrez:{leases}``                      zset    ``<cid>:<mid>`` of running messages scored by lease end (the sweep)
``megrez:media:<sha256>``                string  an uploaded image or clip, stored once by content hash
``megrez:schema``                        string  ``2`` once the previous schema's keys were moved (see below)
``megrez:stop``                          pubsub  message ids to stop, heard by the replica that runs them
``megrez:rate*``                         (many)  rate-limit windows, one key each (``limits``, api/access.py)
=======================================  ======  ============================================================

Lifetimes: a conversation (hash, turns, message set), its owner's listing and media live
``conversation_ttl_s`` (30 days) from their last write; a message (hash, stream, ``mid`` key)
``stream_ttl_s`` (1 hour) from its end: long enough to resume, not to archive (the turn is in the
conversation); slots, locks and the lease index as long as a lease.

**Steps.** What must hold together is in one slot and changed by one script, so it lands whole or not at
all: a turn's end (turn, ``done``, status, lock), a start (lock, message, and a new conversation's hash), a
reap, a delete. What spans slots — the owner's listing and slots, the lease index, the ``mid`` keys — is
sent in the same pipeline (one round trip, each node its part) or right after, in an order that keeps
every turn:

- *start*: ``ACQUIRE`` (owner: a slot, and a new conversation's listing entry), ``START`` (conversation:
  created if new, locked, message), ``INDEX`` (lease index) and the ``mid`` key, in one pipeline. A slot
  refused after ``START`` ran is undone (``UNDO``) before the refusal is answered; a listing entry whose
  conversation is not there yet is skipped by readers, and dropped only once it is a minute old.
- *end*: ``FINISH`` (conversation: the turn, ``done``, status, lock — the turn's whole fate), ``OWNER_END``
  (the listing's order, the slot), the lease index and the ``mid`` key's lifetime, in one pipeline. Only
  ``FINISH`` decides anything; the rest may lag (a reader sees the listing's order behind) and is done
  again by a retry, since every step is idempotent.
- *reap* and *delete*: the conversation's script first; the owner's and the index's cleanup after it,
  only once it says what happened. Cleanup that fails heals: readers drop listing entries of missing
  conversations, the sweep drops index entries of messages that are not running, ``mid`` keys expire.

Leases are in Redis's own clock (``TIME``), so replicas with skewed clocks agree on what has expired;
the lease index is kept by the clock of its own node and only says where to look: the reap script
decides by the message's lease, in the message's slot.

**Running steps** (:class:`RedisSteps`). Scripts go by SHA1 in pipelines; a server that lost them
(restart, failover) gets them again and the pipeline runs once more — every step is idempotent (a start
run again finds its own lock, an end its own ``done``), so a rerun changes nothing twice. Connections:
on a single server, steps share up to ``STEP_CONNECTIONS`` kept connections, opened as needed, and wait for a
free one past that. The bound is high on purpose: with 64, at 500 streams a turn's batch could wait for a
connection for its whole turn (its pieces arrived all at the end: p99 added delay 780 ms, against 360 ms with
1024, and 10 against 8.5 ms of CPU per turn; ``bench.api``);
followers' blocking reads and the stop listener hold theirs for seconds, so they have a pool of their
own (up to ``max_connections``; in a cluster, where redis-py's pools cannot make a caller wait, one pool
per node serves both). No ``PING`` before a command on a connection that sat idle (redis-py's
``health_check_interval``: a round trip per idle connection per burst under load): one that died
meanwhile fails its command, which redis-py retries on a fresh connection (idempotent steps again), and
TCP keepalive finds dead peers.

**The previous schema** (``megrez:conv:<cid>``, …; one Redis only) is moved to this one by the first step
of a process: ``api/redis_upgrade.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from api.memory import StoreUnavailable
from retrieval.cache import is_cluster, redis_client

SOCKET_TIMEOUT_S = 10.0
STEP_CONNECTIONS = 1024  # a single server's connections for steps, opened as needed (see "Running steps")

LEASES = "megrez:{leases}"
SCHEMA = "megrez:schema"  # api/redis_upgrade.py
SCHEMA_VERSION = "2"
STOP_CHANNEL = "megrez:stop"


def conversation(cid: str) -> str:
    """The conversation's hash; every other key of the conversation and its messages starts with it."""
    return f"megrez:{{c:{cid}}}"


def conversation_keys(cid: str) -> list[str]:
    """conv, turns, messages, running: ``KEYS[1..4]`` of the conversation scripts."""
    c = conversation(cid)
    return [c, f"{c}:turns", f"{c}:messages", f"{c}:running"]


def message(cid: str, mid: str) -> str:
    return f"{conversation(cid)}:msg:{mid}"


def events(cid: str, mid: str) -> str:
    return f"{message(cid, mid)}:events"


def owner_keys(owner: str) -> list[str]:
    """listing, slots: ``KEYS[1..2]`` of the owner scripts."""
    return [f"megrez:{{o:{owner}}}:convs", f"megrez:{{o:{owner}}}:slots"]


def message_index(mid: str) -> str:
    return f"megrez:mid:{mid}"


def lease_member(cid: str, mid: str) -> str:
    return f"{cid}:{mid}"  # conversation ids never hold ':' (uuid hex), so the first one splits it


def media(digest: str) -> str:
    return f"megrez:media:{digest}"


_NOW = "local t = redis.call('time') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"
# Conversation scripts: KEYS[1..4] = conv, turns, messages, running; then the message's hash and stream.
# Store a turn in its conversation if the conversation still exists (a turn that ends after its conversation
# was deleted writes nothing).
_STORE_TURN = """
local function store_turn(turn, ttl, now)
  if turn == '' or redis.call('exists', KEYS[1]) == 0 then return end
  redis.call('rpush', KEYS[2], turn)
  redis.call('hset', KEYS[1], 'updated', now)
  redis.call('expire', KEYS[1], ttl)
  redis.call('expire', KEYS[2], ttl)
end
"""
_UNLOCK = "local function unlock(mid) if redis.call('get', KEYS[4]) == mid then redis.call('del', KEYS[4]) end end\n"
SCRIPTS = {
    # KEYS: listing, slots. ARGV: lease ms, limit, slot, cid of a new conversation or '', conversation ttl.
    # Takes a slot if fewer than the limit are live (again if this slot is already held: a rerun).
    "acquire": _NOW
    + """
redis.call('zremrangebyscore', KEYS[2], '-inf', now)
if not redis.call('zscore', KEYS[2], ARGV[3]) and redis.call('zcard', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[2], now + tonumber(ARGV[1]) / 1000, ARGV[3])
redis.call('pexpire', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then
  redis.call('zadd', KEYS[1], now, ARGV[4])
  redis.call('expire', KEYS[1], ARGV[5])
end
return 1
""",
    # KEYS: conversation's 4, msg. ARGV: mid, lease ms, stream ttl, conversation ttl, cid, owner, question, media
    # JSON, '1' for a new conversation, its title, its creation time.
    "start": _NOW
    + """
if ARGV[9] == '1' and redis.call('exists', KEYS[1]) == 0 then
  redis.call('hset', KEYS[1], 'id', ARGV[5], 'title', ARGV[10], 'created', ARGV[11], 'updated', ARGV[11],
             'owner', ARGV[6])
  redis.call('expire', KEYS[1], ARGV[4])
end
if redis.call('exists', KEYS[1]) == 0 then return 'gone' end
local held = redis.call('get', KEYS[4])
if held == ARGV[1] then return 'ok' end  -- this very start, run again
if held then return 'busy' end
redis.call('set', KEYS[4], ARGV[1], 'PX', ARGV[2])
redis.call('hset', KEYS[5], 'conversation_id', ARGV[5], 'status', 'running', 'owner', ARGV[6],
           'question', ARGV[7], 'media', ARGV[8], 'lease', now + tonumber(ARGV[2]) / 1000)
redis.call('expire', KEYS[5], ARGV[3])
redis.call('sadd', KEYS[3], ARGV[1])
redis.call('expire', KEYS[3], ARGV[4])
return 'ok'
""",
    # KEYS: conversation's 4, msg. ARGV: mid, '1' if the conversation was new. A start whose slot was refused.
    "undo": _UNLOCK
    + """
unlock(ARGV[1])
redis.call('del', KEYS[5])
redis.call('srem', KEYS[3], ARGV[1])
if ARGV[2] == '1' and redis.call('llen', KEYS[2]) == 0 then redis.call('del', KEYS[1], KEYS[3]) end
return 1
""",
    # KEYS: running, msg. ARGV: mid, lease ms.
    "renew": _NOW
    + """
if redis.call('hget', KEYS[2], 'status') ~= 'running' then return 0 end
redis.call('hset', KEYS[2], 'lease', now + tonumber(ARGV[2]) / 1000)
if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) end
return 1
""",
    # KEYS: slots. ARGV: lease ms, then slot ids.
    "renew_slots": _NOW
    + """
for i = 2, #ARGV do redis.call('zadd', KEYS[1], 'XX', now + tonumber(ARGV[1]) / 1000, ARGV[i]) end
redis.call('pexpire', KEYS[1], ARGV[1])
return 1
""",
    # KEYS: the lease index. ARGV: lease ms, 'XX' to renew (an entry its end removed stays out) or '', members.
    "index": _NOW
    + """
local expiry = now + tonumber(ARGV[1]) / 1000
for i = 3, #ARGV do
  if ARGV[2] == 'XX' then redis.call('zadd', KEYS[1], 'XX', expiry, ARGV[i])
  else redis.call('zadd', KEYS[1], expiry, ARGV[i]) end
end
return 1
""",
    # KEYS: msg, events. ARGV: stream ttl, then id, type, data of each event. Ids the writer chose: a batch sent
    # again after a lost reply is refused as "equal or smaller" and skipped. Nothing is added after the end.
    "append": """
if redis.call('hget', KEYS[1], 'status') ~= 'running' then return 0 end
for i = 2, #ARGV, 3 do
  local added = redis.pcall('xadd', KEYS[2], ARGV[i], 'type', ARGV[i + 1], 'data', ARGV[i + 2])
  if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller', 1, true) then
    return added
  end
end
redis.call('expire', KEYS[2], ARGV[1])
return 1
""",
    # KEYS: conversation's 4, msg, events. ARGV: mid, done id, done JSON, status, turn JSON or '', conversation
    # ttl, stream ttl.
    "finish": _NOW
    + _STORE_TURN
    + _UNLOCK
    + """
if redis.call('hget', KEYS[5], 'status') ~= 'running' then
  local last = redis.call('xrevrange', KEYS[6], '+', '-', 'COUNT', 1)
  if last[1] and last[1][1] == ARGV[2] then return 1 end  -- this very call, run again after a lost reply
  return 0  -- reaped by another replica, or deleted with its conversation
end
store_turn(ARGV[5], ARGV[6], now)
local added = redis.pcall('xadd', KEYS[6], ARGV[2], 'type', 'done', 'data', ARGV[3])
if type(added) == 'table' and added.err then redis.call('xadd', KEYS[6], '*', 'type', 'done', 'data', ARGV[3]) end
redis.call('hset', KEYS[5], 'status', ARGV[4])
redis.call('expire', KEYS[5], ARGV[7])
redis.call('expire', KEYS[6], ARGV[7])
unlock(ARGV[1])
return 1
""",
    # KEYS: listing, slots. ARGV: cid, slot, conversation ttl. After a turn's end: the conversation moves up the
    # listing (if still listed: a deleted one stays out), its slot is free.
    "owner_end": _NOW
    + """
if redis.call('zscore', KEYS[1], ARGV[1]) then
  redis.call('zadd', KEYS[1], now, ARGV[1])
  redis.call('expire', KEYS[1], ARGV[3])
end
redis.call('zrem', KEYS[2], ARGV[2])
return 1
""",
    # KEYS: conversation's 4, msg, events. ARGV: mid, turn JSON, conversation ttl, stream ttl, error JSON, done JSON.
    # 1: stored as failed; 0: not running (ended, deleted, unknown); -1: its lease still runs.
    "reap": _NOW
    + _STORE_TURN
    + _UNLOCK
    + """
if redis.call('hget', KEYS[5], 'status') ~= 'running' then return 0 end
if tonumber(redis.call('hget', KEYS[5], 'lease') or '0') > now then return -1 end
store_turn(ARGV[2], ARGV[3], now)
redis.call('xadd', KEYS[6], '*', 'type', 'error', 'data', ARGV[5])
redis.call('xadd', KEYS[6], '*', 'type', 'done', 'data', ARGV[6])
redis.call('hset', KEYS[5], 'status', 'failed')
redis.call('expire', KEYS[5], ARGV[4])
redis.call('expire', KEYS[6], ARGV[4])
unlock(ARGV[1])
return 1
""",
    # KEYS: the lease index. The members whose lease has ended.
    "expired": _NOW + "return redis.call('zrangebyscore', KEYS[1], '-inf', now)",
    # KEYS: conversation's 4. ARGV: the messages' key prefix. Refused ({-1}) while its lock is held; else
    # {existed, owner, message ids...}. The message keys are built here, all under the conversation's tag.
    "delete": """
if redis.call('exists', KEYS[4]) == 1 then return {-1} end
local out = {0, redis.call('hget', KEYS[1], 'owner') or ''}
out[1] = redis.call('del', KEYS[1])
redis.call('del', KEYS[2])
for _, mid in ipairs(redis.call('smembers', KEYS[3])) do
  redis.call('del', ARGV[1] .. mid, ARGV[1] .. mid .. ':events')
  out[#out + 1] = mid
end
redis.call('del', KEYS[3])
return out
""",
    # KEYS: conv. ARGV: title. Never recreates a deleted conversation as a bare hash.
    "rename": """
if redis.call('exists', KEYS[1]) == 0 then return {} end
redis.call('hset', KEYS[1], 'title', ARGV[1])
return redis.call('hgetall', KEYS[1])
""",
}
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPTS.items()}


def queue(pipe, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue script ``name`` in ``pipe``, by its SHA1."""
    pipe.evalsha(SHAS[name], len(keys), *keys, *args)


class RedisSteps:
    """The store's clients (one server or a cluster) and how its steps run: pipelines of scripts by SHA1, Redis
    errors as :class:`api.memory.StoreUnavailable`, the upgrade before the first step of a process.

    Example::

        steps = RedisSteps("redis+cluster://10.0.0.5:6379", max_connections=8192)
        expired = await steps.script("expired", [LEASES], [])
    """

    def __init__(self, url: str, *, max_connections: int) -> None:
        """``url``: see :func:`retrieval.cache.redis_client`; ``max_connections``: per server."""
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        def options(decode: bool) -> dict[str, Any]:
            # redis-py retries a failed call ten times by default (seconds against a Redis that is down):
            # a store that is down must be a quick 503, and the turn runner retries on its own schedule.
            return {
                "decode_responses": decode,
                "socket_timeout": SOCKET_TIMEOUT_S,
                "socket_connect_timeout": 2,
                "socket_keepalive": True,
                "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            }

        self.cluster = is_cluster(url)
        self.media_redis = redis_client(url, max_connections=max_connections, **options(False))
        self.follow_redis = redis_client(url, max_connections=max_connections, **options(True))
        if self.cluster:  # redis-py's cluster pools cannot make a caller wait: they open up to the limit per node
            self.redis = self.follow_redis
        else:  # steps wait for one of a few warm connections rather than open new ones under load
            pool = BlockingConnectionPool.from_url(
                url, max_connections=STEP_CONNECTIONS, timeout=SOCKET_TIMEOUT_S, **options(True)
            )
            self.redis = Redis.from_pool(pool)
        self._upgraded = self.cluster  # a cluster never held the previous schema
        self._upgrading: asyncio.Future | None = None

    async def call(self, operation):
        """Await a client call (a coroutine); ``StoreUnavailable`` for what Redis did not do."""
        import redis.exceptions as errors

        try:
            if not self._upgraded:
                try:
                    await self._upgrade()
                except BaseException:
                    operation.close()  # never awaited
                    raise
            return await operation
        except errors.NoScriptError:
            raise  # _with_scripts sends the scripts and runs again
        except (
            errors.ConnectionError,
            errors.TimeoutError,
            errors.ClusterError,
            errors.SlotNotCoveredError,
            errors.RedisClusterUnreachableError,
            OSError,
        ) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc or type(exc).__name__}") from exc
        except errors.ResponseError as exc:  # e.g. out of memory, read-only replica: cannot write
            raise StoreUnavailable(f"Redis refused the write: {exc}") from exc

    async def _upgrade(self) -> None:
        if self._upgrading is None or self._upgrading.done():  # one at a time; again after a failure
            from api.redis_upgrade import upgrade

            self._upgrading = asyncio.ensure_future(upgrade(self.redis))
        await asyncio.shield(self._upgrading)  # a cancelled request does not cancel it for the others
        self._upgraded = True

    async def pipeline(self, build: Callable[[Any], object]) -> list:
        """What ``build(pipe)`` queues, in one round trip (each node its part, in a cluster)."""

        async def run() -> list:
            async with self.redis.pipeline(transaction=False) as pipe:  # a cluster's finds its nodes here
                build(pipe)
                return await pipe.execute()

        return await self._with_scripts(run)

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` alone (one command, no pipeline); its reply."""
        return await self._with_scripts(lambda: self.redis.evalsha(SHAS[name], len(keys), *keys, *args))

    async def _with_scripts(self, run: Callable[[], Awaitable[Any]]) -> Any:
        """``run()``, once more after sending the scripts again if a server lost them (restart, failover): every
        step is idempotent."""
        import redis.exceptions as errors

        try:
            return await self.call(run())
        except errors.NoScriptError:
            for source in SCRIPTS.values():  # to every primary, in a cluster
                await self.call(self.redis.script_load(source))
        try:
            return await self.call(run())
        except errors.NoScriptError as exc:
            raise StoreUnavailable(f"Redis refused the scripts: {exc}") from exc

    async def aclose(self) -> None:
        if self.redis is not self.follow_redis:
            await self.redis.aclose()
        await self.follow_redis.aclose()
        await self.media_redis.aclose()
