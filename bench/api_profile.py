"""Where the server's CPU goes during a ``bench.api`` level: py-spy samples, summed by component.

py-spy (``pip install py-spy``) samples every process of the server under test (``--subprocesses``: the
workers too) 200 times a second without pausing it (``--nonblocking``); a thread waiting in epoll is not
sampled (py-spy's default), so the samples are where the CPU went. They come back as collapsed stacks
(``--format raw``), and each sample is charged to one component by these rules, from its innermost frame
outwards:

1. A frame in a **neutral** file is passed over, so its cost goes to whoever called it: Python's standard
   library (asyncio's own scheduling, json, …), ``<frozen …>`` modules, anyio, pydantic and pydantic-core
   (validation is work its caller asked for).
2. The first frame that is not neutral names the component by its file (first match in :data:`COMPONENTS`):
   LangGraph/langchain_core (langgraph, langchain_core, langsmith); redis-py; the web stack (uvicorn,
   starlette, fastapi, sse-starlette, h11, httptools); our agent (the repository's ``agent/``: parser,
   citations, nodes, the turn); our API (``api/``); the engine (``engine/``, the scripted engine that
   stands in for it, tokenizers, transformers); the floor (``bench/floor.py``); anything else is *other*.
3. A sample that reaches the event loop's own frames first (asyncio's ``Runner.run``, ``run_forever``,
   ``run_until_complete``, ``_run_once``, ``Handle._run``: what calls the callbacks and coroutines, so
   the code that called *them* is not charged), or has only neutral frames, is *event loop*. Under uvloop
   the loop's work in C (reading sockets, timers, transports) shows as samples ending in ``Runner.run``.

So "LangGraph 38%" means 38% of the samples ended in LangGraph's or langchain_core's code, or in the
standard library called from it. py-spy itself runs on the same cores and the sampled process is read
while it runs: a profiled level's CPU figures are a little higher than an unprofiled one's.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("LangGraph/langchain_core", ("site:langgraph/", "site:langchain_core/", "site:langsmith/")),
    ("redis-py", ("site:redis/",)),
    (
        "web stack",
        tuple(f"site:{p}/" for p in ("uvicorn", "starlette", "fastapi", "sse_starlette", "h11", "httptools")),
    ),
    ("our agent", ("repo:agent/",)),
    ("our API", ("repo:api/",)),
    ("engine", ("repo:engine/", "repo:scripts/scripted_engine.py", "site:tokenizers/", "site:transformers/")),
    ("floor", ("repo:bench/floor.py",)),
)
NEUTRAL_SITE = ("anyio/", "pydantic/", "pydantic_core/", "typing_extensions.py")
EVENT_LOOP, OTHER = "event loop", "other"
_FRAME = re.compile(r"^(?P<name>\S+) \((?P<file>[^()]*?)(?::\d+)?\)$")
LOOP_FRAMES = {"Runner.run", "BaseEventLoop.run_forever", "BaseEventLoop.run_until_complete"}
LOOP_FRAMES |= {"BaseEventLoop._run_once", "Handle._run"}
_STDLIB = tuple({str(Path(sysconfig.get_paths()[k]).resolve()) + "/" for k in ("stdlib", "platstdlib")})


def _where(file: str, repo: Path) -> str:
    """``site:<path inside site-packages>``, ``repo:<path in the repository>``, ``stdlib`` or the file."""
    if "site-packages/" in file:
        return "site:" + file.rsplit("site-packages/", 1)[1]
    if file.startswith("<frozen") or file.startswith(_STDLIB):
        return "stdlib"
    path = Path(file) if file.startswith("/") else repo / file
    try:
        return "repo:" + path.relative_to(repo).as_posix()
    except ValueError:
        return file


def component_of(frames: list[str], repo: Path = REPO) -> str:
    """The component one sample is charged to; ``frames``: py-spy's ``name (file:line)``, outermost first."""
    for frame in reversed(frames):
        match = _FRAME.search(frame)
        if match is None:  # py-spy's process or thread label, not code
            continue
        where = _where(match["file"], repo)
        if where == "stdlib" and match["name"] in LOOP_FRAMES:
            return EVENT_LOOP
        if where == "stdlib" or (where.startswith("site:") and where[5:].startswith(NEUTRAL_SITE)):
            continue
        for name, prefixes in COMPONENTS:
            if where.startswith(prefixes):
                return name
        return OTHER
    return EVENT_LOOP


def summarize(raw: str, repo: Path = REPO) -> dict[str, float]:
    """Each component's share of the samples in py-spy's raw output (``a;b;c 12`` per line), largest first."""
    counts: dict[str, int] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            name = component_of(stack.split(";"), repo)
            counts[name] = counts.get(name, 0) + int(count)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


class Profiler:
    """py-spy recording one server (all its processes) from :meth:`start` to :meth:`stop`.

    Example::

        profiler = Profiler(Path("/tmp/level.txt")).start(server_pid)
        ...  # the level
        shares = profiler.stop()  # {"LangGraph/langchain_core": 0.38, ...}
    """

    def __init__(self, output: Path) -> None:
        """``output``: where py-spy writes its raw stacks."""
        self.output = output
        self.proc: subprocess.Popen | None = None

    def start(self, pid: int) -> Profiler:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        command = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "200"]
        command += ["--full-filenames", "--format", "raw", "--output", str(self.output)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def stop(self) -> dict[str, float]:
        """Stop sampling (py-spy writes its output on SIGINT) and summarize; {} when py-spy failed (said why)."""
        if self.proc is None:
            return {}
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if not self.output.exists():
            print(f"py-spy wrote no profile: {err.decode(errors='replace').strip()[-500:]}", file=sys.stderr)
            return {}
        return summarize(self.output.read_text())
