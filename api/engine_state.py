"""The engine's availability, as the service sees it: started in the background, restarted, probed.

:class:`EngineState` runs one task for the app's lifetime (:meth:`EngineState.run`):

1. **Start.** ``/healthz`` answers at once while the engine starts (loading weights takes minutes on a
   big model). A *remote* engine whose server is not reachable yet — refused, a black hole, a proxy
   answering 502 — is retried **forever**, with backoff from ``retry_backoff_s`` doubling up to
   ``start_retry_max_s``: the server coming up later is the normal case (both started by one compose
   file, a GPU host rebooting), and the API must become ready without a restart. The *embedded* vLLM
   engine is **not** retried: its load fails for reasons that do not go away by waiting (no weights at
   the configured path, a model vLLM cannot run, not enough GPU memory, bad flags), a retry would
   repeat a load of minutes and its memory spike forever, and a half-failed start can leave engine
   processes and GPU memory behind that only a process restart reliably frees. It stays ``failed``
   with its error; ``/readyz`` says so, and the orchestrator (or the operator, after fixing the
   configuration) restarts the process. Which rule applies is the engine's
   :attr:`engine.base.Engine.start_retryable`.
2. **Probe.** Once started, ``engine.health()`` every ``health_interval_s`` (the remote server's
   ``/health``, one attempt bounded by the connect timeout; vLLM's own ``check_health()``, which fails
   once its engine core died). The result is cached: ``/readyz`` reads it and never waits on the
   engine, and ``/chat`` and ``/v1`` answer 503 at once while the engine is known to be down instead
   of starting turns that can only fail. A turn already running meets the failure itself (the remote
   engine retries what it safely can) and ends with an ``engine_unavailable`` error event.

What each state tells whom: :meth:`EngineState.check` raises :class:`EngineNotReady` with a plain
``message`` for anyone and a ``detail`` for operators (``/readyz`` to key holders, logs); the
:attr:`EngineState.status` word (``loading``, ``ready``, ``unavailable``) is what a page may show a visitor,
and :attr:`EngineState.setup` what must change before it can answer, as a code the page words itself
(``GET /info``'s ``setup``): ``engine_weights_missing`` (no weights here and no hub to fetch them from —
logged as one line naming the two ways forward, no traceback: nothing in it would help),
``engine_server_unreachable`` (the remote server, still retried) or ``engine_failed`` (anything else).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Literal

from pydantic import BaseModel

from engine.base import Engine, EngineUnavailable, Health
from engine.config import EngineConfig
from engine.vllm_engine import WeightsMissing

log = logging.getLogger(__name__)

Status = Literal["loading", "ready", "unavailable"]
SetupCode = Literal[
    "engine_weights_missing",  # {model}: neither a local folder nor in the hub cache, and the hub cannot be reached
    "engine_server_unreachable",  # {url} (to key holders): the remote engine's server does not answer
    "engine_failed",  # another start failure: the detail is in the log and /readyz
    "search_no_backend",  # {backends}: no search backend can work (skipped, or unreachable)
]

# A guard around a probe, for an engine whose own check could hang; both engines bound theirs.
PROBE_TIMEOUT_S = 10.0
LOADING_RETRY_AFTER_S = 5


class SetupHint(BaseModel):
    """Something to set up before the service works fully, for ``GET /info``: a code a client words itself,
    and the values it names.

    Example::

        SetupHint(code="engine_weights_missing", params={"model": "Infinigence/Megrez-3B-Instruct"})
    """

    code: SetupCode
    params: dict[str, str] = {}


class EngineNotReady(Exception):
    """A turn cannot run now. ``message`` is for anyone, ``detail`` for operators; ``code`` is the
    machine-readable reason (``engine_loading`` or ``engine_unavailable``); ``retry_after_s`` is a hint
    for the ``Retry-After`` header (``None``: waiting will not help)."""

    def __init__(self, code: str, message: str, detail: str | None, retry_after_s: int | None) -> None:
        super().__init__(message)
        self.code, self.message, self.detail, self.retry_after_s = code, message, detail, retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class EngineState:
    """Starts ``engine`` in the background and keeps its health (see the module docstring).

    Example::

        state = EngineState(engine, settings.engine)
        task = asyncio.create_task(state.run())  # the app's lifespan does this
        await state.started.wait()
        state.check()  # raises EngineNotReady while the engine is loading or down
    """

    def __init__(self, engine: Engine, config: EngineConfig) -> None:
        """``config``: ``retry_backoff_s`` and ``start_retry_max_s`` pace the start attempts,
        ``health_interval_s`` the probes."""
        self.engine = engine
        self.config = config
        self.started = asyncio.Event()  # set once the engine has started; stays set when it goes down later
        self.healthy = False  # the last probe (or the start) succeeded
        self.failed = False  # the start failed for good (an engine whose start is not retried)
        self.problem: str | None = None  # the last failure, for operators
        self.setup: SetupHint | None = None  # what to change before the engine can start (None: nothing known)
        self.attempts = 0  # start attempts so far
        self._next_attempt: float | None = None  # monotonic time of the next start attempt

    @property
    def status(self) -> Status:
        if self.started.is_set() and self.healthy:
            return "ready"
        if self.problem is None:
            return "loading"
        return "unavailable"

    async def run(self) -> None:
        """Start the engine (retrying as its kind allows), then probe it until cancelled."""
        if not await self._start():
            return
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.probe()

    async def _start(self) -> bool:
        delay = self.config.retry_backoff_s
        while True:
            self.attempts += 1
            try:
                await self.engine.start()
            except Exception as exc:
                self.problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.setup = self._hint(exc)
                if not self.engine.start_retryable:
                    if isinstance(exc, WeightsMissing):  # its one line says it all: a traceback would add nothing
                        log.error("the model engine cannot start: %s", exc)
                    else:
                        log.exception("the model engine did not start (not retried: fix the configuration and restart)")
                    self.failed = True
                    return False
                delay = min(max(delay, 0.1), self.config.start_retry_max_s)
                log.warning(
                    "the model engine did not start (attempt %d, next in %.1f s): %s",
                    self.attempts,
                    delay,
                    self.problem,
                )
                self._next_attempt = time.monotonic() + delay
                await asyncio.sleep(delay)
                self._next_attempt, delay = None, delay * 2
                continue
            self.problem, self.setup, self.healthy = None, None, True
            self.started.set()
            log.info(
                "the model engine is ready (%s, %s, attempt %d)", self.engine.backend, self.engine.model, self.attempts
            )
            return True

    def _hint(self, exc: Exception) -> SetupHint:
        if isinstance(exc, WeightsMissing):
            return SetupHint(code="engine_weights_missing", params={"model": exc.model})
        if isinstance(exc, EngineUnavailable):  # a remote server that cannot be reached (refused, timed out, 502)
            return SetupHint(code="engine_server_unreachable", params={"url": self.config.openai_base_url})
        return SetupHint(code="engine_failed")

    async def probe(self) -> Health:
        """Ask the engine how it is, and remember the answer (logged when it changes)."""
        try:
            health = await asyncio.wait_for(self.engine.health(), PROBE_TIMEOUT_S)
        except TimeoutError:
            health = Health(False, self.engine.backend, self.engine.model, f"no health answer in {PROBE_TIMEOUT_S:g} s")
        except Exception as exc:  # noqa: BLE001 - a broken probe reports the engine down, never ends the supervisor
            health = Health(False, self.engine.backend, self.engine.model, f"{type(exc).__name__}: {exc}")
        if health.ok and not self.healthy:
            log.warning("the model engine is available again")
        elif not health.ok and (self.healthy or health.detail != self.problem):
            log.warning("the model engine is unavailable: %s", health.detail)
        self.healthy = health.ok
        self.problem = None if health.ok else health.detail or "the health check failed"
        return health

    def problems(self) -> list[str]:
        """What ``/readyz`` lists for the engine (empty when it is ready); operator detail included."""
        if self.status == "ready":
            return []
        if self.problem is None:
            return ["engine loading"]
        if self.failed:
            return [f"engine failed to start (not retried: fix the configuration and restart): {self.problem}"]
        if not self.started.is_set():
            when = "retrying now" if self._next_attempt is None else f"next in {self._seconds_to_next_attempt()} s"
            return [f"engine failed to start (attempt {self.attempts}, {when}): {self.problem}"]
        return [f"engine unavailable: {self.problem}"]

    def _seconds_to_next_attempt(self) -> int:
        if self._next_attempt is None:
            return 0
        return max(0, math.ceil(self._next_attempt - time.monotonic()))

    def check(self) -> None:
        """Return if a turn can run now; raise :class:`EngineNotReady` otherwise."""
        status = self.status
        if status == "ready":
            return
        detail = "; ".join(self.problems())
        if status == "loading":
            raise EngineNotReady("engine_loading", "engine loading", detail, LOADING_RETRY_AFTER_S)
        if self.failed:
            message = "The model engine failed to start; the service cannot answer until an operator fixes it."
            raise EngineNotReady("engine_unavailable", message, detail, None)
        if not self.started.is_set():
            message = "The model engine failed to start and is being retried; try again in a moment."
            raise EngineNotReady("engine_unavailable", message, detail, max(1, self._seconds_to_next_attempt()))
        message = "The model engine is unavailable right now; try again in a moment."
        raise EngineNotReady("engine_unavailable", message, detail, max(1, math.ceil(self.config.health_interval_s)))
