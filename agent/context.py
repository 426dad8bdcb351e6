"""What a turn's nodes depend on, handed in through LangGraph's runtime context (no globals).

:class:`TurnContext` carries the engine, the retriever, the support checker, the agent config, the
prompt codec and ``emit`` — where the nodes send the turn's events (``agent/turn.py``) — for one turn. :class:`PromptCodec` is the one place that turns messages into what
the engine takes and counts their tokens:

* with the engine's tokenizer (embedded vLLM, or a remote server whose tokenizer is on this
  machine): token ids from :class:`engine.protocol.PromptEncoder`, so page and user text can never
  become special tokens; tokens are counted on those ids, exactly;
* without it (a remote server and no local tokenizer): the prompt goes as text with every special
  token spelling in the text defanged (:func:`engine.protocol.defang_special_tokens`), and tokens are
  counted by the server (``/tokenize``), one round trip per message, cached for the turn.

The function-call token ids (the last generation bans ``<|function_start|>`` by id) are looked up by
tokenizing the marker's text: locally, or through the server's ``/tokenize``. vLLM's encodes with the
model's Hugging Face tokenizer, which matches *added* tokens in text, so the marker comes back as its
one id when the server's tokenizer has it as an added token (checked against vLLM's own app in
``tests/test_engine_openai.py``); otherwise (a vocabulary entry only, or a server that is not vLLM) the
id is ``None`` and the graph's fallback keeps the turn answering (``agent/graph.py``, ``generate``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from agent.config import AgentConfig
from agent.events import Event
from agent.support import SupportChecker
from engine.base import Engine, Prompt
from engine.protocol import FUNCTION_END, FUNCTION_START, Message, PromptEncoder, render_prompt
from retrieval.pipeline import Retriever
from retrieval.tokenize import estimate_tokens

_CACHE_SIZE = 4096
Sink = Callable[[Event], None]  # takes one event of a turn; must not block (it runs inside the node)


class PromptCodec:
    """Messages → engine prompt (token ids or defanged text), and their token counts.

    Example::

        codec = await PromptCodec.for_engine(engine)
        prompt = codec.prompt([Message("system", "…"), Message("user", "Hi")])
        n = await codec.count([Message("user", "Hi")])
    """

    def __init__(
        self,
        engine: Engine,
        *,
        function_start_id: int | None,
        function_end_id: int | None,
        generation_prompt_tokens: int,
    ) -> None:
        self.engine = engine
        tokenizer = engine.tokenizer
        self.encoder = PromptEncoder(tokenizer) if tokenizer is not None else None  # type: ignore[arg-type]
        self.function_start_id = function_start_id
        self.function_end_id = function_end_id
        self.generation_prompt_tokens = generation_prompt_tokens  # <|role_start|>assistant<|role_end|>
        self._counts: dict[Message, int] = {}  # remote servers count for us
        self._ids: dict[Message, list[int]] = {}
        self._count_text: Callable[[str], int] | None = None

    @classmethod
    async def for_engine(cls, engine: Engine) -> PromptCodec:
        """Look up the function-call token ids and the generation prompt's size (through the server when
        there is no local tokenizer)."""

        async def single_id(token: str) -> int | None:
            ids = await engine.tokenize(token)
            return ids[0] if len(ids) == 1 else None

        return cls(
            engine,
            function_start_id=await single_id(FUNCTION_START),
            function_end_id=await single_id(FUNCTION_END),
            generation_prompt_tokens=len(await engine.tokenize(render_prompt([]))),
        )

    def prompt(self, messages: Sequence[Message], *, force_search: bool = False) -> Prompt:
        """The prompt for ``messages`` with the generation prompt (prefilled with a call when forced)."""
        if self.encoder is None:
            return render_prompt(messages, force_search=force_search, defang=True)
        # Messages encode independently (every segment is encoded on its own), so the prompt is the
        # join of cached per-message ids: each generation of a turn encodes only its new messages.
        ids: list[int] = []
        for message in messages:
            ids += self._message_ids(message)
        return ids + self.encoder.encode([], force_search=force_search)

    def _message_ids(self, message: Message) -> list[int]:
        assert self.encoder is not None
        ids = self._ids.get(message)
        if ids is None:
            if len(self._ids) >= _CACHE_SIZE:  # one codec serves many turns: keep the cache bounded
                self._ids.clear()
            ids = self._ids[message] = self.encoder.encode([message], add_generation_prompt=False)
        return ids

    async def count_message(self, message: Message) -> int:
        """Tokens of one rendered message (role markers included); cached per message value."""
        if self.encoder is not None:
            return len(self._message_ids(message))
        if message not in self._counts:
            if len(self._counts) >= _CACHE_SIZE:
                self._counts.clear()
            self._counts[message] = await self.engine.count_tokens(
                render_prompt([message], add_generation_prompt=False, defang=True)
            )
        return self._counts[message]

    async def count(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> int:
        """Tokens of ``messages`` rendered together (the sum of the messages: segments encode apart)."""
        total = 0
        for message in messages:
            total += await self.count_message(message)
        return total + (self.generation_prompt_tokens if add_generation_prompt else 0)

    def count_text(self) -> Callable[[str], int]:
        """A synchronous counter for passage packing: the tokenizer's, else the estimate (errs high)."""
        if self.encoder is None:
            return estimate_tokens
        if self._count_text is None:
            # Memoised: selection counts the same strings more than once (words of long sentences,
            # passages again when packing, the per-context overhead), on every sentence of every page.
            self._count_text = functools.lru_cache(maxsize=_CACHE_SIZE)(self.encoder.count_text)
        return self._count_text


@dataclass(slots=True)
class TurnContext:
    """Run-scoped dependencies of one turn (LangGraph ``context=``)."""

    engine: Engine
    retriever: Retriever
    codec: PromptCodec
    config: AgentConfig
    support: SupportChecker
    request_id: str  # prefix of this turn's engine request ids
    emit: Sink  # the turn's events, in order, straight to whoever runs the turn
    clock: Callable[[], datetime] = datetime.now
    started: float = field(default_factory=time.monotonic)  # when the turn began
    _requests: int = field(default=0, init=False)

    def next_request_id(self, purpose: str) -> str:
        self._requests += 1
        return f"{self.request_id}-{self._requests}-{purpose}"

    def elapsed_ms(self) -> float:
        """Milliseconds since the turn began."""
        return round((time.monotonic() - self.started) * 1000, 1)
