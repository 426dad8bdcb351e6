"""Service logs: one line per record, text or JSON, each carrying the message id of the turn it belongs to.

The id travels in a context variable (:data:`MESSAGE_ID`) set where a turn starts (the turn
runner's task, the OpenAI route); asyncio copies context into the tasks a turn spawns, so the
agent's, retriever's and engine client's records all carry it without being passed an id.

    megrez-search serve --log-format json
    {"time": "...", "level": "WARNING", "logger": "agent.citations", "message": "...", "message_id": "4f0c…"}
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Literal, TextIO

MESSAGE_ID: ContextVar[str | None] = ContextVar("message_id", default=None)


class MessageIdFilter(logging.Filter):
    """Adds ``record.message_id`` (``None`` outside a turn)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.message_id = MESSAGE_ID.get()
        return True


def configure(
    fmt: Literal["text", "json"] = "text", *, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Route every logger (uvicorn's too) through one handler in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(MessageIdFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(message_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(message_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
