"""Agent settings (composed into ``api.settings.Settings`` as ``settings.agent``; ``MEGREZ_AGENT__*``).

A request may override any of them for one turn: ``config.model_copy(update={...})`` and pass it
to :func:`agent.run_turn` (the API does this for per-request options).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from engine.protocol import TimeGranularity

SearchMode = Literal["off", "auto", "always"]
"""``off``: plain chat, no tool; ``auto``: the model decides (the vendor's design); ``always``: forced search."""


class AgentConfig(BaseModel):
    mode: SearchMode = Field(default="auto", description="Default search mode: off, auto (the model decides), always.")
    max_rounds: int = Field(
        default=2, ge=1, le=5, description="Searches per turn; the generation after the last one cannot call the tool."
    )
    answer_tokens: int = Field(
        default=768, ge=1, description="Tokens reserved for (and at most generated in) each answer generation."
    )
    min_context_tokens: int = Field(
        default=200,
        ge=0,
        description="Fewer tokens than this left for search contexts: the history is trimmed further to make room.",
    )
    chat_temperature: float = Field(
        default=0.4, ge=0, le=2, description="Sampling temperature without search (mode off); the vendor's 0.4."
    )
    search_temperature: float = Field(
        default=0.01, ge=0, le=2, description="Sampling temperature with the search tool on; the vendor's 0.01."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling for answers.")
    repetition_penalty: float = Field(default=1.0, gt=0, description="vLLM repetition penalty for answers.")
    seed: int | None = Field(default=None, description="Sampling seed for answers (reproducible with temperature > 0).")
    stop: list[str] = Field(default=[], max_length=4, description="Extra stop strings for answers (OpenAI's stop).")
    query_tokens: int = Field(default=64, ge=8, description="Most tokens of a forced search query.")
    related: bool = Field(default=True, description="Suggest follow-up questions after an answer that searched.")
    related_tokens: int = Field(default=160, ge=16, description="Most tokens of the follow-up questions generation.")
    support_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Support score below which a citation is marked unsupported; unset = calibrated default.",
    )
    time_granularity: TimeGranularity = Field(
        default="hour", description="The clock in the system prompt is floored to this (prefix caching, see README)."
    )
