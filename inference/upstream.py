"""An OpenAI-compatible server the provider already runs (llama-server, vLLM, Ollama).

The provider's node streams from it with httpx (which runs on trio) and serves
its models to the network. The URL and key stay in the provider's
configuration: they never appear in offers, status answers or logs. Every
failure of the upstream (unreachable, timeout, an error status, a malformed
event) becomes an :class:`EngineError` whose message a remote consumer may
read: the provider sends ``str(exc)`` to the peer, so the message names only
what went wrong in general terms (an HTTP status and its standard reason),
never the upstream's own words. An error body can carry the server's URL,
an echo of the key or its internals; it goes to this node's debug log,
with key-like strings blotted out.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, cast

import httpx
import numpy as np
import trio

from p2pnode.errors import BadRequestError, EngineError
from p2pnode.inference import grammar
from p2pnode.inference.engine import (
    EMBEDDINGS,
    GRAMMAR,
    LOGPROBS,
    PENALTIES,
    Chunk,
    EngineBusy,
    ModelInfo,
    Request,
    TokenLogprob,
    Usage,
)
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)

# How much of an upstream's error body the debug log keeps, and how long it
# is read for: enough to diagnose a refusal, never enough to stall a slot.
ERROR_DETAIL_CHARS: Final = 300
ERROR_BODY_READ_S: Final = 2.0
# What a key looks like in an error text: "Bearer <token>", OpenAI-style
# "sk-..." keys (also when an upstream masks their middle), key=/token=
# pairs, and the user:password of a URL.
_KEY_LIKE: Final = re.compile(
    r"(?i)bearer\s+\S+"
    r"|\bsk-[\w*.-]+"
    r"|\b(?:api[_-]?key|key|token|secret|password)\b[\"']?\s*[:=]\s*[\"']?[^\s\"',}]+"
    r"|(?<=://)[^/\s@]+(?=@)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Where the upstream server is and what of it to serve."""

    base_url: str  # e.g. "http://127.0.0.1:8080/v1"
    models: tuple[str, ...]  # model ids as the upstream names them
    # Models it serves embeddings of (POST /embeddings), as it names them.
    embedding_models: tuple[str, ...] = ()
    api_key: str | None = None
    # Requests sent to the upstream at once; it does its own batching.
    slots: int = 4
    queue_limit: int = 16
    context_length: int = 0  # advertised; 0 when unknown
    # Connecting on a LAN takes milliseconds; a first token can take long
    # on a loaded GPU server, so reads get more room than connects.
    connect_timeout: float = 5.0
    read_timeout: float = 120.0


class UpstreamEngine:
    """Streams completions from an OpenAI-compatible server. Use :func:`open_upstream`."""

    def __init__(self, cfg: Config, client: httpx.AsyncClient) -> None:
        self.cfg = cfg
        self._client = client
        self._slots = trio.Semaphore(cfg.slots)
        self._waiting = 0

    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                model_id=m,
                context_length=self.cfg.context_length,
                features=(GRAMMAR, LOGPROBS, PENALTIES),
            )
            for m in self.cfg.models
        ] + [
            ModelInfo(model_id=m, context_length=self.cfg.context_length, features=(EMBEDDINGS,))
            for m in self.cfg.embedding_models
        ]

    @property
    def slots_total(self) -> int:
        return self.cfg.slots

    @property
    def slots_free(self) -> int:
        return self._slots.value

    @property
    def queue_len(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        """Stream ``request`` from the upstream; leaving early closes the HTTP stream."""
        if request.model_id not in self.cfg.models:
            if request.model_id in self.cfg.embedding_models:
                raise BadRequestError(f"model {request.model_id!r} serves embeddings only")
            raise EngineError(f"model {request.model_id!r} is not served here")
        path, body = _openai_request(request)  # a bad format is refused before any slot
        await self._acquire()
        try:
            send, receive = trio.open_memory_channel[Chunk](0)
            with single_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    top = request.params.top_logprobs
                    top = -1 if top is None else top
                    nursery.start_soon(self._relay, path, body, top, send)
                    try:
                        async with receive:
                            yield receive
                    finally:
                        nursery.cancel_scope.cancel()  # hangs up on the upstream
        finally:
            self._slots.release()

    async def embed(self, request: Request) -> tuple[list[bytes], int]:
        """The upstream's embeddings of ``request.inputs``, L2-normalised and cut to
        ``request.dimensions`` here (servers differ in whether they do either).

        One input per upstream request: a server that batches several gives
        the same text other vectors at other positions (llama_cpp.server does).
        """
        if request.model_id not in self.cfg.embedding_models:
            raise BadRequestError(f"model {request.model_id!r} does not serve embeddings here")
        vectors: list[bytes] = []
        tokens = 0
        await self._acquire()
        try:
            for text in request.inputs:
                body = {"model": request.model_id, "input": [text]}
                response = await self._client.post("embeddings", json=body)
                if response.status_code >= 400:
                    raise await self._refusal(response)
                (vector,), used = _vectors(response.json(), 1, request.dimensions)
                vectors.append(vector)
                tokens += used
        except httpx.TimeoutException as exc:
            raise EngineError("the upstream server did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise EngineError(f"cannot reach the upstream server: {type(exc).__name__}") from exc
        except ValueError as exc:  # (a body that is not JSON)
            raise EngineError("the upstream sent a malformed answer") from exc
        finally:
            self._slots.release()
        return vectors, tokens

    async def _acquire(self) -> None:
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        if self._waiting >= self.cfg.queue_limit:
            raise EngineBusy(f"all {self.cfg.slots} upstream slots busy and {self._waiting} queued")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1

    async def _relay(
        self, path: str, body: dict[str, Any], top: int, send: trio.MemorySendChannel[Chunk]
    ) -> None:
        """Stream the upstream's answer (``top``: the logprobs' alternatives asked for, -1 none)."""
        produced, finish, usage = 0, "stop", None
        async with send:
            try:
                async with self._client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        raise await self._refusal(response)
                    failure: EngineError | None = None
                    # aclosing: under trio an abandoned async generator must be
                    # closed explicitly, or it lingers until garbage collection.
                    async with aclosing(_sse_events(response)) as events:
                        async for event in events:
                            if failure is not None:
                                continue  # read to the end, as _sse_events does
                            try:
                                text, finished, counted_usage, shown = _parse_event(event, top)
                            except EngineError as exc:
                                failure = exc
                                continue
                            usage = counted_usage or usage
                            if text:
                                tokens = max(1, len(shown))
                                produced += tokens
                                await send.send(Chunk(text, tokens, logprob_tokens=shown))
                            if finished is not None:
                                finish = finished
                    if failure is not None:
                        raise failure
            except httpx.TimeoutException as exc:
                raise EngineError("the upstream server did not answer in time") from exc
            except httpx.HTTPError as exc:
                raise EngineError(
                    f"cannot reach the upstream server: {type(exc).__name__}"
                ) from exc
            except trio.BrokenResourceError:
                return  # the consumer left
            await send.send(Chunk("", 0, finish, usage or Usage(0, produced)))

    async def _refusal(self, response: httpx.Response) -> EngineError:
        """An error status as an EngineError fit for a remote peer; the body goes to the log."""
        status = response.status_code
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "error"
        if logger.isEnabledFor(logging.DEBUG):
            detail = _redact(await _error_body(response), self.cfg.api_key)
            logger.debug("upstream answered %d %s: %r", status, reason, detail)
        return EngineError(f"upstream answered {status} ({reason})")


def _openai_request(request: Request) -> tuple[str, dict[str, Any]]:
    p = request.params
    body: dict[str, Any] = {
        "model": request.model_id,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
    }
    if p.stop:
        body["stop"] = list(p.stop)
    if p.seed is not None:
        body["seed"] = p.seed
    # Passed on as OpenAI names them; the server applies them its own way.
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    if p.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in p.logit_bias}
    if p.top_logprobs is not None:
        if request.kind == "chat":
            body.update(logprobs=True, top_logprobs=p.top_logprobs)
        else:
            body["logprobs"] = p.top_logprobs
    if p.format is not None:
        # llama.cpp's servers (llama-server, llama_cpp.server) take a GBNF
        # grammar as "grammar": the same one our own engine would apply.
        body["grammar"] = grammar.gbnf_of(p.format)
    if request.kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.continuation:
            # Assistant prefill: llama-server and vLLM continue a final
            # assistant message; servers that do not will answer afresh.
            body["messages"].append({"role": "assistant", "content": request.continuation})
        return "chat/completions", body
    body["prompt"] = request.prompt + request.continuation
    return "completions", body


def _parse_event(
    event: dict[str, Any], top: int = -1
) -> tuple[str, str | None, Usage | None, tuple[TokenLogprob, ...]]:
    """(text, finish reason or None, usage or None, logprobs) of one streamed event
    (``top``: the alternatives asked for at each token; -1, no logprobs).

    Raises EngineError for an event of the wrong shape. The finish reason is
    one of ours ("stop" or "length"): the upstream's own word never travels on.
    """
    choices = event.get("choices") or []
    raw_usage = event.get("usage")
    usage = None
    if raw_usage:
        if not isinstance(raw_usage, dict):
            raise EngineError("the upstream sent a malformed event")
        usage = Usage(
            prompt_tokens=_count(raw_usage.get("prompt_tokens")),
            completion_tokens=_count(raw_usage.get("completion_tokens")),
        )
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise EngineError("the upstream sent a malformed event")
    if not choices:
        return "", None, usage, ()
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    if text is not None and not isinstance(text, str):
        raise EngineError("the upstream sent a malformed event")
    reason = choice.get("finish_reason")
    finish = None if not reason else "length" if reason == "length" else "stop"
    shown = _logprobs(choice.get("logprobs"), top) if top >= 0 and text else ()
    return text or "", finish, usage, shown


def _logprobs(value: object, top: int) -> tuple[TokenLogprob, ...]:
    """An event's logprobs, in chat's shape (``content``) or completions'
    (``tokens``, ``token_logprobs``, ``top_logprobs``); EngineError if malformed."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise EngineError("the upstream sent malformed logprobs")
    if "content" in value:
        items = value.get("content") or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise EngineError("the upstream sent malformed logprobs")
        return tuple(
            TokenLogprob(
                _piece(i.get("token"), i.get("bytes")),
                _logprob(i.get("logprob")),
                _best(
                    (
                        (_piece(a.get("token"), a.get("bytes")), _logprob(a.get("logprob")))
                        for a in i.get("top_logprobs") or []
                        if isinstance(a, dict)
                    ),
                    top,
                ),
            )
            for i in items
        )
    tokens, values = value.get("tokens") or [], value.get("token_logprobs") or []
    tops = value.get("top_logprobs") or [None] * len(tokens)
    if not (isinstance(tokens, list) and isinstance(values, list) and isinstance(tops, list)):
        raise EngineError("the upstream sent malformed logprobs")
    out = []
    for token, logprob, alternatives in zip(tokens, values, tops, strict=False):
        pairs = alternatives.items() if isinstance(alternatives, dict) else ()
        ranked = _best(((_piece(t, None), _logprob(lp)) for t, lp in pairs), top)
        out.append(TokenLogprob(_piece(token, None), _logprob(logprob), ranked))
    return tuple(out)


def _best(alternatives: Iterable[tuple[bytes, float]], top: int) -> tuple[tuple[bytes, float], ...]:
    """The ``top`` most probable, best first (a server may list them in any order)."""
    return tuple(sorted(alternatives, key=lambda a: -a[1])[:top])


def _piece(token: object, raw: object) -> bytes:
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    if isinstance(token, str):
        return token.encode()
    raise EngineError("the upstream sent malformed logprobs")


def _logprob(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EngineError("the upstream sent a malformed log-probability")
    return min(0.0, float(value))


def _vectors(answer: object, inputs: int, dimensions: int) -> tuple[list[bytes], int]:
    """An upstream's embeddings answer as ours: one float32 vector per input, in
    input order, cut to ``dimensions`` (0: as given) and L2-normalised."""
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != inputs:
        raise EngineError("the upstream sent a malformed embeddings answer")
    ordered: list[Any] = [None] * inputs
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        values = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < inputs or not isinstance(values, list):
            raise EngineError("the upstream sent a malformed embeddings answer")
        try:
            vector = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise EngineError("the upstream sent a malformed embedding") from exc
        if vector.ndim == 2 and vector.shape[0]:
            # One vector per token (a model without pooling, e.g. a chat
            # model's GGUF in llama_cpp.server): mean-pooled, as our engine pools.
            vector = vector.mean(axis=0)
        if vector.ndim != 1 or not vector.size or not np.isfinite(vector).all():
            raise EngineError("the upstream sent a malformed embedding")
        if dimensions > vector.size:
            raise BadRequestError(f"dimensions may be at most {vector.size} for this model")
        vector = vector[: dimensions or vector.size]
        norm = float(np.linalg.norm(vector))
        ordered[index] = (vector / norm if norm else vector).astype("<f4").tobytes()
    if any(v is None for v in ordered):
        raise EngineError("the upstream sent a malformed embeddings answer")
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = _count(usage.get("prompt_tokens", 0)) if isinstance(usage, dict) else 0
    return ordered, tokens


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise EngineError("the upstream sent a malformed usage count")
    return value


async def _error_body(response: httpx.Response) -> str:
    """The start of an error body, for the log: read to its end (see _sse_events), briefly."""
    kept = bytearray()
    # httpx types aiter_bytes() as an iterator; it is an async generator.
    chunks_gen = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
    with trio.move_on_after(ERROR_BODY_READ_S):
        async with aclosing(chunks_gen) as chunks:
            async for chunk in chunks:
                kept += chunk[: ERROR_DETAIL_CHARS * 4 - len(kept)]
    return kept.decode(errors="replace")[:ERROR_DETAIL_CHARS]


def _redact(text: str, api_key: str | None) -> str:
    """``text`` without our key or anything that looks like a key."""
    if api_key:
        text = text.replace(api_key, "[key]")
    return _KEY_LIKE.sub("[redacted]", text)


async def _sse_events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The JSON events of a server-sent-event stream, until ``data: [DONE]``.

    The stream is read to its end even after ``[DONE]`` or a malformed event
    (raised once the end is reached): httpx nests async generators (lines,
    text, bytes, raw) and closes only the outermost, so stopping early would
    leave the inner ones to the garbage collector.
    """
    done = malformed = False
    # httpx types aiter_lines() as an iterator; it is an async generator.
    lines_gen = cast(AsyncGenerator[str, None], response.aiter_lines())
    async with aclosing(lines_gen) as lines:
        async for line in lines:
            if done or malformed or not line.startswith("data:"):
                continue  # comments, event names, keep-alives, anything after [DONE]
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                continue
            try:
                event = json.loads(data)
            except ValueError:
                malformed = True
                continue
            if isinstance(event, dict):
                yield event
    if malformed:
        raise EngineError("the upstream sent a malformed event")


@asynccontextmanager
async def open_upstream(cfg: Config) -> AsyncIterator[UpstreamEngine]:
    """An engine for ``cfg``; the HTTP connection pool closes on exit."""
    if not cfg.models and not cfg.embedding_models:
        raise EngineError("an upstream engine needs at least one model id")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout)
    async with httpx.AsyncClient(
        base_url=cfg.base_url.rstrip("/") + "/", headers=headers, timeout=timeout
    ) as client:
        yield UpstreamEngine(cfg, client)
