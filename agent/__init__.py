"""The per-turn LangGraph agent: decides when to search and assembles the cited, checked answer.

Where things are: ``graph.py`` (the nodes and their wiring), ``state.py`` (input, output, working
state), ``events.py`` (the event protocol and the structured answer), ``config.py`` (settings),
``context.py`` (dependencies and prompt encoding), ``generation.py`` (one streamed generation),
``sources.py`` (numbering), ``history.py`` (trimming), ``citations.py`` and ``support.py``.
"""

from agent.turn import Agent, TurnStream, run_turn

__all__ = ["Agent", "TurnStream", "run_turn"]
