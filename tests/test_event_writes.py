"""The turns' event writes (``api/event_writes.py``): shown at once, stored together across turns, each once
and in order, the end never overtaking a write in flight, a store that fails retried then given up on.
A recording store stands in for Redis here; ``tests/test_turn_faults.py`` runs the same path on Redis."""

from __future__ import annotations

import asyncio

from agent.events import TokenEvent
from api.event_writes import StoreRetry, StoreWriter
from api.memory import StoreUnavailable


class Recorder:
    """The two calls a turn writer makes, recorded; ``gate`` holds writes back, ``failures`` fail the next ones."""

    def __init__(self) -> None:
        self.shown: dict[str, list[str]] = {}
        self.writes: list[dict[str, list[str]]] = []
        self.gate: asyncio.Event | None = None
        self.failures = 0
        self.calls = 0

    def show(self, mid, events) -> None:
        self.shown.setdefault(mid, []).extend(e.id for e in events)

    async def append_events(self, batches) -> None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("Redis is unavailable: connection refused")
        self.writes.append({mid: [e.id for e in events] for mid, events in batches.items()})

    def stored(self, mid: str) -> list[str]:
        return [event_id for write in self.writes for event_id in write.get(mid, [])]


def token(text: str = "word ") -> TokenEvent:
    return TokenEvent(text=text)


async def test_events_are_shown_at_once_and_stored_together_across_turns_each_once_in_order():
    store = Recorder()
    writes = StoreWriter(store, StoreRetry(1.0), delay_s=0.05)
    turns = [writes.turn(f"m{i}") for i in range(3)]
    for n in range(1, 11):
        for turn in turns:
            turn.put(token())
            assert len(store.shown[turn.mid]) == n  # shown before any await
        await asyncio.sleep(0.012)
    assert all(len(store.shown[t.mid]) == 10 for t in turns) and len(store.writes) <= 3
    lasts = [await turn.close() for turn in turns]
    assert len(store.writes) >= 1 and all(len(write) == 3 for write in store.writes)  # every turn in each write
    for turn, last in zip(turns, lasts, strict=True):
        assert store.stored(turn.mid) + [e.id for e in last] == store.shown[turn.mid]  # once each, in order


async def test_the_end_waits_for_a_write_in_flight_with_its_events_and_takes_the_rest():
    store = Recorder()
    store.gate = asyncio.Event()
    writes = StoreWriter(store, StoreRetry(1.0), delay_s=0.2)
    turn, other = writes.turn("m"), writes.turn("n")
    turn.put(token("a"))
    await asyncio.sleep(0.3)  # the write holding "a" is in flight, held at the gate
    assert store.calls == 1
    turn.put(token("b"))
    closing = asyncio.create_task(turn.close())
    await asyncio.sleep(0.03)
    assert not closing.done()  # "a" is not stored yet: the end must not overtake it
    other.put(token("c"))
    store.gate.set()
    last = await asyncio.wait_for(closing, 1)
    assert store.stored("m") == store.shown["m"][:1] and [e.id for e in last] == store.shown["m"][1:]
    # "c" came during the write: it waits for the next one, which "n"'s end makes needless.
    assert [e.id for e in await other.close()] == store.shown["n"] and store.stored("n") == []


async def test_an_end_while_nothing_is_in_flight_takes_everything_and_leaves_no_write():
    store = Recorder()
    writes = StoreWriter(store, StoreRetry(1.0), delay_s=0.05)
    turn = writes.turn("m")
    turn.put(token())
    turn.put(token())
    last = await turn.close()
    await asyncio.sleep(0.1)  # the timer that was set fires with nothing left to write
    assert [e.id for e in last] == store.shown["m"] and store.writes == [] and store.calls == 0


async def test_a_store_that_comes_back_gets_what_piled_up_once_in_order():
    store = Recorder()
    store.failures = 2
    writes = StoreWriter(store, StoreRetry(5.0), delay_s=0.01)
    turn = writes.turn("m")
    for _ in range(20):
        turn.put(token())
        await asyncio.sleep(0.01)  # events keep coming while the first write is retried
    last = await turn.close()
    assert turn.error is None and store.calls >= 3
    assert store.stored("m") + [e.id for e in last] == store.shown["m"] and len(store.shown["m"]) == 20


async def test_a_store_that_stays_away_is_given_up_on_for_every_turn_in_the_write():
    store = Recorder()
    store.failures = 10**6
    writes = StoreWriter(store, StoreRetry(0.2), delay_s=0.01)
    turns = [writes.turn("m"), writes.turn("n")]
    for turn in turns:
        turn.put(token())
    await asyncio.sleep(0.5)
    assert all(isinstance(turn.error, StoreUnavailable) for turn in turns)
    calls = store.calls
    turns[0].put(token())  # shown here, never queued for the store again
    assert len(store.shown["m"]) == 2 and await turns[0].close() == [] and await turns[1].close() == []
    await asyncio.sleep(0.05)
    assert store.calls == calls and store.writes == []
