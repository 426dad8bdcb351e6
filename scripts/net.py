"""Local networking helpers for tests and benchmarks: free ports, child servers, a private redis-server or Redis
Cluster, SSE frames."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChildServer:
    """A server in a child process, listening on 127.0.0.1 at a port that stays its own across restarts:
    start it, SIGKILL it as a crash would, start it again on the same port.

    Example::

        server = ChildServer([sys.executable, "-m", "scripts.scripted_service", "--port", "{port}", ...]).start()
        server.kill()
        server.start()
        server.stop()
    """

    def __init__(
        self,
        command: list[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        """``command``: ``"{port}"`` in it is replaced by the port; ``env``: added to this process's; ``log``: a
        file its standard error is appended to (default: this process's)."""
        self.port = port or free_port()
        self.command = [part.replace("{port}", str(self.port)) for part in command]
        self.env = env or {}
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, *, timeout_s: float = 60.0) -> ChildServer:
        """Start it and wait until it accepts connections (``RuntimeError`` if it exits or never listens)."""
        import os

        self.stop()
        repo = str(Path(__file__).resolve().parents[1])
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, (repo, os.environ.get("PYTHONPATH"))))}
        stderr = open(self.log, "ab") if self.log is not None else None  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(
                self.command, cwd=repo, env=env | self.env, stdout=subprocess.DEVNULL, stderr=stderr
            )
        finally:
            if stderr is not None:
                stderr.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"{self.command[:4]} exited with {code}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.command[:4]} did not listen on {self.port} within {timeout_s:g} s")

    def kill(self) -> None:
        """SIGKILL: no goodbye to open connections, as when the machine or the process dies."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


class RedisServer(ChildServer):
    """A redis-server of our own on 127.0.0.1 (never the machine's shared one on 6379).

    ``persist=True`` turns on the append-only file in ``workdir`` (fsync on every write), so a restart —
    even after :meth:`kill` — keeps the data.
    """

    def __init__(self, workdir: Path, *, port: int | None = None, persist: bool = False, cluster: bool = False) -> None:
        """``cluster``: a cluster node (``--cluster-enabled``; its ``nodes.conf`` in ``workdir``), to be joined by
        :class:`RedisCluster`."""
        exe = shutil.which("redis-server") or "redis-server"
        args = [exe, "--port", "{port}", "--bind", "127.0.0.1", "--save", "", "--dir", str(workdir)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]
        # The cluster bus listens on a port of its own (by default the port + 10000: often out of range).
        args += ["--cluster-enabled", "yes", "--cluster-port", str(free_port())] if cluster else []
        super().__init__(args, port=port)
        self.workdir, self.persist = workdir, persist

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout_s: float = 10.0) -> RedisServer:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (make test installs it; apt-get install redis-server)")
        try:
            super().start(timeout_s=timeout_s)
        except RuntimeError as exc:
            raise RuntimeError(f"redis-server did not start: {exc}") from None
        return self


class RedisCluster:
    """A Redis Cluster of ``masters`` redis-servers of our own on 127.0.0.1 (no replicas), the hash slots spread
    over them by ``redis-cli --cluster create``.

    Example::

        cluster = RedisCluster(tmp_path).start()
        RedisMemory(cluster.url, cluster=True)  # any node's address will do
        cluster.stop()
    """

    def __init__(self, workdir: Path, *, masters: int = 3) -> None:
        self.nodes = []
        for i in range(masters):
            (workdir / f"node-{i}").mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(workdir / f"node-{i}", cluster=True))

    @property
    def url(self) -> str:
        """The first node's address, as a ``redis+cluster://`` URL (what ``MEGREZ_REDIS_CLUSTER=true`` makes of it)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, *, timeout_s: float = 30.0) -> RedisCluster:
        """Start the nodes, join them, and wait until every node says the cluster is ``ok``."""
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            created = subprocess.run(
                ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}{created.stderr}")
            deadline = time.monotonic() + timeout_s
            while not all(self._ok(node) for node in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster on {addresses} did not become ok within {timeout_s:g} s")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        command = ["redis-cli", "-p", str(node.port), "cluster", "info"]
        info = subprocess.run(command, check=False, capture_output=True, text=True, timeout=5)
        return "cluster_state:ok" in info.stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def sse_frames(buffer: str) -> tuple[list[dict[str, str]], str]:
    """The complete SSE frames in ``buffer`` as ``{"event", "id", "data"}`` dicts (comments skipped), and the
    unfinished rest, to be completed by the next chunk."""
    *blocks, rest = buffer.replace("\r\n", "\n").split("\n\n")
    frames = []
    for block in blocks:
        frame: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            frame[key] = frame.get(key, "") + value.removeprefix(" ")
        if frame:
            frames.append(frame)
    return frames, rest
