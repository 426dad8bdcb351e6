"""Several API processes on one port: ``megrez-search serve --workers N`` (``MEGREZ_API__WORKERS``).

Why: one Python process delivers a few thousand answer pieces a second on its one core (``bench.api``),
while a GPU serving a 3B model emits 15–25 thousand tokens a second: on a GPU host one API process, not
the GPU, would be the limit. N processes each take a core.

**One port.** The parent binds N sockets to the address with ``SO_REUSEPORT``, one per worker, before
anything else starts (a port in use fails at once, not after minutes of model loading), and each worker
inherits its own. The kernel spreads new connections over them by a hash of the client's address and
port, so a burst of streams spreads evenly. One socket shared by all (``vllm serve --api-server-count``)
would let whichever worker wakes first accept a whole burst — asyncio accepts up to the backlog at each
wake-up —, which vLLM evens out with an accept loop of its own that the remote-engine mode, without
vLLM, could not use. A kept-alive connection stays with its worker. Before binding, a plain bind proves
that nobody listens there yet: ``SO_REUSEPORT`` alone would silently share the port with another
server of this user.

**Two ways to run.**

- :func:`serve_workers`: N spawned workers, each building its own server from a picklable factory — the
  remote engine (``MEGREZ_ENGINE__BACKEND=openai``: each worker its own OpenAIEngine, Redis pools and
  retriever) and ``scripts/scripted_service.py``. One worker runs in this process, as before.
- :func:`serve_embedded`: one vLLM engine core for the N frontends, through vLLM 0.32's own multi-frontend
  machinery, exactly as ``vllm/entrypoints/cli/serve.py: run_multi_api_server`` does it:
  ``bind_engine_zmq_listeners``, ``launch_core_engines`` (the model is loaded once, in the core),
  ``APIServerProcessManager`` running :func:`_frontend` in each spawned process, and
  ``wait_for_completion_or_failure``. Each frontend's engine is ``VLLMEngine(config, frontend=...)``, an
  ``AsyncLLM`` joined to that core. None of this is vLLM's public API: ``tests/test_workers.py`` pins it.
  Every process builds vLLM's engine arguments, which loads the Omni plugin (``vllm.general_plugins``).

**Shared state.** Conversations, event streams, turn slots, locks and rate limits are in Redis, stops go
through its pub/sub and a follower reads the store, so any worker serves any request; without
``MEGREZ_REDIS_URL`` each worker would have its own memory and limits, and N > 1 is refused
(:func:`refusal`) rather than an embedded Redis started: a store the operator does not see would hold
the conversations, with no persistence or memory limit chosen, and the compose file already runs one.
Metrics: the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (or empties the one given),
every worker writes its values there, and any worker's ``/metrics`` sums the host (``api/metrics.py``).

**Supervision.** A worker that dies (killed, crashed: an exit status other than 0) stops the service:
the parent stops the other workers and the engine core and exits with status 1, for the service manager
to restart it whole (compose's ``restart: unless-stopped``, systemd's ``Restart=on-failure``). It does
not restart the one worker: a vLLM engine core meets its frontends once, at start, so a new one could
not join; vLLM's own server behaves the same; and one rule for both engine modes is simpler to run.
The dead worker's turns are stored as failed when their leases run out, as for a dead replica. SIGTERM
or SIGINT stops the workers gracefully, then the core; a worker whose parent dies (SIGKILL included)
stops itself, so nothing is left behind either way.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import uvicorn

    from api.settings import Settings
    from engine.base import Engine

ServerFactory = Callable[[], "uvicorn.Config"]
STOP_TIMEOUT_S = 10.0  # a worker's graceful stop (its streams end, its turns are stored) before SIGKILL
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch to multiprocess mode (api/metrics.py)


class ServeFailed(RuntimeError):
    """The service could not start, or a worker died and the service stopped; the message says which."""


def refusal(settings: Settings, workers: int) -> str | None:
    """Why ``workers`` API processes cannot serve with ``settings`` (a message for the operator), or ``None``."""
    if workers > 1 and settings.redis_url is None:
        return (
            f"{workers} workers need MEGREZ_REDIS_URL: conversations, event streams, turn slots and rate limits "
            "must be shared by the workers (run a Redis — docker compose starts one — or serve with 1 worker)"
        )
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        return f"{workers} workers share the port with SO_REUSEPORT, which this system lacks; serve with 1 worker"
    return None


def service_config(
    settings: Settings, *, host: str, port: int, log_format: Literal["text", "json"], engine: Engine | None = None
) -> uvicorn.Config:
    """One worker's server as ``megrez-search serve`` runs it: the app (``create_app``), logs in ``log_format``,
    request heads and bodies bounded and proxies trusted as configured (``api/http_guard.py``).

    :param engine: an engine for the app (a frontend of a shared engine core); default: built from settings.
    """
    from api.app import create_app
    from api.http_guard import server_config
    from api.logs import configure

    configure(log_format)
    app = create_app(settings, engine=engine)
    return server_config(app, settings, host=host, port=port, log_level="info", log_config=None)


def serve_workers(factory: ServerFactory, *, host: str, port: int, workers: int) -> None:
    """Serve on ``host:port`` with ``workers`` processes, each running the server ``factory`` builds; returns
    when they have stopped (SIGTERM, SIGINT), raises :class:`ServeFailed` when the server did not start or
    a worker died.

    :param factory: builds one worker's ``uvicorn.Config`` (its app included), once in each worker; it
        crosses into spawned processes, so a module-level function or a ``functools.partial`` of one.
        Its host and port are used with one worker only (more share the sockets bound here).
    """
    import uvicorn

    if workers == 1:
        server = uvicorn.Server(factory())
        server.run()
        if not server.started:
            raise ServeFailed(f"the server did not start on {host}:{port} (see the log above)")
        return
    sockets = listen_sockets(host, port, workers)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no event loop or lock copied mid-use
    processes = [
        context.Process(target=_worker, args=(factory, sock), name=f"worker-{i}") for i, sock in enumerate(sockets)
    ]
    with _host_metrics(), _stop_on_signals():
        try:
            for process in processes:
                process.start()
            _close(sockets)  # each worker holds its own now; one that dies takes its socket off the port
            _supervise(processes)
        finally:
            _close(sockets)
            _stop(processes)


def serve_embedded(
    settings: Settings, *, host: str, port: int, workers: int, log_format: Literal["text", "json"]
) -> None:
    """Serve on ``host:port`` with ``workers`` frontends of one embedded vLLM engine core (see the module
    docstring); returns when stopped, raises :class:`ServeFailed` when the engine does not start or a process
    dies."""
    from engine.base import EngineError
    from engine.vllm_engine import check_weights

    config = settings.engine
    try:
        check_weights(config.model, config.revision)  # at once, not after vLLM's retries against the hub
    except EngineError as exc:
        raise ServeFailed(f"the model engine ({config.backend}, {config.model}) did not start: {exc}") from None
    sockets = listen_sockets(host, port, workers)
    with _host_metrics(), _stop_on_signals():
        try:
            _run_engine_core(settings, sockets, _FrontendArgs(settings, host, port, log_format))
        finally:
            _close(sockets)


def _run_engine_core(settings: Settings, sockets: list[socket.socket], frontend_args: _FrontendArgs) -> None:
    """``run_multi_api_server``'s steps with our frontend function (``vllm/entrypoints/cli/serve.py``)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.utils import bind_engine_zmq_listeners, launch_core_engines
    from vllm.v1.executor import Executor
    from vllm.v1.utils import APIServerProcessManager, wait_for_completion_or_failure

    from engine.vllm_engine import engine_args

    workers = len(sockets)
    args = engine_args(settings.engine)
    args._api_process_count, args._api_process_rank = workers, -1
    try:
        vllm_config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
    except (OSError, ValueError) as exc:  # a config.json that does not load, settings vLLM refuses
        raise ServeFailed(f"the model engine (vllm, {settings.engine.model}) did not start: {exc}") from None
    listeners = bind_engine_zmq_listeners(vllm_config, workers)
    executor = Executor.get_class(vllm_config)
    frontends = launch = None
    try:
        try:
            with launch_core_engines(vllm_config, executor, not args.disable_log_stats, listeners.addresses) as launch:
                coordinator = launch.coordinator
                frontends = APIServerProcessManager(
                    listen_address="",  # unused: each frontend serves the socket it is handed
                    sock=sockets,
                    args=frontend_args,
                    num_servers=workers,
                    input_listeners=listeners.inputs,
                    output_listeners=listeners.outputs,
                    target_server_fn=_frontend,
                    stats_update_address=coordinator.get_stats_publish_address() if coordinator else None,
                    tensor_queue=launch.tensor_queue,
                )
                _close(sockets)
                launch.watched_frontend_processes = frontends.processes  # one that exits aborts the core's start
            # Leaving the block waited for the core to load the model.
        except RuntimeError as exc:  # vLLM's words: which process failed; the log above says why
            raise ServeFailed(f"the model engine did not start: {exc}; the other processes were stopped") from None
        try:
            wait_for_completion_or_failure(
                api_server_manager=frontends, engine_manager=launch.engine_manager, coordinator=coordinator
            )
        except RuntimeError as exc:  # a frontend or the engine core died
            # By sentinel, not is_alive(): a process's pipe closes a moment before it can be reaped, and vLLM
            # reports it in that moment ("exit code None") while is_alive() still says it runs.
            ended = set(wait([process.sentinel for process in frontends.processes], timeout=0))
            dead = [process for process in frontends.processes if process.sentinel in ended]
            raise ServeFailed(f"{_died(dead[0]) if dead else exc}; the other processes were stopped") from None
    finally:
        if frontends is not None:
            frontends.shutdown(timeout=STOP_TIMEOUT_S)
        if launch is not None and launch.engine_manager is not None:
            launch.engine_manager.shutdown(timeout=STOP_TIMEOUT_S)
        if launch is not None and launch.coordinator is not None:
            launch.coordinator.shutdown(timeout=STOP_TIMEOUT_S)
        listeners.cleanup()
        del listeners  # now: its __del__ cleans up again, and fails if it runs at interpreter exit


@dataclass(frozen=True)
class _FrontendArgs:
    """What each frontend process needs besides vLLM's client config (picklable: it crosses a spawn)."""

    settings: Settings
    host: str
    port: int
    log_format: Literal["text", "json"]


def _frontend(_listen_address: str, sockets: list[socket.socket], args: _FrontendArgs, client_config: dict) -> None:
    """One embedded-engine frontend, in its own process (vLLM's ``target_server_fn`` signature)."""
    from engine.vllm_engine import VLLMEngine

    sock = sockets[client_config["client_index"]]
    _close([other for other in sockets if other is not sock])
    _exit_with_parent()
    engine = VLLMEngine(args.settings.engine, frontend=client_config)
    config = service_config(args.settings, host=args.host, port=args.port, log_format=args.log_format, engine=engine)
    _serve(config, sock, finally_=engine.shutdown)  # the app leaves an engine it was given to its giver


def _worker(factory: ServerFactory, sock: socket.socket) -> None:
    """One plain worker, in its own process."""
    _exit_with_parent()
    _serve(factory(), sock)


def _serve(config: uvicorn.Config, sock: socket.socket, finally_: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run uvicorn on ``sock`` (then ``finally_`` on the same event loop); exit status 1 if it never started."""
    import asyncio

    import uvicorn

    server = uvicorn.Server(config)

    async def serve() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            if finally_ is not None:
                await finally_()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(serve())
    if not server.started:
        raise SystemExit(1)


def listen_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` TCP sockets bound to ``host:port`` with ``SO_REUSEPORT`` (they listen in the workers);
    :class:`ServeFailed` if something listens there already or the address is not this machine's."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:  # without SO_REUSEPORT: fails on any listener
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ServeFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
    except OSError as exc:
        _close(sockets)
        raise ServeFailed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def _supervise(processes: list[BaseProcess]) -> None:
    """Wait until every worker has ended; the first to end badly raises (vLLM's rule for its frontends)."""
    running = {process.sentinel: process for process in processes}
    while running:
        for sentinel in wait(list(running)):
            process = running.pop(sentinel)  # type: ignore[call-overload]
            process.join(1.0)  # the sentinel can fire a moment before the exit status can be read
            if process.exitcode != 0:
                raise ServeFailed(f"{_died(process)}; the other processes were stopped")


def _died(process: BaseProcess) -> str:
    """A dead process for the operator: ``worker-1 (pid 123) died (killed by SIGKILL)``."""
    process.join(1.0)
    code = process.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
    return f"{process.name} (pid {process.pid}) died ({how})"


def _stop(processes: list[BaseProcess]) -> None:
    """SIGTERM to the workers still running, SIGKILL to those still there after :data:`STOP_TIMEOUT_S`."""
    import time

    started = [process for process in processes if process.pid is not None]
    for process in started:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in started:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in started:
        if process.is_alive():
            process.kill()
            process.join()


def _exit_with_parent() -> None:
    """In a worker: stop gracefully (SIGTERM to itself) when the parent process is gone, however it ended."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextlib.contextmanager
def _host_metrics() -> Iterator[None]:
    """Prometheus multiprocess mode for the workers started inside: ``PROMETHEUS_MULTIPROC_DIR`` set (they
    inherit it), to a fresh directory removed afterwards, or the one given emptied (old values would count)."""
    given = os.environ.get(METRICS_DIR)
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield
        return
    with tempfile.TemporaryDirectory(prefix="megrez-metrics-") as path:
        os.environ[METRICS_DIR] = path
        try:
            yield
        finally:
            del os.environ[METRICS_DIR]


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT end the parent's wait once (``SystemExit``), so its ``finally`` stops the workers;
    a second signal does not interrupt that."""
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise SystemExit(0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
