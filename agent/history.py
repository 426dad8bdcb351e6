"""Earlier turns as prompt messages, trimmed to the tokens left for them.

A stored turn (:class:`agent.events.TurnRecord`) comes back *in full* — the user question, then the
model's own messages exactly as it wrote them (tool calls included) and the observations it saw — or
*collapsed* to the question and the final answer. Observations are by far the largest part of a
turn (up to the whole passage budget), and a later question rarely needs last turn's pages, while it
often needs what was asked and answered ("who founded it?" → which company). So trimming goes:

1. collapse turns, oldest first, until the history fits (a collapsed answer loses its
   ``[citation:N]`` markers, since the contexts they point at are gone);
2. then drop whole turns, oldest first.

The newest user turn is not part of the history and is never cut; if it cannot fit alone the turn
is refused before anything is sent (``agent/graph.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from agent.citations import strip_citations
from agent.events import TurnRecord
from engine.protocol import Message


def full_messages(record: TurnRecord) -> list[Message]:
    """The turn as the model saw it: question, its own messages (calls kept), observations."""
    return [Message("user", record.question)] + [
        Message(m.role, m.content, m.function_call if m.role == "assistant" else None) for m in record.transcript
    ]


def collapsed_messages(record: TurnRecord) -> list[Message]:
    """Question and final answer only (the model's own last words, markers removed)."""
    final = next(
        (m.content for m in reversed(record.transcript) if m.role == "assistant" and m.function_call is None),
        record.answer.answer,
    )
    return [Message("user", record.question), Message("assistant", strip_citations(final).strip())]


@dataclass(frozen=True, slots=True)
class TrimmedHistory:
    messages: list[Message]
    collapsed: int  # turns shown without their searches
    dropped: int  # oldest turns left out entirely


async def trim_history(
    records: Sequence[TurnRecord], budget: int, count: Callable[[Sequence[Message]], Awaitable[int]]
) -> TrimmedHistory:
    """The most of ``records`` that fits in ``budget`` tokens, by the rules in the module docstring.

    ``count`` gives the tokens of a list of rendered messages (the engine's tokenizer).
    """
    full = [full_messages(r) for r in records]
    short = [collapsed_messages(r) for r in records]
    sizes = [await count(m) for m in full]
    short_sizes = [await count(m) for m in short]
    chosen = list(full)
    total = sum(sizes)
    for i in range(len(records)):
        if total <= budget:
            break
        if short_sizes[i] < sizes[i]:
            chosen[i] = short[i]
            total += short_sizes[i] - sizes[i]
            sizes[i] = short_sizes[i]
    dropped = 0
    while total > budget and dropped < len(records):
        total -= sizes[dropped]
        dropped += 1
    collapsed = sum(1 for i in range(dropped, len(records)) if chosen[i] is short[i])
    return TrimmedHistory([m for turn in chosen[dropped:] for m in turn], collapsed, dropped)
