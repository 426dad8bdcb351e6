"""Conversation memory and event streams on Redis (redis-py asyncio): what is kept, where, how long.

Every key is under ``megrez:``:

=================================  ======  ===============================================================
key                                type    what
=================================  ======  ===============================================================
``megrez:conv:{cid}``              hash    ``id``, ``title`` (first question, or renamed), ``created``, ``updated``, ``owner``
``megrez:conv:{cid}:turns``        list    one JSON :class:`StoredTurn` per turn, oldest first
``megrez:conv:{cid}:messages``     set     the conversation's message ids (their streams go when it is deleted)
``megrez:conv:{cid}:running``      string  the message id of the conversation's running turn (its lock; lives
                                           as long as the turn's lease)
``megrez:convs:{owner}``           zset    the owner's conversation ids scored by last update (newest first)
``megrez:slots:{owner}``           zset    the owner's running turns scored by when their lease ends
``megrez:msg:{mid}``               hash    ``conversation_id``, ``status`` (running/done/stopped/failed),
                                           ``owner``, ``question``, ``media`` (JSON), ``lease`` (Redis time)
``megrez:msg:{mid}:events``        stream  the message's events, in order: fields ``type`` and ``data`` (JSON)
``megrez:leases``                  zset    running message ids scored by when their lease ends (the sweep)
``megrez:media:{sha256}``          string  an uploaded image or clip, stored once by content hash
``megrez:stop``                    pubsub  message ids to stop, heard by the replica that runs them
``megrez:rate*``                   (many)  rate-limit windows, kept by the ``limits`` package (api/access.py)
=================================  ======  ===============================================================

Lifetimes: conversations (hash, turns, message set, media) live ``conversation_ttl_s`` (default 30
days) from their last write; a message's event stream and status ``stream_ttl_s`` (default 1 hour),
long enough to resume, not to archive (the turn itself is in the conversation).

Every step that touches several keys is one Lua script, so it lands whole or not at all and sees no
other writer halfway: starting a message (the conversation must still exist, its lock be free),
finishing one (the turn only if the conversation still exists — a turn that ends after its
conversation was deleted writes nothing —, ``done``, the status, the lock), reaping one whose lease
ran out, deleting a conversation (refused while its lock is held). Leases are in Redis's own clock
(``TIME``), so replicas with skewed clocks agree on what has expired. Events are appended with one
pipeline of ``XADD`` s per batch, with the ids the writer chose: a retried batch is refused as a
duplicate instead of being stored twice.

Followers on this replica read the message's :class:`api.memory.LiveStream`; elsewhere they resume
after the id they last saw and follow with blocking ``XREAD`` (shorter than the socket timeout) until
``done``, reaping the message if its lease ran out meanwhile.

Failures: a Redis error raises :class:`StoreUnavailable` within about two seconds (few, quick retries:
the API answers 503 and the turn runner retries on its own schedule); the client reconnects by itself
on the next call, so the service works again without a restart when Redis is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence

from agent.events import ErrorEvent, MediaRef, Note
from api.memory import (
    ANONYMOUS,
    DONE,
    Conversation,
    ConversationBusy,
    ConversationGone,
    LiveStream,
    MessageStart,
    MessageStatus,
    StoredEvent,
    StoredTurn,
    StoreUnavailable,
    done_data,
    new_id,
    title_of,
)

log = logging.getLogger(__name__)

FOLLOW_BLOCK_MS = 5_000  # one blocking read: well under the socket timeout (redis-py would cut it off)
SOCKET_TIMEOUT_S = 10.0
STOP_CHANNEL = "megrez:stop"
LEASES = "megrez:leases"
REAPED = ErrorEvent(
    code="interrupted",
    message="The server answering this question stopped before it finished; please ask again.",
)

_NOW = "local t = redis.call('time') local now = tonumber(t[1]) + tonumber(t[2]) / 1e6\n"
# Store a turn in its conversation, if the conversation still exists (ARGV[i] = turn JSON, ARGV[i+1] =
# conversation ttl, ARGV[i+2] = cid; KEYS conv, turns, listing = 4, 5, 6 in every script that uses it).
_STORE_TURN = """
local function store_turn(turn, ttl, cid, now)
  if turn == '' or redis.call('exists', KEYS[4]) == 0 then return end
  redis.call('rpush', KEYS[5], turn)
  redis.call('hset', KEYS[4], 'updated', now)
  redis.call('zadd', KEYS[6], now, cid)
  redis.call('expire', KEYS[4], ttl)
  redis.call('expire', KEYS[5], ttl)
end
"""
# KEYS: conv, lock, msg, messages, leases. ARGV: mid, lease ms, stream ttl, conversation ttl, cid, owner,
# question, media JSON.
_START = (
    _NOW
    + """
if redis.call('exists', KEYS[1]) == 0 then return 'gone' end
if not redis.call('set', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'busy' end
local lease = now + tonumber(ARGV[2]) / 1000
redis.call('hset', KEYS[3], 'conversation_id', ARGV[5], 'status', 'running', 'owner', ARGV[6],
           'question', ARGV[7], 'media', ARGV[8], 'lease', lease)
redis.call('expire', KEYS[3], ARGV[3])
redis.call('sadd', KEYS[4], ARGV[1])
redis.call('expire', KEYS[4], ARGV[4])
redis.call('zadd', KEYS[5], lease, ARGV[1])
return 'ok'
"""
)
# KEYS: msg, leases, lock. ARGV: mid, lease ms.
_RENEW = (
    _NOW
    + """
if redis.call('hget', KEYS[1], 'status') ~= 'running' then return 0 end
local lease = now + tonumber(ARGV[2]) / 1000
redis.call('hset', KEYS[1], 'lease', lease)
redis.call('zadd', KEYS[2], 'XX', lease, ARGV[1])
if redis.call('get', KEYS[3]) == ARGV[1] then redis.call('pexpire', KEYS[3], ARGV[2]) end
return 1
"""
)
# KEYS: slots. ARGV: lease ms, then slot ids.
_RENEW_SLOTS = (
    _NOW
    + """
for i = 2, #ARGV do redis.call('zadd', KEYS[1], 'XX', now + tonumber(ARGV[1]) / 1000, ARGV[i]) end
redis.call('pexpire', KEYS[1], ARGV[1])
return 1
"""
)
# KEYS: msg, events, leases, conv, turns, listing, lock. ARGV: mid, done id, done JSON, status, turn JSON,
# conversation ttl, cid, stream ttl.
_FINISH = (
    _NOW
    + _STORE_TURN
    + """
if redis.call('hget', KEYS[1], 'status') ~= 'running' then
  local last = redis.call('xrevrange', KEYS[2], '+', '-', 'COUNT', 1)
  if last[1] and last[1][1] == ARGV[2] then return 1 end  -- this very call, retried after a lost reply
  return 0  -- reaped by another replica, or deleted with its conversation
end
store_turn(ARGV[5], ARGV[6], ARGV[7], now)
local added = redis.pcall('xadd', KEYS[2], ARGV[2], 'type', 'done', 'data', ARGV[3])
if type(added) == 'table' and added.err then redis.call('xadd', KEYS[2], '*', 'type', 'done', 'data', ARGV[3]) end
redis.call('hset', KEYS[1], 'status', ARGV[4])
redis.call('expire', KEYS[1], ARGV[8])
redis.call('expire', KEYS[2], ARGV[8])
redis.call('zrem', KEYS[3], ARGV[1])
if redis.call('get', KEYS[7]) == ARGV[1] then redis.call('del', KEYS[7]) end
return 1
"""
)
# KEYS: msg, events, leases, conv, turns, listing, lock, slots. ARGV: mid, turn JSON, conversation ttl, cid,
# stream ttl, error JSON, done JSON.
_REAP = (
    _NOW
    + _STORE_TURN
    + """
if redis.call('hget', KEYS[1], 'status') ~= 'running' then redis.call('zrem', KEYS[3], ARGV[1]) return 0 end
if tonumber(redis.call('hget', KEYS[1], 'lease') or '0') > now then return 0 end
store_turn(ARGV[2], ARGV[3], ARGV[4], now)
redis.call('xadd', KEYS[2], '*', 'type', 'error', 'data', ARGV[6])
redis.call('xadd', KEYS[2], '*', 'type', 'done', 'data', ARGV[7])
redis.call('hset', KEYS[1], 'status', 'failed')
redis.call('expire', KEYS[1], ARGV[5])
redis.call('expire', KEYS[2], ARGV[5])
redis.call('zrem', KEYS[3], ARGV[1])
if redis.call('get', KEYS[7]) == ARGV[1] then redis.call('del', KEYS[7]) end
redis.call('zrem', KEYS[8], ARGV[1])
return 1
"""
)
# KEYS: leases. The running messages whose lease has ended.
_EXPIRED = _NOW + "return redis.call('zrangebyscore', KEYS[1], '-inf', now)"
# KEYS: conv, turns, listing, lock, messages, leases. ARGV: cid.
_DELETE = """
if redis.call('exists', KEYS[4]) == 1 then return -1 end
local existed = redis.call('del', KEYS[1])
redis.call('del', KEYS[2])
redis.call('zrem', KEYS[3], ARGV[1])
for _, mid in ipairs(redis.call('smembers', KEYS[5])) do
  redis.call('del', 'megrez:msg:' .. mid, 'megrez:msg:' .. mid .. ':events')
  redis.call('zrem', KEYS[6], mid)
end
redis.call('del', KEYS[5])
return existed
"""
# KEYS: slots. ARGV: lease ms, limit, slot. Take one of an owner's turn slots if fewer than the limit are live.
_ACQUIRE = (
    _NOW
    + """
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[1]) / 1000, ARGV[3])
redis.call('pexpire', KEYS[1], ARGV[1])
return 1
"""
)


def _conv_keys(cid: str, owner: str) -> list[str]:
    """conv, turns, listing: KEYS[4..6] of the scripts that store a turn."""
    return [f"megrez:conv:{cid}", f"megrez:conv:{cid}:turns", f"megrez:convs:{owner}"]


class RedisMemory:
    """The :class:`api.memory.Memory` interface on Redis; see the module docstring for the keys.

    Example::

        memory = RedisMemory("redis://localhost:6379/0")
        await memory.ping()  # raises StoreUnavailable when Redis is down
    """

    def __init__(
        self,
        url: str,
        *,
        conversation_ttl_s: int = 30 * 86400,
        stream_ttl_s: int = 3600,
        lease_s: float = 15.0,
        max_connections: int = 8192,
    ) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        def client(decode: bool, connections: int | None = None):
            # redis-py retries a failed call ten times by default (seconds against a Redis that is down):
            # a store that is down must be a quick 503, and the turn runner retries on its own schedule.
            return redis.from_url(
                url,
                decode_responses=decode,
                health_check_interval=15,
                socket_timeout=SOCKET_TIMEOUT_S,
                socket_connect_timeout=2,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                max_connections=connections,
            )

        # Followers of other replicas' turns each hold a connection during a blocking XREAD: redis-py's
        # default pool of 100 would refuse the 101st (Redis itself allows 10,000 clients by default).
        self._redis = client(True, max_connections)
        self._media_redis = client(False)
        self.conversation_ttl_s = conversation_ttl_s
        self.stream_ttl_s = stream_ttl_s
        self.lease_s = lease_s
        self._live: dict[str, LiveStream] = {}  # messages this process started, until they end
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in (
                ("start", _START),
                ("renew", _RENEW),
                ("renew_slots", _RENEW_SLOTS),
                ("finish", _FINISH),
                ("reap", _REAP),
                ("expired", _EXPIRED),
                ("delete", _DELETE),
                ("acquire", _ACQUIRE),
            )
        }

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_s * 1000))

    async def _call(self, operation):
        import redis.exceptions

        try:
            return await operation
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis is unavailable: {exc or type(exc).__name__}") from exc
        except redis.exceptions.ResponseError as exc:  # e.g. out of memory, read-only replica: cannot write
            raise StoreUnavailable(f"Redis refused the write: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def create_conversation(self, question: str, owner: str = ANONYMOUS) -> Conversation:
        now = time.time()
        conv = Conversation(id=new_id(), title=title_of(question), created=now, updated=now, owner=owner)
        key = f"megrez:conv:{conv.id}"
        async with self._redis.pipeline(transaction=True) as tx:
            tx.hset(key, mapping=conv.model_dump())
            tx.expire(key, self.conversation_ttl_s)
            tx.zadd(f"megrez:convs:{owner}", {conv.id: now})
            tx.expire(f"megrez:convs:{owner}", self.conversation_ttl_s)
            await self._call(tx.execute())
        return conv

    async def get_conversation(self, cid: str) -> Conversation | None:
        data = await self._call(self._redis.hgetall(f"megrez:conv:{cid}"))
        return Conversation.model_validate(data) if data else None

    async def list_conversations(self, owner: str = ANONYMOUS, limit: int = 50) -> list[Conversation]:
        listing = f"megrez:convs:{owner}"
        ids = await self._call(self._redis.zrevrange(listing, 0, max(0, limit - 1)))
        found = [await self.get_conversation(cid) for cid in ids]
        stale = [cid for cid, conv in zip(ids, found, strict=True) if conv is None]  # expired by TTL
        if stale:
            await self._call(self._redis.zrem(listing, *stale))
        return [conv for conv in found if conv is not None]

    async def rename_conversation(self, cid: str, title: str) -> Conversation | None:
        """Give conversation ``cid`` the title ``title`` (already checked: one line); ``None`` if it does not exist.

        One script checks and writes, so a conversation deleted (or expired) meanwhile is never recreated as a
        bare hash; ``updated``, the listing's order and the lifetime stay as they were.
        """
        rename = self._redis.register_script(
            "if redis.call('exists', KEYS[1]) == 0 then return {} end "
            "redis.call('hset', KEYS[1], 'title', ARGV[1]) return redis.call('hgetall', KEYS[1])"
        )
        fields = await self._call(rename([f"megrez:conv:{cid}"], [title]))
        return Conversation.model_validate(dict(zip(fields[::2], fields[1::2], strict=True))) if fields else None

    async def running_message(self, cid: str) -> str | None:
        return await self._call(self._redis.get(f"megrez:conv:{cid}:running"))

    async def delete_conversation(self, cid: str) -> bool:
        owner = await self._call(self._redis.hget(f"megrez:conv:{cid}", "owner")) or ANONYMOUS
        c = f"megrez:conv:{cid}"
        keys = [c, f"{c}:turns", f"megrez:convs:{owner}", f"{c}:running", f"{c}:messages", LEASES]
        deleted = await self._call(self._scripts["delete"](keys, [cid]))
        if deleted == -1:
            raise ConversationBusy(f"conversation {cid} is answering a question")
        return bool(deleted)

    async def acquire_slot(self, owner: str, slot: str, limit: int) -> bool:
        args = [self._lease_ms, limit, slot]
        return bool(await self._call(self._scripts["acquire"]([f"megrez:slots:{owner}"], args)))

    async def release_slot(self, owner: str, slot: str) -> None:
        await self._call(self._redis.zrem(f"megrez:slots:{owner}", slot))

    async def renew(self, messages: Iterable[str], slots: Iterable[tuple[str, str]]) -> None:
        by_owner: dict[str, list[str]] = {}
        for owner, slot in slots:
            by_owner.setdefault(owner, []).append(slot)
        async with self._redis.pipeline(transaction=False) as pipe:
            for mid in messages:
                if (live := self._live.get(mid)) is not None:
                    keys = [f"megrez:msg:{mid}", LEASES, f"megrez:conv:{live.conversation_id}:running"]
                    await self._scripts["renew"](keys, [mid, self._lease_ms], client=pipe)  # queues it
            for owner, owned in by_owner.items():
                await self._scripts["renew_slots"]([f"megrez:slots:{owner}"], [self._lease_ms, *owned], client=pipe)
            await self._call(pipe.execute())

    async def turns(self, cid: str) -> list[StoredTurn]:
        rows = await self._call(self._redis.lrange(f"megrez:conv:{cid}:turns", 0, -1))
        return [StoredTurn.model_validate_json(row) for row in rows]

    async def start_message(self, mid: str, start: MessageStart) -> None:
        cid = start.conversation_id
        c = f"megrez:conv:{cid}"
        keys = [c, f"{c}:running", f"megrez:msg:{mid}", f"{c}:messages", LEASES]
        media = json.dumps([m.model_dump() for m in start.media])
        args = [mid, self._lease_ms, self.stream_ttl_s, self.conversation_ttl_s, cid, start.owner, start.question]
        self._live[mid] = LiveStream(cid)  # before the first await: followers may come at once
        try:
            result = await self._call(self._scripts["start"](keys, [*args, media]))
        except BaseException:
            self._live.pop(mid, None)
            raise
        if result != "ok":
            self._live.pop(mid, None)
            if result == "gone":
                raise ConversationGone(f"unknown conversation {cid}")
            raise ConversationBusy(f"conversation {cid} is answering another question")

    async def _message(self, mid: str) -> dict[str, str]:
        return await self._call(self._redis.hgetall(f"megrez:msg:{mid}"))

    async def message_status(self, mid: str) -> tuple[str, MessageStatus] | None:
        live = self._live.get(mid)
        if live is not None:
            return live.conversation_id, live.status
        data = await self._message(mid)
        return (data["conversation_id"], data["status"]) if "conversation_id" in data else None

    async def append_events(self, mid: str, events: Sequence[StoredEvent]) -> None:
        import redis.exceptions

        key = f"megrez:msg:{mid}:events"
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.xadd(key, {"type": event.type, "data": event.data}, id=event.id)
            pipe.expire(key, self.stream_ttl_s)
            results = await self._call(pipe.execute(raise_on_error=False))
        for result in results:
            # "equal or smaller than the target stream top item": written by an attempt whose reply was lost.
            if isinstance(result, redis.exceptions.RedisError) and "equal or smaller" not in str(result):
                raise StoreUnavailable(f"Redis refused the events: {result}")
        if (live := self._live.get(mid)) is not None:
            live.add(events)

    async def finish_message(self, mid: str, turn: StoredTurn | None, done: StoredEvent) -> bool:
        live = self._live.get(mid)
        data = await self._message(mid) if live is None else {"conversation_id": live.conversation_id}
        cid = data.get("conversation_id", "")
        owner = await self._call(self._redis.hget(f"megrez:conv:{cid}", "owner")) or ANONYMOUS
        m = f"megrez:msg:{mid}"
        keys = [m, f"{m}:events", LEASES, *_conv_keys(cid, owner), f"megrez:conv:{cid}:running"]
        status = json.loads(done.data)["status"]
        turn_json = turn.model_dump_json() if turn is not None else ""
        args = [mid, done.id, done.data, status, turn_json, self.conversation_ttl_s, cid, self.stream_ttl_s]
        finished = bool(await self._call(self._scripts["finish"](keys, args)))
        self.end_here(mid, [done])
        return finished

    def end_here(self, mid: str, events: Sequence[StoredEvent]) -> None:
        live = self._live.pop(mid, None)
        if live is not None:
            live.end(events)

    async def reap(self, mid: str) -> bool:
        """Store ``mid`` as failed and end its stream if its lease has ended (its replica died); ``False``
        if it is alive, already ended or unknown."""
        from api.records import agent_events, partial_record

        data = await self._message(mid)
        if data.get("status") != "running" or float(data.get("lease", 0)) > time.time() + 1:
            return False  # alive by this replica's clock (with a second of slack: the script decides)
        cid, owner = data["conversation_id"], data.get("owner", ANONYMOUS)
        media = tuple(MediaRef.model_validate(m) for m in json.loads(data.get("media") or "[]"))
        start = MessageStart(cid, owner, data.get("question", ""), media)
        rows = await self._call(self._redis.xrange(f"megrez:msg:{mid}:events"))
        events = agent_events(StoredEvent(i, f.get("type", ""), f.get("data", "")) for i, f in rows)
        note = Note(code="interrupted", message="interrupted: the server answering it stopped")
        record = partial_record(start, events, note=note)
        turn = StoredTurn(message_id=mid, record=record, status="failed", error=REAPED)
        m = f"megrez:msg:{mid}"
        keys = [m, f"{m}:events", LEASES, *_conv_keys(cid, owner), f"megrez:conv:{cid}:running"]
        keys.append(f"megrez:slots:{owner}")  # a /chat turn's slot is its message id
        args = [mid, turn.model_dump_json(), self.conversation_ttl_s, cid, self.stream_ttl_s]
        args += [REAPED.model_dump_json(), done_data("failed")]
        reaped = bool(await self._call(self._scripts["reap"](keys, args)))
        if reaped:
            log.warning("turn %s: its lease ran out (the replica running it stopped); stored as failed", mid)
        return reaped

    async def reap_expired(self, skip: Iterable[str] = ()) -> list[str]:
        """Reap every running message whose lease has ended, except ``skip`` (this replica's own)."""
        mine = set(skip) | set(self._live)
        expired = await self._call(self._scripts["expired"]([LEASES], []))
        return [mid for mid in expired if mid not in mine and await self.reap(mid)]

    async def events(self, mid: str, after: str | None = None) -> AsyncIterator[StoredEvent]:
        live = self._live.get(mid)
        if live is not None:  # this replica runs the turn: its events are here, no round trip per event
            async for event in live.follow(after):
                yield event
            return
        key, position = f"megrez:msg:{mid}:events", after or "0-0"
        data = await self._message(mid)
        while "status" in data:  # else unknown, expired or deleted
            running = data["status"] == "running"
            reply = await self._call(self._redis.xread({key: position}, block=FOLLOW_BLOCK_MS if running else None))
            for _, entries in reply or ():
                for event_id, fields in entries:
                    position = event_id
                    yield StoredEvent(event_id, fields["type"], fields["data"])
                    if fields["type"] == DONE:
                        return
            if not reply:
                if not running:
                    return  # ended without its done event (deleted meanwhile): everything was read
                if float(data.get("lease", 0)) < time.time():
                    await self.reap(mid)  # its replica died: the reap writes error and done, read next
                data = await self._message(mid)  # only after a quiet spell: has it ended, expired, or died?

    async def request_stop(self, mid: str) -> None:
        await self._call(self._redis.publish(STOP_CHANNEL, mid))

    async def stop_requests(self) -> AsyncIterator[str]:
        """Message ids other replicas were asked to stop; survives Redis restarts (resubscribes)."""
        import redis.exceptions

        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(STOP_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        yield message["data"]
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                log.warning("stop requests: Redis unavailable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
            finally:
                await pubsub.aclose()

    async def put_media(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        await self._call(self._media_redis.set(f"megrez:media:{digest}", data, ex=self.conversation_ttl_s, nx=True))
        return digest

    async def aclose(self) -> None:
        await self._redis.aclose()
        await self._media_redis.aclose()
