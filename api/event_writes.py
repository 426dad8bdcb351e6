"""How a turn's events reach its followers and the store: shown at once, stored together.

Every event a turn makes is numbered (:class:`api.memory.EventIds`) and handed to this process's
followers the moment it is made (``Memory.show``): the live stream never waits for the store. The store
gets the events in batches. One :class:`StoreWriter` per process collects what every running turn has
not stored yet and writes all of it in one step (``Memory.append_events``: one pipeline) ``delay_s``
after the first of them (``MEGREZ_API__EVENT_WRITE_MS``), or when the write before it is back if that
is later. A process running 1,000 turns thus makes about ten store round trips a second for their
events, where one per batch per turn made thousands — a round trip costs redis-py ≈75 µs of CPU, more
than a whole answer piece costs a bare streaming server (``bench/README.md``, issue 20).

What that costs: followers on other processes and replicas read the store, so they run up to one
interval behind; a process that dies loses at most its last interval of events (the turn is stored as
failed with what the store had, ``api/redis_memory.py``: ``reap``).

**A turn's end** takes its events not written yet (:meth:`TurnWriter.close`) into its own last step
(``finish_message``). It first waits for a write in flight that holds some of its events, so the end
never overtakes them: once a message has ended, the store refuses appends to it.

**A store that fails** (Redis killed and restarted): the write is retried with backoff for
``store_retry_s`` (:class:`StoreRetry`) while every turn's events pile up, still shown here; then the
piled-up events go in the next write. If the store stays away past the window, every turn in that
write gives up on storing (``error``): its followers here see the rest, and its runner ends the stream
with an error saying the answer could not be saved (``api/turns.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from agent.events import Event
from api.memory import EventIds, Memory, StoredEvent, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreRetry:
    """Retries a store operation with backoff while the store is unavailable, up to ``seconds`` in all.

    Example::

        retry = StoreRetry(30.0)
        await retry(lambda: memory.append_events({mid: events}), f"turn {mid}")
    """

    def __init__(self, seconds: float) -> None:
        """``seconds``: how long to keep retrying after the first failure (0: never retry)."""
        self.seconds = seconds

    async def __call__(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        """``operation()``'s result; its last :class:`StoreUnavailable` once the window is over (``what``: for the log)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        delay = 0.05
        while True:
            try:
                return await operation()
            except StoreUnavailable as exc:
                now = loop.time()
                if deadline is None:
                    deadline = now + self.seconds
                    log.warning("%s: %s; retrying for up to %g s", what, exc, self.seconds)
                if now + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)


class StoreWriter:
    """Writes the events of every running turn of this process to the store, all in one step per interval.

    Example::

        writes = StoreWriter(memory, StoreRetry(30.0), delay_s=0.1)
        turn = writes.turn(mid)
        turn.put(TokenEvent(text="Hi"))  # followers here see it now; the store within 0.1 s
        last = await turn.close()  # its events not stored yet, for finish_message
    """

    def __init__(self, memory: Memory, retry: StoreRetry, delay_s: float) -> None:
        """``retry``: how long a write waits for a store that is down; ``delay_s``: how long events wait to be
        written together."""
        self.memory, self.retry, self.delay_s = memory, retry, delay_s
        self._waiting: dict[str, TurnWriter] = {}  # turns with events not stored yet, not in the write in flight
        self._in_flight: frozenset[str] = frozenset()  # the turns whose events the write in flight holds
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None

    def turn(self, mid: str) -> TurnWriter:
        """The writer of message ``mid``'s events."""
        return TurnWriter(self, mid)

    def _wants(self, writer: TurnWriter) -> None:
        self._waiting[writer.mid] = writer
        if self._timer is None and self._task is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay_s, self._write)

    def _write(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        writers, self._waiting = self._waiting, {}
        batches = {mid: writer._take() for mid, writer in writers.items()}
        self._in_flight = frozenset(batches)
        try:
            if not batches:  # the turns that were waiting ended first and took their events along
                return
            await self.retry(
                lambda: self.memory.append_events(batches), f"storing the events of {len(batches)} turn(s)"
            )
        except StoreUnavailable as exc:
            for writer in writers.values():
                writer._give_up(exc)
        finally:
            self._task, self._in_flight = None, frozenset()
            if self._waiting and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self.delay_s, self._write)

    async def _settle(self, mid: str) -> None:
        """Return once no write in flight holds events of ``mid``."""
        while self._task is not None and mid in self._in_flight:
            await asyncio.shield(self._task)


class TurnWriter:
    """One turn's events: numbered, shown at once, handed to its :class:`StoreWriter` (see its example)."""

    def __init__(self, writes: StoreWriter, mid: str) -> None:
        self._writes, self.mid = writes, mid
        self.ids = EventIds()
        self._pending: list[StoredEvent] = []  # shown, not stored yet, not in a write in flight
        self.error: StoreUnavailable | None = None  # set once the store stayed away past the retry window

    def stored(self, event: Event) -> StoredEvent:
        """``event`` with the turn's next id, as its stream keeps it."""
        return StoredEvent(self.ids.next(), event.type, event.model_dump_json())

    def put(self, event: Event) -> None:
        """Show ``event`` to this process's followers now and queue it for the store (never waits)."""
        stored = self.stored(event)
        self._writes.memory.show(self.mid, (stored,))
        if self.error is not None:  # given up on the store: shown here only
            return
        if not self._pending:
            self._writes._wants(self)
        self._pending.append(stored)

    def _take(self) -> list[StoredEvent]:
        batch, self._pending = self._pending, []
        return batch

    def _give_up(self, error: StoreUnavailable) -> None:
        self.error = error
        self._pending.clear()
        self._writes._waiting.pop(self.mid, None)

    async def close(self) -> list[StoredEvent]:
        """Wait for a write in flight that holds some of this turn's events (and its retries); then the
        events not stored yet, which the caller stores with the turn's end."""
        await self._writes._settle(self.mid)
        self._writes._waiting.pop(self.mid, None)
        return self._take()
