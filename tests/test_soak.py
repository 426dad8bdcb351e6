"""The soak benchmark, small and short, as a test: under its fault schedule (Redis, the model server and a
replica SIGKILLed and restarted, a search backend failing, clients leaving) no turn is lost, every stream
ends with ``done``, nothing stays held. The figures themselves belong to ``bench/soak.py``."""

from __future__ import annotations

from bench.soak import run


async def test_no_turn_is_lost_and_nothing_stays_held_under_the_fault_schedule():
    figures = await run(conversations=4, duration_s=24, lease_s=1.0, store_retry_s=30)
    tally, audit = figures["tally"], figures["audit"]
    assert len(figures["faults"]) == 4  # Redis, the model server, a replica, SearXNG: all happened
    assert tally.started > 10 and tally.ended["done"] > 0 and tally.left_early > 0
    assert audit["lost"] == [] and tally.no_done == 0
    assert audit["duplicates"] == 0  # and stored once
    assert (audit["slots"], audit["leases"], audit["locks"]) == (0, 0, 0)
