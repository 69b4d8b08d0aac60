"""What an inference engine is to the rest of p2pnode (docs/architecture.md#inference-engines).

Engines know nothing of the network. A provider holds one or more, reads
:meth:`Engine.models` for what to announce, and streams a request with::

    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            ...

Leaving the ``async with`` early (the consumer hung up, a timeout, a
cancellation) stops generation: the engine promises to stop within one token
and to free the slot before ``stream`` returns.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

import trio

from p2pnode.errors import EngineError
from p2pnode.protocols.infer import messages as wire
from p2pnode.protocols.infer.messages import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

PENALTIES: Final = "penalties"
"""Feature: ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` are honoured."""
GRAMMAR: Final = "grammar"
"""Feature: answers constrained to a :class:`Format` (JSON, a JSON schema, tool calls)."""
EMBEDDINGS: Final = "embeddings"
"""Feature: the model embeds texts (and does nothing else: an embedding engine)."""
LOGPROBS: Final = "logprobs"
"""Feature: each token's log-probability and its alternatives (OpenAI's ``logprobs``)."""
FEATURES: Final = frozenset({PENALTIES, GRAMMAR, LOGPROBS, EMBEDDINGS})
"""Every feature this version knows; a peer's others are ignored."""
FIELDS_OF: Final = {
    PENALTIES: "presence_penalty, frequency_penalty and logit_bias",
    GRAMMAR: "response_format and tools",
    LOGPROBS: "logprobs and top_logprobs",
    EMBEDDINGS: "embeddings",
}
"""The request fields each feature stands for, as a user would name them."""


def fields_of(features: frozenset[str]) -> str:
    """The request fields ``features`` stand for, as a user would name them."""
    return "; ".join(FIELDS_OF.get(f, f) for f in sorted(features))


def info_of(engine: Engine, model_id: str) -> ModelInfo | None:
    """What ``engine`` says of ``model_id``, if it serves it."""
    return next((m for m in engine.models() if m.model_id == model_id), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelInfo:
    """A model an engine serves."""

    model_id: str
    gguf_sha256: str | None = None  # None where there is no file (an upstream server)
    context_length: int = 0
    # Sampling recommended for this model when a request does not say (its
    # authors', or the operator's); None: no recommendation. A 135M model at
    # OpenAI's default temperature of 1 answers with word salad.
    temperature: float | None = None
    top_p: float | None = None
    # What the engine does beyond plain sampling (FEATURES): announced in the
    # offer, so that a request needing one goes only to providers that can.
    features: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    role: str
    content: str


JSON_OBJECT: Final = "json_object"
"""Format kind: any JSON object."""
JSON_SCHEMA: Final = "json_schema"
"""Format kind: JSON valid for ``Format.schema``."""
TOOLS: Final = "tools"
"""Format kind: tool calls (``inference/tools.py`` says how they read)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool:
    """A function the model may call: its name and its arguments' JSON schema (as JSON text)."""

    name: str
    parameters: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Format:
    """The shape an answer must have; generation is held to it by a grammar
    (``inference/grammar.py``), and so is an audit's scoring."""

    kind: str  # JSON_OBJECT, JSON_SCHEMA or TOOLS
    schema: str = ""  # JSON_SCHEMA: the schema, as JSON text
    tools: tuple[Tool, ...] = ()
    # TOOLS: "required" (one call at least), "auto" (calls or prose), or the
    # name of the one tool to call.
    tool_choice: str = "required"
    parallel: bool = True  # TOOLS: several calls in one answer


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """Sampling parameters (OpenAI names and meanings); defaults as on the wire."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    format: Format | None = None
    # Logprobs to show: None for none, else how many alternatives at each position.
    top_logprobs: int | None = None

    def needs(self) -> frozenset[str]:
        """The features (:data:`FEATURES`) a provider must have to honour these."""
        needed = set()
        if self.presence_penalty or self.frequency_penalty or self.logit_bias:
            needed.add(PENALTIES)
        if self.format is not None:
            needed.add(GRAMMAR)
        if self.top_logprobs is not None:
            needed.add(LOGPROBS)
        return frozenset(needed)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One generation: a chat (``messages``) or a completion (``prompt``); or
    the embeddings of ``inputs`` (kind "embedding")."""

    model_id: str
    kind: Literal["chat", "completion", "embedding"]
    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""
    params: Params = field(default_factory=Params)
    # Text the answer already starts with: generation continues after it, as
    # if the model had produced it (docs/architecture.md#failover). Never repeated
    # in the output; it does not count as completion tokens.
    continuation: str = ""
    # Its token ids as generated, if known: an engine of the same vocabulary
    # continues from them when they spell ``continuation`` exactly.
    continuation_ids: tuple[int, ...] = ()
    inputs: tuple[str, ...] = ()
    dimensions: int = 0  # embeddings: the vector length wanted (0: the model's)

    def needs(self) -> frozenset[str]:
        """The features a provider must have to serve this request."""
        if self.kind == "embedding":
            return frozenset({EMBEDDINGS})
        return self.params.needs()


class Embedder(Protocol):
    """An engine that embeds texts (its models list the EMBEDDINGS feature)."""

    async def embed(self, request: Request) -> tuple[list[bytes], int]:
        """One vector per input (float32, little-endian, L2-normalised) and the
        tokens the inputs took. Raises BadRequestError for a request it cannot
        serve (dimensions above the model's, an input past its context)."""
        ...


def from_wire(request: wire.Request, model_id: str | None = None) -> Request:
    """The engine request an infer request stands for (``model_id``: under another
    name, e.g. an auditor's own for the same weights)."""
    # A score request is scored as the answer to a request of its score_kind.
    asked = request.score_kind if request.kind == wire.SCORE else request.kind
    kind: Literal["chat", "completion", "embedding"] = "completion"
    if asked == "chat":
        kind = "chat"
    elif asked == wire.EMBED:
        kind = "embedding"
    return Request(
        model_id=model_id or request.model_id,
        kind=kind,
        messages=tuple(ChatMessage(role=t.role, content=t.content) for t in request.messages),
        prompt=request.prompt,
        params=Params(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=tuple((b.token, b.bias) for b in request.logit_bias),
            format=format_from_wire(request.format),
            top_logprobs=None if request.top_logprobs < 0 else request.top_logprobs,
        ),
        continuation=request.continuation,
        continuation_ids=request.continuation_ids,
        inputs=request.inputs,
        dimensions=request.dimensions,
    )


def format_from_wire(f: wire.Format | None) -> Format | None:
    """The engine's :class:`Format` for a request's wire one."""
    if f is None:
        return None
    tools = tuple(Tool(name=t.name, parameters=t.parameters) for t in f.tools)
    return Format(
        kind=f.kind, schema=f.schema, tools=tools, tool_choice=f.tool_choice, parallel=f.parallel
    )


def format_to_wire(f: Format | None) -> wire.Format | None:
    """The wire form of ``f``."""
    if f is None:
        return None
    tools = tuple(wire.Tool(name=t.name, parameters=t.parameters) for t in f.tools)
    return wire.Format(
        kind=f.kind, schema=f.schema, tools=tools, tool_choice=f.tool_choice, parallel=f.parallel
    )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token as OpenAI's ``logprobs`` show it: its bytes, the model's
    log-probability of it (natural log), and the most probable alternatives."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


def entries_to_wire(entries: tuple[TokenLogprob, ...]) -> tuple[wire.TokenLogprob, ...]:
    """``entries`` as a chunk carries them (thousandths of a nat)."""
    return tuple(
        wire.TokenLogprob(
            piece=e.piece,
            logprob=round(e.logprob * 1000),
            top=tuple(wire.Alternative(piece=p, logprob=round(lp * 1000)) for p, lp in e.top),
        )
        for e in entries
    )


def entries_from_wire(entries: tuple[wire.TokenLogprob, ...]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(e.piece, e.logprob / 1000, tuple((a.piece, a.logprob / 1000) for a in e.top))
        for e in entries
    )


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Generated text; the last chunk of a stream carries ``finish_reason`` and ``usage``.

    An engine that runs the model itself also says which tokens it generated
    and the model's log-probability of each (natural log, the raw
    distribution: ``inference/sampling.py``): what a provider commits to and
    an audit checks (docs/architecture.md#audits). Tokens whose text is held
    back (a partial character, a possible stop string) come with a later
    chunk's text, or with the last chunk.
    """

    text: str
    tokens: int = 0  # tokens this text took
    finish_reason: str | None = None  # "stop", "length" or "cancelled", on the last chunk
    usage: Usage | None = None
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    # Asked for (Params.top_logprobs): one per token of this chunk's text.
    logprob_tokens: tuple[TokenLogprob, ...] = ()


class EngineBusy(EngineError):  # noqa: N818 - a refusal, reported to callers as such
    """Every slot is taken and the queue is full: try another provider or later."""


class Engine(Protocol):
    """Anything that can stream completions for the models it lists."""

    def models(self) -> list[ModelInfo]:
        """The models this engine serves."""
        ...

    @property
    def slots_total(self) -> int:
        """Requests it can run at once."""
        ...

    @property
    def slots_free(self) -> int:
        """Slots idle right now."""
        ...

    @property
    def queue_len(self) -> int:
        """Requests waiting for a slot."""
        ...

    def stream(
        self, request: Request
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[Chunk]]:
        """Generate ``request``; see the module docstring for cancellation."""
        ...


async def collect(engine: Engine, request: Request) -> tuple[str, Chunk]:
    """Run a request to the end; returns the whole text and the final chunk."""
    parts: list[str] = []
    last = Chunk("")
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            parts.append(chunk.text)
            last = chunk
    return "".join(parts), last


async def tokens_per_second(engine: Engine, request: Request) -> float:
    """Generation speed of ``request``: tokens after the first over the time they took.

    Leaves out the prompt (time to first token), which is what offers and
    benchmarks compare.
    """
    first_at = last_at = 0.0
    tokens = 0
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            if chunk.tokens:
                last_at = trio.current_time()
                if tokens == 0:
                    first_at = last_at
                tokens += chunk.tokens
    if tokens < 2 or last_at <= first_at:
        return 0.0
    return round((tokens - 1) / (last_at - first_at), 1)
