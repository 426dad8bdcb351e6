"""A turn's events as the Responses API's: typed stream events, and the ``response`` object they build.

:class:`ResponseWriter` is fed the agent's events in order and returns, for each, the Responses events it
makes (``type`` and ``sequence_number`` on each, as the ``openai`` package's types declare them); its
``response`` is the object built so far. The streaming route sends the events; the non-streaming one feeds
the same writer and answers with ``response``, so both give the same ``output``.

Items, in the order the turn makes them:

- a search (``query`` event) opens a ``web_search_call`` (``response.output_item.added``,
  ``response.web_search_call.in_progress``, ``…searching``); its results (``sources``) complete it, with the
  query and the sources' URLs in its ``action`` (``…completed``, ``response.output_item.done``). A search
  that brought no results back before the turn went on (retrieval failed) ends ``failed``.
- text (``token`` events) goes into a ``message`` item: ``response.output_item.added``,
  ``response.content_part.added`` (an ``output_text``), then ``response.output_text.delta`` per event.
- text the model wrote before deciding to search (``preamble``) ends its message there, marked ``phase:
  "commentary"``; the answer's message follows the search, ``phase: "final_answer"``.
- the ``answer`` event ends the answer's message: one ``response.output_text.annotation.added`` per ``[n]``
  marker (``url_citation``: indices into that message's text, URL, title), ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done``, then ``response.completed`` with ``usage``
  (the only place it comes).
- an ``error`` event ends the response: an ``error`` event (the service's code, e.g. ``engine_unavailable``,
  and its message), then ``response.failed`` (``error.code`` one of OpenAI's: ``invalid_prompt`` for what the
  request asked, ``server_error`` otherwise); items still open stay ``incomplete``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from agent.events import Answer, AnswerEvent, ErrorEvent, Event, PreambleEvent, QueryEvent, SourcesEvent, TokenEvent
from api.memory import new_id
from api.openai_compat import annotations, error_of


class ResponseWriter:
    """Agent events → Responses API events, and the ``response`` they build.

    Example::

        writer = ResponseWriter("resp_1", "megrez-search", {"tools": [], "tool_choice": "auto"})
        frames = writer.start()  # response.created, response.in_progress
        async for event in turn:
            frames += writer.feed(event)
        writer.response["status"]  # "completed" (or "failed")
    """

    def __init__(self, response_id: str, model: str, echo: dict[str, Any]) -> None:
        """``echo``: the request's fields the response repeats (``tools``, ``tool_choice``, ``temperature``, …)."""
        self.sequence = 0
        self.response: dict[str, Any] = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "model": model,
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "store": False,  # nothing is stored
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": None,
            "user": None,
        } | echo
        self._message: dict[str, Any] | None = None  # the open message item
        self._search: dict[str, Any] | None = None  # the open web_search_call item
        self._round = 0

    def start(self) -> list[dict]:
        """The first events: the response created and in progress."""
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def feed(self, event: Event) -> list[dict]:
        """The Responses events for one agent event (none for most: status lines, pages, citations)."""
        out: list[dict] = []
        if isinstance(event, QueryEvent):
            out += self._end_search("failed")
            out += self._open_search(event)
        elif isinstance(event, SourcesEvent) and self._search is not None and event.round == self._round:
            self._search["action"]["sources"] = [{"type": "url", "url": s.url} for s in event.sources]
            out += self._end_search("failed" if not event.sources and event.failures else "completed")
        elif isinstance(event, TokenEvent) and event.text:
            out += self._end_search("failed")
            if self._message is None:
                out += self._open_message()
            self._message["content"][0]["text"] += event.text
            out.append(self._event("response.output_text.delta", **self._where(), delta=event.text, logprobs=[]))
        elif isinstance(event, PreambleEvent) and self._message is not None:
            out += self._end_message("commentary", [])
        elif isinstance(event, AnswerEvent):
            out += self._end_search("failed")
            out += self._complete(event.answer)
        elif isinstance(event, ErrorEvent):
            out += self._fail(event)
        return out

    def _event(self, type_: str, **fields: Any) -> dict:
        event = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _snapshot(self) -> dict:
        return copy.deepcopy(self.response)

    def _index(self, item: dict) -> int:
        return next(i for i, added in enumerate(self.response["output"]) if added is item)

    def _add(self, item: dict) -> list[dict]:
        self.response["output"].append(item)
        return [self._event("response.output_item.added", output_index=self._index(item), item=copy.deepcopy(item))]

    def _done(self, item: dict) -> dict:
        return self._event("response.output_item.done", output_index=self._index(item), item=copy.deepcopy(item))

    def _open_search(self, event: QueryEvent) -> list[dict]:
        self._round = event.round
        action = {"type": "search", "query": event.query, "queries": [event.query], "sources": []}
        self._search = {"id": f"ws_{new_id()}", "type": "web_search_call", "status": "in_progress", "action": action}
        out = self._add(self._search)
        where = {"output_index": self._index(self._search), "item_id": self._search["id"]}
        out.append(self._event("response.web_search_call.in_progress", **where))
        out.append(self._event("response.web_search_call.searching", **where))
        return out

    def _end_search(self, status: str) -> list[dict]:
        """Close the open search, if any: ``completed`` with its results, else ``status``."""
        item, self._search = self._search, None
        if item is None:
            return []
        item["status"] = status
        out = []
        if status == "completed":
            where = {"output_index": self._index(item), "item_id": item["id"]}
            out.append(self._event("response.web_search_call.completed", **where))
        return [*out, self._done(item)]

    def _open_message(self) -> list[dict]:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._message = {
            "id": f"msg_{new_id()}",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [part],
        }
        out = self._add(self._message)
        out.append(self._event("response.content_part.added", **self._where(), part=copy.deepcopy(part)))
        return out

    def _where(self) -> dict:
        item = self._message
        return {"item_id": item["id"], "output_index": self._index(item), "content_index": 0}

    def _end_message(self, phase: str, marks: list[dict]) -> list[dict]:
        """Close the open message: its annotations, its text, its part, the item (``phase``: its role in the
        answer, ``commentary`` or ``final_answer``)."""
        item, where = self._message, self._where()
        part = item["content"][0]
        out = []
        for i, mark in enumerate(marks):
            part["annotations"].append(mark)
            out.append(
                self._event("response.output_text.annotation.added", **where, annotation_index=i, annotation=mark)
            )
        out.append(self._event("response.output_text.done", **where, text=part["text"], logprobs=[]))
        out.append(self._event("response.content_part.done", **where, part=copy.deepcopy(part)))
        item["status"], item["phase"] = "completed", phase
        out.append(self._done(item))
        self._message = None
        return out

    def _complete(self, answer: Answer) -> list[dict]:
        out = self._open_message() if self._message is None else []
        text = self._message["content"][0]["text"]
        # The indices point into this message's text: what was streamed since the last preamble.
        marks = [{"type": "url_citation", **mark["url_citation"]} for mark in annotations(text, answer)]
        out += self._end_message("final_answer", marks)
        usage = answer.usage
        self.response |= {
            "status": "completed",
            "completed_at": int(time.time()),
            "usage": {
                "input_tokens": usage.prompt_tokens,
                # Nothing is written to a cache a client could address: no cache writes to report.
                "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            },
        }
        return [*out, self._event("response.completed", response=self._snapshot())]

    def _fail(self, event: ErrorEvent) -> list[dict]:
        for item in (self._search, self._message):
            if item is not None:
                item["status"] = "incomplete"
        self._search = self._message = None
        code = "invalid_prompt" if error_of(event).status < 500 else "server_error"
        self.response |= {"status": "failed", "error": {"code": code, "message": event.message}}
        error = self._event("error", code=event.code, message=event.message, param=None)
        return [error, self._event("response.failed", response=self._snapshot())]
