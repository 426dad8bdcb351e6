"""The move of a single Redis's keys from the memory store's previous schema to ``api/redis_schema.py``'s.

The previous schema (``megrez:conv:<cid>`` hash with ``:turns``, ``:messages``, ``:running``;
``megrez:convs:<owner>``, ``megrez:slots:<owner>``, ``megrez:msg:<mid>`` with ``:events``,
``megrez:leases``) had no hash tags and scripts that spanned them: it ran on one Redis only, so a cluster
never held it. Conversations are kept 30 days, so its keys are moved, not read alongside: the first store
step of a process on a single Redis without ``megrez:schema`` (:class:`api.redis_schema.RedisSteps`)
renames every conversation's hash and turns and every owner's listing to their new keys (lifetimes kept,
one script per key set: safe to run from several replicas at once), deletes the old message hashes,
streams and lease index (an upgrade restarts the service: live streams end anyway; slots and locks expire
within a lease), then sets ``megrez:schema``. Stop every replica of the old version first: old and new
ones cannot share a store. To move a single Redis to a cluster, let the service upgrade it, then move the
keys.

This module can go once no store of the previous schema is left (its conversations expired 30 days after
the upgrade shipped).
"""

from __future__ import annotations

import logging

from api.redis_schema import SCHEMA, SCHEMA_VERSION, conversation_keys, owner_keys

log = logging.getLogger(__name__)

# KEYS: old conv, turns, messages; new conv, turns. ARGV: the old message keys' prefix. Moves a conversation
# unless it was moved already; its messages' old keys go. (One Redis only: these keys span slots.)
_MOVE_CONVERSATION = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
for _, mid in ipairs(redis.call('smembers', KEYS[3])) do
  redis.call('del', ARGV[1] .. mid, ARGV[1] .. mid .. ':events')
end
redis.call('del', KEYS[3])
if redis.call('exists', KEYS[4]) == 1 then redis.call('del', KEYS[1], KEYS[2]) return 0 end
redis.call('rename', KEYS[1], KEYS[4])
if redis.call('exists', KEYS[2]) == 1 then redis.call('rename', KEYS[2], KEYS[5]) end
return 1
"""
# KEYS: old listing, new listing. Merged (the later score wins), lifetime kept.
_MOVE_LISTING = """
if redis.call('exists', KEYS[1]) == 0 then return 0 end
local ttl = math.max(redis.call('ttl', KEYS[1]), redis.call('ttl', KEYS[2]))
redis.call('zunionstore', KEYS[2], 2, KEYS[1], KEYS[2], 'AGGREGATE', 'MAX')
redis.call('del', KEYS[1])
if ttl > 0 then redis.call('expire', KEYS[2], ttl) end
return 1
"""


async def upgrade(client) -> None:
    """Move a single Redis's keys from the previous schema, once (see the module docstring).

    ``client``: a ``redis.asyncio.Redis`` with ``decode_responses=True`` (never a cluster client).
    """
    if await client.get(SCHEMA) == SCHEMA_VERSION:
        return
    move_conversation = client.register_script(_MOVE_CONVERSATION)
    move_listing = client.register_script(_MOVE_LISTING)
    moved = 0
    async for key in client.scan_iter(match="megrez:conv:*", count=1000, _type="hash"):
        cid = key.removeprefix("megrez:conv:")
        if ":" not in cid:
            new = conversation_keys(cid)
            moved += await move_conversation([key, f"{key}:turns", f"{key}:messages", *new[:2]], ["megrez:msg:"])
    async for key in client.scan_iter(match="megrez:convs:*", count=1000, _type="zset"):
        await move_listing([key, owner_keys(key.removeprefix("megrez:convs:"))[0]])
    await client.delete("megrez:leases")
    await client.set(SCHEMA, SCHEMA_VERSION)
    if moved:
        log.info("memory store: moved %d conversations to the schema of api/redis_schema.py", moved)
