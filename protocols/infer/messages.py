"""Messages of the inference stream (docs/protocols.md#inference-stream).

A stream opens with ``InferOpen`` in the clear (which session, which stream:
the provider needs them to find the keys); every later frame's body is a
``Sealer`` ciphertext of one of the sealed messages below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

from p2pnode.protocols.wire import Codec, Error, Message, added, signing_payload

RECEIPT_DOMAIN: Final = b"p2pnode/receipt/1:"
REQUEST_DOMAIN: Final = b"p2pnode/request/1:"

PAUSED: Final = "paused"
"""Done's finish reason when a paid provider stops an answer to have it acknowledged:
the consumer acknowledges it and asks for the rest in a new request (continuation)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class InferOpen(Message):
    """C→P, in the clear: the session and the (new, unique) stream id within it."""

    TYPE: ClassVar[str] = "infer.open"
    session_id: bytes
    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn(Message):
    """One chat message (nested in Request)."""

    role: str
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Bias(Message):
    """One entry of a request's ``logit_bias`` (nested in Request)."""

    token: int
    bias: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Tool(Message):
    """A function the answer may call (nested in Format)."""

    name: str
    parameters: str  # its arguments' JSON schema, as JSON text


@dataclass(frozen=True, slots=True, kw_only=True)
class Format(Message):
    """The shape the answer must have (nested in Request; docs/protocols.md#output-formats)."""

    kind: str  # "json_object", "json_schema" or "tools"
    schema: str = ""
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "required"
    parallel: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Alternative(Message):
    """A token the model could have drawn instead (nested in TokenLogprob)."""

    piece: bytes  # its bytes
    logprob: int  # the model's log-probability of it, in thousandths of a nat


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenLogprob(Message):
    """A generated token as OpenAI's ``logprobs`` show it (nested in Chunk)."""

    piece: bytes
    logprob: int  # thousandths of a nat, as commitments count them
    top: tuple[Alternative, ...] = ()  # the most probable at its position, best first


MAX_TOP_LOGPROBS: Final = 20
"""The most alternatives a request may ask for at each position (OpenAI's bound)."""
MAX_PIECE: Final = 256
"""The longest token piece, in bytes, a chunk may carry."""

MAX_BIASES: Final = 300
"""The most logit_bias entries one request may carry (OpenAI's own bound)."""
MAX_BIAS: Final = 100.0
MAX_PENALTY: Final = 2.0


# Sampling when a request does not say: the one home of these figures, for
# the wire and for the engines (``inference/engine.py:Params``). The OpenAI
# shim keeps OpenAI's own documented defaults instead.
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


@dataclass(frozen=True, slots=True, kw_only=True)
class Request(Message):
    """C→P, sealed: what to generate (OpenAI parameter names and meanings)."""

    TYPE: ClassVar[str] = "infer.request"
    request_id: str
    model_id: str
    kind: str  # "chat", "completion", or SCORE
    messages: tuple[Turn, ...] = ()
    prompt: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Failover: the answer so far, which the provider continues (never repeats).
    continuation: str = ""
    # A score request (kind SCORE, docs/protocols.md#score-requests): the
    # answer's token ids to score as the model's answer to the rest of this
    # request, whose kind ("chat" or "completion") is ``score_kind``.
    score_ids: tuple[int, ...] = added(())
    score_kind: str = added("")
    # OpenAI's penalties and logit_bias (token ids of the model's vocabulary):
    # only providers whose offer lists the "penalties" feature are sent them.
    presence_penalty: float = added(0.0)
    frequency_penalty: float = added(0.0)
    logit_bias: tuple[Bias, ...] = added(())
    # An answer held to a shape: only providers whose offer lists the
    # "grammar" feature are sent one.
    format: Format | None = added(None)
    # OpenAI's logprobs: -1 for none, else how many alternatives to show at
    # each position (0 to MAX_TOP_LOGPROBS); only providers whose offer lists
    # the "logprobs" feature are sent it.
    top_logprobs: int = added(-1)
    # An embedding request (kind EMBED): the texts to embed, and the vector
    # length wanted (0: the model's own).
    inputs: tuple[str, ...] = added(())
    dimensions: int = added(0)
    # Failover: the token ids of ``continuation`` as the earlier providers
    # streamed them (their chunks' ids), or none. Text does not always
    # tokenize back into the tokens that produced it ("\n\n" from two "\n"),
    # and greedy output continued from other tokens can differ; a provider
    # of the same vocabulary uses the ids when they spell the continuation
    # exactly (docs/protocols.md#failover-continuation).
    continuation_ids: tuple[int, ...] = added(())


EMBED: Final = "embed"
"""Request kind of embeddings: one vector per input, in the Done (docs/protocols.md#embeddings)."""
MAX_EMBED_INPUTS: Final = 32
"""The most inputs one embedding request may carry (the shim splits larger ones)."""
MAX_REQUESTS_PER_SESSION: Final = 4
"""Requests a provider runs at once in one session (more are refused busy), and so
the most a consumer sends at once in one: the rest wait their turn at the
consumer instead of being refused (docs/protocols.md#inference-stream)."""
MAX_DIMENSIONS: Final = 16384
"""The longest vector (float32 values) a request may ask for or an answer carry."""
MAX_EMBED_BYTES: Final = 768 * 1024
"""The most vector bytes one Done may carry (within a sealed frame's cap)."""

SCORE: Final = "score"
"""Request kind of an audit: score ids someone else generated, generate nothing."""
MAX_SCORE_IDS: Final = 4096
"""The most token ids one score request may carry (a provider refuses more), and
the most continuation ids one request may carry."""


def request_hash(request: Request) -> bytes:
    """sha256 of a request as sent: what a provider's commitment names it by."""
    return hashlib.sha256(REQUEST_DOMAIN + Codec([Request]).encode_body(request)).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(Message):
    """P→C, sealed: generated text (a batch of tokens); ``seq`` counts chunks from 0."""

    TYPE: ClassVar[str] = "infer.chunk"
    seq: int
    text: str
    tokens: int
    # The ids of the tokens and the model's log-probability of each (thousandths
    # of a nat), as the commitment will list them: what a failover cross-check
    # audits when the provider fails before its Done (docs/architecture.md#audits).
    token_ids: tuple[int, ...] = added(())
    logprobs: tuple[int, ...] = added(())
    # What the user asked to see (a request's top_logprobs >= 0): one entry
    # per token this chunk's text holds.
    logprob_tokens: tuple[TokenLogprob, ...] = added(())


@dataclass(frozen=True, slots=True, kw_only=True)
class Scored(Message):
    """What the model says of the ids of a score request, per id: the pieces of
    ``inference/audit.py:Scores`` beyond the log-probabilities (which are the
    commitment's). Signed inside the receipt: an auditor answers for its scores."""

    gaps: tuple[float, ...] = ()  # to the best token's logit (0: the model's choice)
    kept: tuple[bool, ...] = ()  # the request's sampler may draw it
    below: tuple[float, ...] = ()  # probability of the tokens before it, sampler's order
    prob: tuple[float, ...] = ()  # its own probability under the sampler
    possible: tuple[bool, ...] = ()  # within the looser cut
    prompt_tokens: int = 0  # the prompt (and any continuation) in the model's tokens
    text: str = ""  # what the ids stand for
    ends_with_eog: bool = False
    cpu_s: float = 0.0
    # Why no run of the model gives these ids (one outside its vocabulary):
    # then nothing else is said.
    impossible: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Commitment(Message):
    """What a provider says it did for one request (docs/protocols.md#commitments).

    Signed inside the receipt, so the consumer holds it under the provider's
    key: an audit that finds it false is evidence, not an opinion. An engine
    with no weights file (an upstream server) commits to the request and the
    usage only (``gguf_sha256`` empty, no ids): it cannot be audited.
    """

    request_hash: bytes  # request_hash() of the Request as received
    gguf_sha256: str = ""  # the weights that generated the answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Every token generated, in order (an end-of-generation token too, which
    # usage leaves out), and the model's log-probability of each, in
    # thousandths of a nat (temperature 1: inference/sampling.py).
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[int, ...] = ()
    # A score request's answer: token_ids are the ids scored, logprobs the
    # model's for them, and this the rest of what the model says of them.
    scored: Scored | None = added(None)


def millinats(logprobs: Iterable[float]) -> tuple[int, ...]:
    """Log-probabilities as commitments and chunks carry them: thousandths of a nat."""
    return tuple(round(lp * 1000) for lp in logprobs)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt(Message):
    """Cumulative usage of a session, as the provider signs it after each request,
    with its commitment for the request just ended."""

    session_id: bytes
    requests: int
    prompt_tokens: int
    completion_tokens: int
    commitment: Commitment | None = None
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        """What both the provider's signature and the consumer's Ack cover."""
        return signing_payload(self, RECEIPT_DOMAIN)


@dataclass(frozen=True, slots=True, kw_only=True)
class Done(Message):
    """P→C, sealed: the request ended; this request's usage and the session's receipt."""

    TYPE: ClassVar[str] = "infer.done"
    finish_reason: str  # "stop", "length", "cancelled" or PAUSED
    prompt_tokens: int
    completion_tokens: int
    receipt: Receipt
    # An EMBED request's answer: one vector per input, float32 little-endian.
    vectors: tuple[bytes, ...] = added(())


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack(Message):
    """C→P, sealed: the consumer's signature over the same receipt and, in paid mode,
    its acknowledgement that it used the session until ``used_until`` (chain time):
    the wallet's EIP-712 ``Usage(sessionId, usedUntil)`` signature, which the
    provider claims its pay with (README, "Security model"). Free mode: 0 and b""."""

    TYPE: ClassVar[str] = "infer.ack"
    signature: bytes
    used_until: int = 0
    usage_signature: bytes = b""


CLEAR_CODEC = Codec([InferOpen, Error])
"""The first frame of a stream, and errors before keys are known."""

SEALED_CODEC = Codec([Request, Chunk, Done, Ack, Error])
"""What sealed frames carry once the session's keys are in use."""
