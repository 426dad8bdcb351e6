"""A scripted stand-in for the model engine (tests and benchmarks only, never the product).

It replays Megrez-style outputs — raw text with the special tokens a real engine would stream with
``skip_special_tokens=False`` — one script entry per generation, in small chunks, optionally at a
fixed rate. Every request is recorded (prompt ids, the decoded prompt text, sampling, media), so tests
can assert on exactly what the agent sent. It behaves like the real engines where the agent relies
on it: output stops at the first Megrez stop token (which is not part of the text), ``max_tokens``
cuts with ``finish_reason="length"``, a banned ``<|function_start|>`` (``logit_bias``) cannot be
emitted, closing the stream early counts as an abort.

It uses the tiny Megrez tokenizer (``scripts/megrez_tokenizer.py``), so prompts are real token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.base import MEDIA_KINDS, STOP_TOKENS, Delta, Engine, EngineError, Health, MultiModalData, Prompt, Sampling
from engine.protocol import FUNCTION_END, FUNCTION_START

Script = str | Exception | Callable[["Request"], str]


@dataclass
class Request:
    prompt: Prompt
    text: str  # the prompt decoded (special tokens visible)
    sampling: Sampling
    request_id: str
    multimodal: MultiModalData | None
    output: str = ""
    closed_early: bool = False


@dataclass
class ScriptedEngine(Engine):
    """Replays ``script`` (one entry per generation: text, an exception to raise, or a function of the
    request); past its end it answers ``default``."""

    tokenizer_dir: Path
    script: list[Script] = field(default_factory=list)
    default: str = "OK.<|turn_end|>"
    max_len: int = 4096
    chunk_chars: int = 3
    delay_s: float = 0.0  # per chunk: a fixed streaming rate (a consumer behind it gets merged deltas)
    media: frozenset[str] = MEDIA_KINDS  # what it claims to read besides text (as Megrez-3B-Omni does)
    requests: list[Request] = field(default_factory=list)
    backend = "scripted"

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self._vocab = self._tokenizer.get_vocab()

    @property
    def model(self) -> str:
        return "scripted"

    @property
    def max_model_len(self) -> int:
        return self.max_len

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def abort(self, request_id: str) -> None:
        pass

    async def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    async def health(self) -> Health:
        return Health(ok=True, backend=self.backend, model=self.model)

    def _output(self, request: Request) -> str:
        entry = self.script.pop(0) if self.script else self.default
        if isinstance(entry, Exception):
            raise entry
        text = entry(request) if callable(entry) else entry
        banned = self._vocab.get(FUNCTION_START)
        if banned is not None and request.sampling.logit_bias.get(banned, 0) <= -100 and FUNCTION_START in text:
            # The model cannot emit the token: it writes what came before and what follows the call.
            before, _, rest = text.partition(FUNCTION_START)
            text = before + rest.partition(FUNCTION_END)[2]
        return text

    def messages(self, request: Request) -> list[tuple[str, str]]:
        """``(role, content)`` of each message in a token-id prompt, split on the *real* chat tokens
        (text that merely spells ``<|turn_end|>`` stays inside its message)."""
        ids = list(request.prompt) if not isinstance(request.prompt, str) else self._tokenizer.encode(request.prompt)
        start, end, turn_end = (self._vocab[t] for t in ("<|role_start|>", "<|role_end|>", "<|turn_end|>"))
        out: list[tuple[str, str]] = []
        i = 0
        while start in ids[i:]:
            i = ids.index(start, i) + 1
            j = ids.index(end, i)
            k = ids.index(turn_end, j) if turn_end in ids[j:] else len(ids)
            out.append(
                (self._tokenizer.decode(ids[i:j]), self._tokenizer.decode(ids[j + 1 : k], skip_special_tokens=False))
            )
            i = k
        return out

    async def stream(
        self, prompt: Prompt, sampling: Sampling, *, request_id: str, multimodal: MultiModalData | None = None
    ) -> AsyncIterator[Delta]:
        ids = self._tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        if len(ids) + sampling.max_tokens > self.max_len:
            raise EngineError(f"prompt of {len(ids)} tokens + {sampling.max_tokens} exceeds {self.max_len}")
        request = Request(
            prompt, self._tokenizer.decode(ids, skip_special_tokens=False), sampling, request_id, multimodal
        )
        self.requests.append(request)
        text = self._output(request)
        finish = "length"
        stops = [t for t in (*STOP_TOKENS, *sampling.stop) if t in text]
        if sampling.stop_token_ids and FUNCTION_END in text:
            stops.append(FUNCTION_END)
        if stops:
            text = text[: min(text.index(t) for t in stops)]
            finish = "stop"
        out_ids = self._tokenizer.encode(text, add_special_tokens=False)
        if len(out_ids) > sampling.max_tokens:
            text = self._tokenizer.decode(out_ids[: sampling.max_tokens], skip_special_tokens=False)
            finish = "length"
        pieces = [text[i : i + self.chunk_chars] for i in range(0, len(text), self.chunk_chars)] or [""]
        # Token ids spread over the pieces (the count is what matters: usage).
        per_piece = max(1, len(out_ids) // len(pieces))
        counts = [per_piece] * (len(pieces) - 1) + [max(0, len(out_ids) - per_piece * (len(pieces) - 1))]
        done = False
        began = asyncio.get_running_loop().time()
        try:
            i = 0
            while i < len(pieces):
                # Piece i is "generated" at began + (i+1)·delay, whether or not the consumer keeps up; like
                # vLLM's output collector, a consumer that fell behind gets everything due in one delta.
                due = i + 1
                if self.delay_s:
                    wait = began + (i + 1) * self.delay_s - asyncio.get_running_loop().time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    now = asyncio.get_running_loop().time()
                    due = max(i + 1, min(len(pieces), int((now - began) / self.delay_s + 1e-9)))
                piece, count = "".join(pieces[i:due]), sum(counts[i:due])
                i = due
                request.output += piece
                last = i == len(pieces)
                yield Delta(
                    text=piece,
                    token_ids=tuple(out_ids[:1]) * count,
                    finish_reason=finish if last else None,
                    prompt_tokens=len(ids),
                    num_cached_tokens=0,
                )
            done = True
        finally:
            request.closed_early = not done


def contexts_of(prompt_text: str) -> Sequence[str]:
    """The ``[[citation:N]]`` numbers of a prompt, in order (for numbering assertions)."""
    import re

    return re.findall(r"\[\[citation:(\d+)\]\]", prompt_text)
