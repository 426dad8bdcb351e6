"""The engine interface the agent talks to, and its small value types.

Two implementations: :class:`engine.vllm_engine.VLLMEngine` (vLLM embedded in this process) and
:class:`engine.openai_engine.OpenAIEngine` (a remote OpenAI-compatible completions server, normally
``vllm serve``). Both take a *raw* prompt (text or token ids): the Megrez template and its special
tokens are rendered by ``engine.protocol``, never by the server.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

# Megrez ends an assistant turn with <|turn_end|>; <|eos|> and the typo token <|turn_end> (present in the
# real vocabulary, and emitted by the model now and then) must end generation too.
STOP_TOKENS: tuple[str, ...] = ("<|turn_end|>", "<|eos|>", "<|turn_end>")

Prompt = str | Sequence[int]
"""Raw prompt text, or token ids (so text from web pages can never turn into special tokens)."""

MultiModalData = Mapping[str, Any]
"""vLLM's ``multi_modal_data``: ``{"image": PIL.Image | [...], "audio": (array, rate) | [...]}``."""


class EngineError(RuntimeError):
    """Generation failed (the engine is broken, or the server answered with an error)."""


class EngineUnavailable(EngineError):
    """The engine is not running, or the server cannot be reached."""


class ModelNotFound(EngineError):
    """The server does not serve the configured model."""

    def __init__(self, model: str, served: Sequence[str], url: str) -> None:
        self.model = model
        self.served = list(served)
        super().__init__(f"model {model!r} is not served by {url}; served models: {', '.join(self.served) or 'none'}")


class TokenizerLike(Protocol):
    """The slice of a Hugging Face tokenizer the project uses."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...

    def get_vocab(self) -> dict[str, int]: ...


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to sample one completion; mapped to vLLM ``SamplingParams`` or OpenAI request fields.

    ``stop`` / ``stop_token_ids`` are *added* to the engine's Megrez stop tokens (:data:`STOP_TOKENS`).
    """

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    regex: str | None = None  # structured output: the completion must match this regex
    logprobs: bool = False  # report the sampled tokens' log-probabilities
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of a streamed completion.

    Concatenating every delta's ``text`` and ``token_ids`` gives the whole completion (the text never
    contains the stop token or string that ended it; ``token_ids`` keeps a stop *token*).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    stop_reason: str | int | None = None  # the stop string or token id that matched
    prompt_tokens: int | None = None  # every delta, from both engines
    # Completion tokens so far as the remote server counts them (its running ``usage.completion_tokens``); None
    # where nobody counted (vLLM embedded: count ``token_ids``). A server that returns no token ids still says this.
    completion_tokens: int | None = None
    # Prompt tokens served from the prefix cache: every delta (vLLM); the last delta (remote server started
    # with --enable-prompt-tokens-details; None otherwise).
    num_cached_tokens: int | None = None
    logprobs: tuple[float, ...] | None = None  # one per token id, when Sampling.logprobs

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    backend: str
    model: str
    detail: str = ""
    unfinished_requests: int | None = None


def stop_markers(tokenizer: TokenizerLike | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Megrez stop tokens as ``(ids, strings)``: by id where the vocabulary has it as one token.

    Ids are looked up, never assumed; a marker that is not a single token (or any marker, without a
    tokenizer) becomes a stop string instead.
    """
    if tokenizer is None:
        return (), STOP_TOKENS
    vocab = tokenizer.get_vocab()
    ids = tuple(vocab[t] for t in STOP_TOKENS if t in vocab)
    strings = tuple(t for t in STOP_TOKENS if t not in vocab)
    return ids, strings


MEDIA_KINDS = frozenset({"image", "audio"})  # what Megrez-3B-Omni reads besides text


def media_refusal(engine: Engine, kinds: Iterable[str]) -> str | None:
    """Why ``engine``'s model cannot take media of these ``kinds`` (``"image"``, ``"audio"``), or ``None``."""
    if missing := sorted(set(kinds) - engine.media):
        return f"the loaded model ({engine.model}) does not read {' or '.join(missing)}; media need Megrez-3B-Omni"
    return None


class Engine(abc.ABC):
    """A text-generation engine: start it once, stream completions, shut it down.

    Usable as an async context manager (``async with build_engine(cfg) as engine: ...``), which is
    what the app's lifespan does.
    """

    backend: str
    # Whether a failed start may succeed later with nothing changed here (a remote server that is not up
    # yet), so the service keeps retrying it; a failed local load is configuration, and is not retried.
    start_retryable: bool = False

    @property
    @abc.abstractmethod
    def model(self) -> str:
        """The model name (path or hub id for vLLM, the served name for a remote server)."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus completion tokens the model accepts."""

    @property
    @abc.abstractmethod
    def tokenizer(self) -> TokenizerLike | None:
        """The model's tokenizer; ``None`` only for a remote engine without a local copy."""

    @property
    def media(self) -> frozenset[str]:
        """What the model reads besides text (``"image"``, ``"audio"``); empty for a text-only model."""
        return frozenset()

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    def stream(
        self,
        prompt: Prompt,
        sampling: Sampling,
        *,
        request_id: str,
        multimodal: MultiModalData | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream the completion of ``prompt``; the last delta has ``finish_reason`` set.

        Cancelling the consumer, or closing the iterator (``contextlib.aclosing``), aborts the request.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request; its stream ends with ``finish_reason == "abort"``."""

    @abc.abstractmethod
    async def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as ``tokenizer.encode(text, add_special_tokens=False)`` gives them
        (special-token strings in ``text`` become their ids: use it to look a special token up)."""

    async def count_tokens(self, text: str) -> int:
        """Tokens in ``text``, counted as :meth:`tokenize` does."""
        return len(await self.tokenize(text))

    @abc.abstractmethod
    async def health(self) -> Health: ...

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()
