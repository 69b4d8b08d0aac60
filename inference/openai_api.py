"""The local OpenAI-compatible shim: the node's only HTTP surface.

See docs/architecture.md#the-openai-shim.

Any OpenAI client pointed at ``http://127.0.0.1:<port>/v1`` with the node's
API key talks to the network through its own node: ``GET /v1/models``,
``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, streamed as server-sent events with ``stream: true``;
``POST /v1/embeddings`` (``inference/embeddings_api.py``); and the Responses and
Messages APIs (``inference/agent_apis.py``).

Three guards stand before every route. The bearer key (``$P2PNODE_HOME/api_key``)
must match, and the Host header must name a loopback host: a web page the
user visits can make the browser send requests to 127.0.0.1, but not with a
Host of 127.0.0.1 unless it *is* that origin (DNS rebinding), so it cannot
spend the user's stake or quota through the local port. Then the request
needs one of ``Config.max_in_flight`` slots (429 with Retry-After when none
is free); it holds the slot until its answer is sent or the client leaves.
A body is read as it arrives and refused (413) at the first chunk past
``MAX_BODY``, whatever Content-Length says. The shim listens on loopback
only, unless ``Config.allow_remote`` says otherwise.

A generation runs inside the response, alongside a task that waits for the
client to disconnect: a client that leaves cancels the generation, and with
it the remote provider's (the consumer resets the stream). A streamed
response sends its headers with the first token, so a request no provider
can serve still gets a proper error status (503, or 429 when every provider
said "slow down").

Starlette on hypercorn's trio worker: both are made for ASGI on trio (via
anyio), and neither needs threads or asyncio.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pnode.errors import (
    BadRequestError,
    ConfigError,
    EngineError,
    NetworkError,
    NoProviderError,
    PaymentError,
)
from p2pnode.inference import agent_apis, dashboard, embeddings_api, keys, tools
from p2pnode.inference.api_fields import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    Job,
    bad_request,
    call_id,
    checked,
    int_field,
    json_object_format,
    number_field,
    or_default,
    schema_format,
    send_json,
    stop_field,
    text_content,
    tool_choice_field,
    tool_format,
    tool_list,
    tool_spec,
    unset_sampling,
)
from p2pnode.inference.engine import ChatMessage, Format, Params, Request, TokenLogprob
from p2pnode.protocols.infer.messages import MAX_BIAS, MAX_BIASES, MAX_PENALTY, MAX_TOP_LOGPROBS
from p2pnode.protocols.offers.messages import MAX_TEMPERATURE
from p2pnode.scopes import single_errors_ungrouped

TaskStatus = Any  # trio.TaskStatus is shadowed by the trio-typing stubs

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
MAX_BODY: Final = 1024 * 1024  # the infer protocol's prompt cap
MAX_N: Final = 8
MAX_COMPLETION_LOGPROBS: Final = 5  # OpenAI's bound for completions' logprobs
ROLES: Final = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """What the shim lets its clients spend, and where it may listen."""

    # Requests handled at once; more are answered 429 at once. Each holds at
    # most MAX_BODY of body and one request on the network, so 32 bounds the
    # buffered bodies to 32 MiB while staying above what one user's tools
    # (agents, batch scripts) usually run in parallel.
    max_in_flight: int = 32
    # Seconds a refused client is told to wait; the official OpenAI clients
    # honour Retry-After when they retry a 429.
    retry_after_s: int = 1
    # Listening beyond loopback puts the key check and plain HTTP on the
    # network: refused unless the user asks for it.
    allow_remote: bool = False


class Finished(Protocol):
    """How a generation ended (``p2p.consumer.Outcome`` fits)."""

    @property
    def finish_reason(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def vectors(self) -> tuple[bytes, ...]: ...
    @property
    def provider(self) -> str: ...


class Backend(Protocol):
    """What the shim needs of its node."""

    def list_models(self) -> list[tuple[str, str]]:
        """(model id, owner: "local" or "network") for every model the node can reach."""
        ...

    def recommended_sampling(self, model_id: str) -> tuple[float | None, float | None]:
        """The (temperature, top_p) recommended for the model; None where none is."""
        ...

    def price_per_s(self, provider: str, model_id: str) -> int:
        """What ``provider`` asks a second for ``model_id``; the highest on offer for
        it when ``provider`` is "" or unknown; 0 where nothing is paid."""
        ...

    def dashboard(self) -> dict[str, Any]:
        """What the dashboard shows: the node, its providers, connections, sessions
        (JSON; docs/architecture.md#the-dashboard)."""
        ...

    def prometheus(self) -> bytes:
        """The node's metrics in Prometheus' text format."""
        ...

    async def has_model(self, model_id: str) -> bool:
        """Whether the model is served here or on offer (may look it up on the network)."""
        ...

    async def generate(
        self,
        request: Request,
        deliver: Callable[[str, int], Awaitable[None]],
        *,
        logprobs: Callable[[tuple[TokenLogprob, ...]], None] | None = None,
    ) -> Finished:
        """Run the request; text goes to ``deliver`` as it comes, and the
        logprobs it asked for (``request.params.top_logprobs``) to ``logprobs``,
        each batch before its text."""
        ...


# --- errors ---------------------------------------------------------------------


def _api_error_of(exc: Exception) -> ApiError:
    """The HTTP status and body for a failure of the node behind the shim."""
    if isinstance(exc, BadRequestError):
        return ApiError(400, str(exc))
    if isinstance(exc, PaymentError):
        return ApiError(429, str(exc), type_="insufficient_quota", code="insufficient_quota")
    if isinstance(exc, NoProviderError) and exc.rate_limited:
        return ApiError(429, str(exc), type_="requests", code="rate_limit_exceeded")
    if isinstance(exc, NetworkError):
        return ApiError(503, str(exc), type_="server_error", code="no_provider")
    return ApiError(500, str(exc), type_="server_error", code="engine_error")


# --- request parsing (pure) ----------------------------------------------------


def parse_job(kind: Literal["chat", "completion"], body: object) -> Job:
    """Validate an OpenAI request body. Raises ApiError(400).

    Fields whose answer would change but cannot be served yet are refused
    (:func:`_refuse_unserved`): a client asking for tool calls or a JSON
    schema must not get plain text it takes for one. Others are ignored.
    """
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    _refuse_unserved(body)
    messages: tuple[ChatMessage, ...] = ()
    prompt = ""
    fmt = None
    if kind == "chat":
        messages = _messages(body.get("messages"))
        fmt, messages = _chat_format(body, messages)
    else:
        prompt = _prompt(body.get("prompt"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    params = Params(
        max_tokens=int_field(max_tokens, "max_tokens", 1, 1_000_000),
        temperature=number_field(
            or_default(body.get("temperature"), 1.0), "temperature", 0.0, MAX_TEMPERATURE
        ),
        top_p=number_field(or_default(body.get("top_p"), 1.0), "top_p", 0.0, 1.0),
        stop=stop_field(body.get("stop")),
        seed=None
        if body.get("seed") is None
        else int_field(body["seed"], "seed", -(2**63), 2**63 - 1),
        presence_penalty=_penalty(body, "presence_penalty"),
        frequency_penalty=_penalty(body, "frequency_penalty"),
        logit_bias=_logit_bias(body.get("logit_bias")),
        format=fmt,
        top_logprobs=_top_logprobs(kind, body),
    )
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string", "user")
    n = int_field(body.get("n", 1), "n", 1, 1_000_000)
    if n > MAX_N:
        raise bad_request(f"'n' may be at most {MAX_N} here", "n")
    request = Request(model_id=model, kind=kind, messages=messages, prompt=prompt, params=params)
    unset = unset_sampling(body)
    return Job(kind, request, n, stream, bool(options.get("include_usage", False)), unset)


def _refuse_unserved(body: dict[str, Any]) -> None:
    """A 400 naming the first field set to something this shim does not serve yet.

    Their "off" values (what clients send by default) pass: no functions
    (the deprecated form of tools), text output.
    """
    unserved = {
        "functions": bool(body.get("functions")),
        "function_call": body.get("function_call") not in (None, "none", "auto"),
        "modalities": body.get("modalities") not in (None, ["text"]),
        "audio": body.get("audio") is not None,
        "suffix": body.get("suffix") not in (None, ""),
        "echo": body.get("echo") not in (None, False),
        "best_of": body.get("best_of") not in (None, 1),
    }
    for field, refused in unserved.items():
        if refused:
            raise bad_request(f"'{field}' is not served by this node yet", field)


def _messages(value: object) -> tuple[ChatMessage, ...]:
    """The chat turns, tool calls and tool results written as the model reads
    them (``inference/tools.py``): consecutive results make one user turn."""
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty array", "messages")
    out: list[ChatMessage] = []
    results: list[str] = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        if item.get("role") == "tool":
            results.append(text_content(item.get("content"), where))
            continue
        if results:
            out.append(ChatMessage(role="user", content=tools.results_text(results)))
            results = []
        given = item.get("role")
        role = ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            allowed = sorted({*ROLES, "tool"})
            raise bad_request(f"{where}.role must be one of {allowed}", f"{where}.role")
        calls = item.get("tool_calls") if role == "assistant" else None
        if calls:
            content = "" if item.get("content") is None else text_content(item["content"], where)
            content = tools.calls_text(content, _history_calls(calls, f"{where}.tool_calls"))
        else:
            content = text_content(item.get("content"), where)
        out.append(ChatMessage(role=role, content=content))
    if results:
        out.append(ChatMessage(role="user", content=tools.results_text(results)))
    return tuple(out)


def _history_calls(value: object, where: str) -> list[tuple[str, str]]:
    """(name, arguments) of the calls an earlier assistant turn made."""
    if not isinstance(value, list):
        raise bad_request(f"{where} must be an array", where)
    out = []
    for call in value:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise bad_request(f"{where}: a call needs function.name and function.arguments", where)
        out.append((name, arguments))
    return out


def _chat_format(
    body: dict[str, Any], messages: tuple[ChatMessage, ...]
) -> tuple[Format | None, tuple[ChatMessage, ...]]:
    """The answer's format (``response_format``, ``tools``, ``tool_choice``,
    ``parallel_tool_calls``), and the turns with the tools listed for the model."""
    answer = _response_format(body.get("response_format"))
    specs = _tools(body.get("tools"))
    value = body.get("tool_choice")
    named = None
    if isinstance(value, dict):
        function = value.get("function")
        named = function.get("name") if isinstance(function, dict) else None
        if value.get("type") != "function" or not isinstance(named, str):
            raise bad_request(
                "'tool_choice' names a function as {type, function: {name}}", "tool_choice"
            )
    choice = tool_choice_field(value, specs, named)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    fmt = tool_format(specs, choice, parallel, answer)
    if fmt is not answer:
        messages = tools.with_tools(messages, specs)
    return checked(fmt, "tools" if fmt is not answer else "response_format"), messages


def _response_format(value: object) -> Format | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("'response_format' must be an object", "response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_format()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("'response_format.json_schema' must be an object", "response_format")
        return schema_format(spec.get("schema", {}), "response_format")
    raise bad_request(
        "'response_format' must be of type text, json_object or json_schema", "response_format"
    )


def _tools(value: object) -> list[tools.ToolSpec]:
    """Chat completions' tools: {type: function, function: {name, description, parameters}}."""

    def spec_of(tool: Any) -> tools.ToolSpec:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise bad_request("only function tools are served", "tools")
        return tool_spec(
            function.get("name"), function.get("description"), function.get("parameters"), "tools"
        )

    return tool_list(value, spec_of)


def _prompt(value: object) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise bad_request("'prompt' must be a string (or an array of one string)", "prompt")
    return value


def _top_logprobs(kind: str, body: dict[str, Any]) -> int | None:
    """How many alternatives the answer's logprobs show at each token (None: no
    logprobs): chat's ``logprobs`` and ``top_logprobs``, completions' ``logprobs``."""
    if kind == "completion":
        value = body.get("logprobs")
        return None if value is None else int_field(value, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    top = body.get("top_logprobs")
    if top not in (None, 0) and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if not wanted:
        return None
    return 0 if top is None else int_field(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)


def _penalty(body: dict[str, Any], name: str) -> float:
    return number_field(or_default(body.get(name), 0.0), name, -MAX_PENALTY, MAX_PENALTY)


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}``, as (id, bias) pairs by id. Ids are the
    model's own vocabulary's; the engine refuses one outside it."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_BIASES:
        raise bad_request(
            f"'logit_bias' must be an object of at most {MAX_BIASES} entries", "logit_bias"
        )
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 9):
            raise bad_request(f"'logit_bias' keys are token ids, not {key!r}", "logit_bias")
        out[int(key)] = number_field(bias, "logit_bias", -MAX_BIAS, MAX_BIAS)
    return tuple(sorted(out.items()))


# --- the generation inside a response ------------------------------------------


class Shape(Protocol):
    """How another API (OpenAI's Responses, Anthropic's Messages) answers one
    generation: its JSON body, or its stream of named events
    (``inference/agent_apis.py``). Each event is a dict whose ``type`` is its
    server-sent event name."""

    def opening(self) -> list[dict[str, Any]]:
        """The events before anything of the answer."""
        ...

    def delta(self, text: str) -> list[dict[str, Any]]:
        """The events that carry ``text`` (the first opens the text's part)."""
        ...

    def call_start(self, index: int, name: str) -> list[dict[str, Any]]:
        """The events that open tool call ``index`` (closing the one before)."""
        ...

    def call_arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        """The events that carry more of call ``index``'s arguments."""
        ...

    def closing(
        self, text: str, calls: list[tuple[str, str]], finish: str, usage: tuple[int, int]
    ) -> list[dict[str, Any]]:
        """The events after the last text or call: ``calls`` are (name,
        arguments) when the answer was calls; ``usage``: prompt, completion tokens."""
        ...

    def whole(
        self, text: str, calls: list[tuple[str, str]], finish: str, usage: tuple[int, int]
    ) -> dict[str, Any]:
        """The body of an answer that is not streamed."""
        ...

    def error_events(self, error: ApiError) -> list[dict[str, Any]]:
        """The events that report ``error`` once the stream has begun."""
        ...


class _Generation(Response):
    """Runs a job while the client stays; answers as JSON or as server-sent events.

    The model look-up (which may ask the network) runs under the same watch
    as the generation: a client that leaves during either frees its slot.
    Without a ``shape`` it answers as chat or text completions; with one, in
    that shape's API.
    """

    def __init__(self, backend: Backend, job: Job, shape: Shape | None = None) -> None:
        super().__init__()
        self._backend = backend
        self._job = job
        self._shape = shape
        self._id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self._created = int(time.time())
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
            try:
                model = self._job.request.model_id
                if await self._backend.has_model(model):
                    recommended = self._backend.recommended_sampling(model)
                    self._job = self._job.with_recommended(*recommended)
                    if self._shape is None:
                        await self._run(send)
                    else:
                        await self._run_shaped(send, self._shape)
                else:
                    await self._fail(send, _not_found(self._job.request.model_id))
            except (NetworkError, PaymentError, EngineError) as exc:
                logger.info("request %s failed: %s", self._id, exc, extra={"request": self._id})
                await self._fail(send, _api_error_of(exc))
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _watch_disconnect(receive: Receive, generation: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                logger.info("client left: cancelling its generation")
                generation.cancel()
                return

    async def _run(self, send: Send) -> None:
        job = self._job
        results: list[tuple[str, str, list[dict[str, Any]], dict[str, Any] | None]] = []
        prompt_tokens = completion_tokens = 0
        for index in range(job.n):
            parts: list[str] = []
            reader = _CallDeltas() if job.reads_calls else None
            seen = _Logprobs(job.kind) if job.request.params.top_logprobs is not None else None

            async def deliver(
                text: str,
                _tokens: int,
                index: int = index,
                parts: list[str] = parts,
                reader: _CallDeltas | None = reader,
                seen: _Logprobs | None = seen,
            ) -> None:
                if job.stream:
                    if not parts:
                        await self._open_choice(send, index)
                    deltas = [self._delta(text)] if reader is None else reader.feed(text)
                    shown = seen.take() if seen is not None and deltas else None
                    for delta in deltas:
                        await self._event(send, self._chunk(index, delta, None, shown))
                        shown = None
                parts.append(text)

            done = await generate(
                self._backend, job.request, deliver, logprobs=seen.add if seen is not None else None
            )
            finish = "length" if done.finish_reason == "length" else "stop"
            prompt_tokens += done.prompt_tokens
            completion_tokens += done.completion_tokens
            text = "".join(parts)
            calls = _calls(text, reader) if reader is not None else []
            if calls and finish == "stop":
                finish = "tool_calls"
            results.append((text, finish, calls, seen.whole() if seen is not None else None))
            if job.stream:
                if not parts:
                    await self._open_choice(send, index)
                for delta in reader.end() if reader is not None else []:
                    await self._event(send, self._chunk(index, delta, None))
                rest = seen.take() if seen is not None else None
                await self._event(send, self._chunk(index, self._delta(None), finish, rest))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if not job.stream:
            choices = [self._choice(i, *result) for i, result in enumerate(results)]
            await send_json(send, 200, {**self._head(None), "choices": choices, "usage": usage})
            return
        if job.include_usage:
            await self._event(send, {**self._head("chunk"), "choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _run_shaped(self, send: Send, shape: Shape) -> None:
        """One answer (these APIs have no ``n``), in ``shape``'s body or events."""
        job = self._job
        parts: list[str] = []
        reader = tools.CallReader() if job.reads_calls else None

        async def deliver(text: str, _tokens: int) -> None:
            if job.stream:
                if not parts:
                    await self._events(send, shape.opening())
                said: list[tools.Event] = (
                    [tools.Prose(text)] if reader is None else reader.feed(text)
                )
                await self._events(send, _shape_events(shape, said))
            parts.append(text)

        done = await generate(self._backend, job.request, deliver)
        text = "".join(parts)
        calls = (tools.read_calls(text) or []) if reader is not None else []
        usage = (done.prompt_tokens, done.completion_tokens)
        if not job.stream:
            await send_json(send, 200, shape.whole(text, calls, done.finish_reason, usage))
            return
        if not parts:
            await self._events(send, shape.opening())
        if reader is not None:
            await self._events(send, _shape_events(shape, reader.end()))
        await self._events(send, shape.closing(text, calls, done.finish_reason, usage))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _events(self, send: Send, events: list[dict[str, Any]]) -> None:
        for event in events:
            await self._event(send, event, named=True)

    async def _open_choice(self, send: Send, index: int) -> None:
        """A chat stream's first chunk of a choice names the role (as OpenAI's does)."""
        if self._job.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            await self._event(send, self._chunk(index, delta, None))

    # --- shapes of the OpenAI objects -----------------------------------------

    def _head(self, kind: str | None) -> dict[str, Any]:
        if self._job.kind == "chat":
            obj = "chat.completion.chunk" if kind == "chunk" else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self._id,
            "object": obj,
            "created": self._created,
            "model": self._job.request.model_id,
            "system_fingerprint": None,
        }

    def _delta(self, text: str | None) -> dict[str, Any] | str:
        """A chat delta (empty for the final chunk) or a completion's text."""
        if self._job.kind == "chat":
            return {} if text is None else {"content": text}
        return text or ""

    def _chunk(
        self,
        index: int,
        delta: dict[str, Any] | str,
        finish: str | None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self._job.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = delta
        return {**self._head("chunk"), "choices": [choice]}

    def _choice(
        self,
        index: int,
        text: str,
        finish: str,
        calls: list[dict[str, Any]],
        logprobs: dict[str, Any] | None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
        if self._job.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message.update(content=None, tool_calls=calls)
            choice["message"] = message
        else:
            choice["text"] = text
        return choice

    # --- sending ----------------------------------------------------------------

    async def _event(self, send: Send, data: dict[str, Any], *, named: bool = False) -> None:
        """One server-sent event (``named``: with an ``event:`` line, its ``type``)."""
        if not self._started:
            self._started = True
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-request-id", self._id.encode()),
                    ],
                }
            )
        body = b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
        if named:
            body = b"event: " + str(data["type"]).encode() + b"\n" + body
        await send({"type": "http.response.body", "body": body, "more_body": True})

    async def _fail(self, send: Send, error: ApiError) -> None:
        if not self._started:
            await send_json(send, error.status, error.body)
            return
        # Headers are gone: the error travels as an event, as OpenAI's does.
        if self._shape is not None:
            await self._events(send, self._shape.error_events(error))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._event(send, error.body)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


class _Logprobs:
    """The logprobs of one choice, in OpenAI's shape for chat or for completions."""

    def __init__(self, kind: str) -> None:
        self._chat = kind == "chat"
        self._all: list[TokenLogprob] = []
        self._new: list[TokenLogprob] = []
        self._offset = 0  # completions' text_offset of the next token

    def add(self, entries: tuple[TokenLogprob, ...]) -> None:
        self._all += entries
        self._new += entries

    def take(self) -> dict[str, Any] | None:
        """What came since the last take (a stream chunk's logprobs), if anything did."""
        if not self._new:
            return None
        shown, self._offset = self._shape(self._new, self._offset)
        self._new = []
        return shown

    def whole(self) -> dict[str, Any]:
        return self._shape(self._all, 0)[0]

    def _shape(self, entries: list[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
        """``entries`` in their API's shape, a completion's offsets counted from
        ``offset``; and the offset after them."""
        if self._chat:
            return {"content": [_chat_entry(e) for e in entries], "refusal": None}, offset
        tokens = [_text(e.piece) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(p): lp for p, lp in e.top} for e in entries],
            "text_offset": offsets,
        }, offset


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    top = [{"token": _text(p), "logprob": lp, "bytes": list(p)} for p, lp in entry.top]
    return {
        "token": _text(entry.piece),
        "logprob": entry.logprob,
        "bytes": list(entry.piece),
        "top_logprobs": top,
    }


class _CallDeltas:
    """A chat stream's deltas for an answer that may be tool calls (OpenAI's
    shape: a call's index, id, type and name first, its arguments in pieces)."""

    def __init__(self) -> None:
        self.reader = tools.CallReader()
        self.ids: list[str] = []

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.reader.feed(text))

    def end(self) -> list[dict[str, Any]]:
        return self._deltas(self.reader.end())

    def _deltas(self, events: list[tools.Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, tools.Prose):
                out.append({"content": event.text})
            elif isinstance(event, tools.CallStart):
                self.ids.append(call_id())
                function = {"name": event.name, "arguments": ""}
                call = {"index": event.index, "id": self.ids[-1], "type": "function"}
                out.append({"tool_calls": [{**call, "function": function}]})
            else:
                function = {"arguments": event.text}
                out.append({"tool_calls": [{"index": event.index, "function": function}]})
        return out


def _shape_events(shape: Shape, said: list[tools.Event]) -> list[dict[str, Any]]:
    """The events ``shape`` streams for what the answer said."""
    out: list[dict[str, Any]] = []
    for event in said:
        if isinstance(event, tools.Prose):
            out += shape.delta(event.text)
        elif isinstance(event, tools.CallStart):
            out += shape.call_start(event.index, event.name)
        else:
            out += shape.call_arguments(event.index, event.text)
    return out


def _calls(text: str, reader: _CallDeltas) -> list[dict[str, Any]]:
    """The tool calls a whole answer made, as a chat message lists them
    (ids as its stream gave them, when it was streamed)."""
    calls = tools.read_calls(text) or []
    ids = reader.ids + [call_id() for _ in calls[len(reader.ids) :]]
    return [
        {"id": ids[i], "type": "function", "function": {"name": name, "arguments": arguments}}
        for i, (name, arguments) in enumerate(calls)
    ]


async def generate(
    backend: Backend,
    request: Request,
    deliver: Callable[[str, int], Awaitable[None]],
    *,
    logprobs: Callable[[tuple[TokenLogprob, ...]], None] | None = None,
) -> Finished:
    """``backend.generate``, its use charged to the team key that asked, if one did
    (docs/architecture.md#team-keys).

    While it streams, its seconds so far at the highest price on offer for the
    model are held against the key's spend limit, and the answer stops (429)
    once the key has spent it. When it ends, however it ends (finished, failed,
    or cut short by the client leaving), the key is charged its tokens and its
    seconds at the price of the provider that served it (the highest on offer
    when none finished it).
    """
    account = keys.CURRENT.get()
    extra = {} if logprobs is None else {"logprobs": logprobs}
    if account is None:
        return await backend.generate(request, deliver, **extra)
    started = trio.current_time()
    rate = backend.price_per_s("", request.model_id)
    held = produced = 0

    async def counted(text: str, tokens: int) -> None:
        nonlocal held, produced
        produced += tokens
        held = account.streaming(held, math.ceil(rate * (trio.current_time() - started)))
        await deliver(text, tokens)

    done: Finished | None = None
    try:
        done = await backend.generate(request, counted, **extra)
        return done
    finally:
        seconds = trio.current_time() - started
        if done is not None:
            price = backend.price_per_s(done.provider, request.model_id) if done.provider else 0
            used = (done.prompt_tokens, done.completion_tokens)
        else:
            price, used = rate, (0, produced)
        account.charge(held, *used, math.ceil(price * seconds))


async def _no_text(_text: str, _tokens: int) -> None:
    """Where an embedding request's text would go: it has none."""


class _NoAnswer(Response):
    """For a client that has left: there is nobody to answer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return


async def _read_body(request: HttpRequest) -> bytes:
    """The request body, refused with 413 as soon as it passes ``MAX_BODY``.

    A declared length over the cap is refused before reading. Otherwise the
    body is read as it arrives and the first chunk past the cap ends it: no
    Content-Length (chunked) or a lying one cannot make the shim buffer more
    than the cap and one chunk. Raises ClientDisconnect if the client leaves.
    """
    if _declares_over(request.headers.get("content-length", ""), MAX_BODY):
        raise _too_large()
    body = bytearray()
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > MAX_BODY:
                raise _too_large()
    return bytes(body)


_LEFT: Final = object()
"""What :func:`_json_body` returns when the client left while sending."""


async def _json_body(request: HttpRequest) -> Any:
    """The request's JSON body (ApiError 400 or 413 when it is none), or ``_LEFT``."""
    try:
        raw = await _read_body(request)
    except ClientDisconnect:
        logger.info("client left while sending its request")
        return _LEFT
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from exc


def _declares_over(value: str, limit: int) -> bool:
    """Whether a Content-Length value names more than ``limit`` bytes."""
    digits = value.strip().lstrip("0")
    if not (digits.isascii() and digits.isdigit()):
        return False
    # Compare lengths first: int() refuses strings of over 4300 digits.
    return len(digits) > len(str(limit)) or int(digits) > limit


def _too_large() -> ApiError:
    return ApiError(413, f"request body over {MAX_BODY} bytes", code="request_too_large")


# --- the app -------------------------------------------------------------------


class _Guard:
    """ASGI middleware before any route: loopback Host header, the bearer key, a slot.

    A request holds its slot until the route returns: when its answer is
    sent, or when the client has left (the routes stop on ``http.disconnect``).
    Only requests that passed the key check can take a slot.
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        api_key: str,
        config: Config,
        logins: dashboard.Login,
        ring: keys.KeyRing,
    ) -> None:
        self._app = app
        self._keys = ring
        self._key = api_key.encode()
        self._config = config
        self._in_flight = 0
        self._logins = logins

    def _dashboard_admits(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        """Whether the request carries a dashboard cookie, and (when it is not a
        GET) the header a cross-origin page cannot add (docs/architecture.md#the-dashboard)."""
        cookies = dashboard.cookies_of(headers)
        if not cookies or (scope["method"] != "GET" and headers.get(dashboard.HEADER) != b"1"):
            return False
        return any(self._logins.admits(cookie) for cookie in cookies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if _host_name(host) not in LOOPBACK_HOSTS:
            error = ApiError(403, f"Host {host!r} is not a loopback name", code="forbidden_host")
            await send_json(send, error.status, error.body)
            return
        if scope["path"] == "/login":  # its one-time token is the credential
            await self._app(scope, receive, send)
            return
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            # Anthropic's clients send the key as x-api-key instead.
            token = headers.get(b"x-api-key", b"")
            auth = auth or token
        if not token and self._dashboard_admits(scope, headers):
            token = self._key  # the dashboard's cookie admits what the owner's key admits
        team: keys.Key | None = None
        if not token or not hmac.compare_digest(token.strip(), self._key):
            verdict = self._keys.admit(token.decode("latin-1"), time.monotonic()) if token else None
            if not isinstance(verdict, keys.Key):
                await self._refuse(send, scope["path"], verdict, bool(auth))
                return
            team = verdict
            if not scope["path"].startswith("/v1/"):
                # A key handed to others spends through the API; the dashboard,
                # its state (wallet, other keys, peers) and /metrics are the owner's.
                await ApiError(
                    403, "a team key reaches the API under /v1/ only", code="forbidden"
                ).send(send)
                return
        limit = self._config.max_in_flight
        if self._in_flight >= limit:
            await ApiError(
                429,
                f"this node is already handling {limit} requests; retry shortly",
                type_="requests",
                code="rate_limit_exceeded",
                headers={"retry-after": str(self._config.retry_after_s)},
            ).send(send)
            return
        self._in_flight += 1
        try:
            account = self._keys.begin(team, time.monotonic()) if team is not None else None
            charged = keys.CURRENT.set(account)
            try:
                await self._app(scope, receive, send)
            finally:
                keys.CURRENT.reset(charged)
        finally:
            self._in_flight -= 1

    @staticmethod
    async def _refuse(send: Send, path: str, why: keys.Refusal | None, said_a_key: bool) -> None:
        """401 for no key or a wrong or revoked one; 429 for a team key past a limit."""
        if why is not None and why.status == 429:
            quota = why.code == "insufficient_quota"
            await ApiError(
                429,
                why.message,
                type_="insufficient_quota" if quota else "requests",
                code=why.code,
                headers={} if quota else {"retry-after": str(int(keys.WINDOW_S))},
            ).send(send)
            return
        if why is not None:
            message = why.message
        elif said_a_key:
            message = "Incorrect API key provided"
        else:
            message = "Missing API key (Authorization: Bearer)"
            if path == "/":
                message += "; to open the dashboard, use the login link the node printed, or "
                message += "run `p2pnode dashboard` for a new one"
        await ApiError(401, message, code="invalid_api_key").send(send)


def _host_name(host: str) -> str:
    """The name part of a Host header (lower case), or the whole header if it is not
    ``name``, ``name:port``, ``[v6]`` or ``[v6]:port`` with a numeric port."""
    host = host.lower()
    if host.startswith("["):
        name, _, port = host.partition("]")
        name += "]"
    else:
        name, _, port = host.partition(":")
        port = ":" + port if port else ""
    if port and not (port.startswith(":") and port[1:].isdigit()):
        return host
    return name


def create_app(
    backend: Backend,
    api_key: str,
    config: Config | None = None,
    logins: dashboard.Login | None = None,
    ring: keys.KeyRing | None = None,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The shim as an ASGI app behind its guards: ``api_key``, a team key of
    ``ring``, or a dashboard cookie from ``logins``; a loopback Host; a slot."""
    logins = logins or dashboard.Login()
    ring = ring or keys.KeyRing(None)

    async def list_models(_request: HttpRequest) -> JSONResponse:
        data = [_model_object(backend, m, owner) for m, owner in backend.list_models()]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: HttpRequest) -> JSONResponse:
        model_id = request.path_params["model_id"]
        for m, owner in backend.list_models():
            if m == model_id:
                return JSONResponse(_model_object(backend, m, owner))
        raise _not_found(model_id)

    async def chat(request: HttpRequest) -> Response:
        return await _complete(request, "chat")

    async def completion(request: HttpRequest) -> Response:
        return await _complete(request, "completion")

    async def _complete(request: HttpRequest, kind: Literal["chat", "completion"]) -> Response:
        body = await _json_body(request)
        if body is _LEFT:
            return _NoAnswer()
        return _Generation(backend, parse_job(kind, body))

    async def _shaped(
        request: HttpRequest, parse: Callable[[object], Job], shape: Callable[[Job], Shape]
    ) -> Response:
        body = await _json_body(request)
        if body is _LEFT:
            return _NoAnswer()
        job = parse(body)
        return _Generation(backend, job, shape(job))

    async def responses(request: HttpRequest) -> Response:
        return await _shaped(request, agent_apis.parse_response_request, agent_apis.ResponseShape)

    async def messages(request: HttpRequest) -> Response:
        return await _shaped(request, agent_apis.parse_messages_request, agent_apis.MessageShape)

    async def embeddings(request: HttpRequest) -> Response:
        body = await _json_body(request)
        if body is _LEFT:
            return _NoAnswer()
        job = embeddings_api.parse_embedding_request(body)
        if not await backend.has_model(job.model):
            return _not_found(job.model).response()
        vectors: list[bytes] = []
        tokens = 0
        try:
            for part in job.requests():
                done = await generate(backend, part, _no_text)
                vectors += done.vectors
                tokens += done.prompt_tokens
        except (NetworkError, PaymentError, EngineError) as exc:
            logger.info("embeddings for %s failed: %s", job.model, exc)
            return _api_error_of(exc).response()
        return JSONResponse(job.answer(vectors, tokens))

    async def metrics(_request: HttpRequest) -> Response:
        # On the trio thread: the counters are the node's, read at one moment.
        # Prometheus' text format 0.0.4 is what prometheus_client writes.
        page = backend.prometheus()
        if team := ring.keys():
            from p2pnode.inference import key_metrics  # prometheus_client: only when scraped

            page += key_metrics.prometheus_text(team, ring.usage)
        return Response(page, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def login(request: HttpRequest) -> Response:
        return dashboard.login(request, logins)

    async def page(_request: HttpRequest) -> Response:
        return dashboard.page()

    async def asset(request: HttpRequest) -> Response:
        answer = dashboard.asset(request.path_params["name"])
        if answer is None:
            raise ApiError(404, "no such file", code="not_found")
        return answer

    async def state(_request: HttpRequest) -> Response:
        return JSONResponse(backend.dashboard() | {"keys": ring.listing()})

    async def on_api_error(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(_request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, str(exc.detail)).response()

    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completion, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/", page, methods=["GET"]),
            Route("/login", login, methods=["GET"]),
            Route("/dashboard/state", state, methods=["GET"]),
            Route("/dashboard/{name}", asset, methods=["GET"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error},
    )
    return _Guard(app, api_key, config or Config(), logins, ring)


def _not_found(model_id: str) -> ApiError:
    return ApiError(
        404,
        f"The model {model_id!r} does not exist here or on the network",
        param="model",
        code="model_not_found",
    )


def _model_object(backend: Backend, model_id: str, owner: str) -> dict[str, Any]:
    """OpenAI's model object, and (a field of ours, which clients ignore) the
    sampling a request that sets none gets, so a client can show or use it."""
    out: dict[str, Any] = {"id": model_id, "object": "model", "created": 0, "owned_by": owner}
    temperature, top_p = backend.recommended_sampling(model_id)
    if temperature is not None or top_p is not None:
        out["recommended_sampling"] = {"temperature": temperature, "top_p": top_p}
    return out


async def serve(
    backend: Backend,
    api_key: str,
    listen: str,
    config: Config | None = None,
    *,
    logins: dashboard.Login | None = None,
    ring: keys.KeyRing | None = None,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the shim on ``listen`` ("host:port") until cancelled.

    Reports its base URL (``http://host:port/v1``, the real port when 0 was
    asked) through ``task_status``; the dashboard's login links are
    ``logins``', its team keys ``ring``. Raises ConfigError if it cannot listen, or if ``listen`` is
    not a loopback address and ``config.allow_remote`` is not set; with it
    set, such an address is served after a logged warning.
    """
    config = config or Config()
    if not check_listen(listen, allow_remote=config.allow_remote):
        logger.warning(
            "the OpenAI API listens on %s, beyond this machine: anyone who can reach it may "
            "try the API key, over plain HTTP; clients must still send a loopback Host header "
            "(use an SSH tunnel or a TLS proxy that sets it)",
            listen,
        )
    hypercorn = HypercornConfig()
    hypercorn.bind = [listen]
    hypercorn.accesslog = None
    hypercorn.errorlog = logging.getLogger("p2pnode.shim")
    hypercorn.graceful_timeout = 1.0
    app = create_app(backend, api_key, config, logins, ring)
    try:
        with single_errors_ungrouped():
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(functools.partial(hypercorn_serve, app, hypercorn))  # type: ignore[arg-type]
                task_status.started(f"{binds[0]}/v1")
    except OSError as exc:
        raise ConfigError(f"cannot serve the shim on {listen}: {exc.strerror or exc}") from exc


def check_listen(listen: str, *, allow_remote: bool) -> bool:
    """Check a shim address ("host:port"); returns whether its host is loopback.

    Raises ConfigError if it is malformed, or if the host is not loopback
    (``0.0.0.0``, a LAN address, any name but ``localhost``) and
    ``allow_remote`` is false: the shim spends the node's stake for whoever
    holds the key, so it reaches beyond this machine only when asked to.
    """
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not host:
        raise ConfigError(f"shim address must be host:port, got {listen!r}")
    loopback = _is_loopback(host)
    if not loopback and not allow_remote:
        raise ConfigError(
            f"the OpenAI API address {listen} is reachable from other machines: listen on "
            "127.0.0.1, or allow it explicitly with --shim-allow-remote"
        )
    return loopback


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False  # a name we cannot vouch for
