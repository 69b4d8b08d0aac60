"""OpenAI's Responses API and Anthropic's Messages API, beside chat completions.

See docs/architecture.md#the-openai-shim. Agent frameworks call these by
default (the OpenAI Agents SDK and newer OpenAI clients the first, tools made
for Claude the second). Both are served statelessly, as Ollama serves the
Responses API: a request carries the whole conversation, and nothing is
stored, so ``previous_response_id`` and ``store: true`` are refused. Each
request becomes one chat :class:`~p2pnode.inference.api_fields.Job` and runs
through the same generation as chat completions (guards, model look-up,
recommended sampling, failover); only the body and the stream's events
differ (:class:`~p2pnode.inference.openai_api.Shape`).

Function tools, their calls and outputs in the input, and structured output
(``text.format``) are served as chat completions serves them (a grammar on
the provider; ``inference/tools.py``), and so are Anthropic's ``tools``,
``tool_use`` and ``tool_result`` blocks. Not served (a 400 naming the
field): built-in tools, reasoning, images; Anthropic's ``top_k`` and
``thinking``.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Final

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
    stop_field,
    text_content,
    tool_choice_field,
    tool_format,
    tool_list,
    tool_spec,
    unset_sampling,
)
from p2pnode.inference.engine import ChatMessage, Format, Params, Request
from p2pnode.inference.tools import ToolSpec, calls_text, results_text, with_tools
from p2pnode.protocols.offers.messages import MAX_TEMPERATURE

MAX_OUTPUT_TOKENS: Final = 1_000_000


# --- OpenAI Responses ---------------------------------------------------------------


def parse_response_request(body: object) -> Job:
    """A ``POST /v1/responses`` body as a chat job. Raises ApiError(400)."""
    body, model = _body_and_model(body)
    if body.get("previous_response_id") is not None:
        raise bad_request(
            "this server keeps no responses: send the whole conversation in 'input'",
            "previous_response_id",
        )
    if body.get("store") is True:
        raise bad_request("this server keeps no responses: 'store' must be false", "store")
    if body.get("reasoning") is not None:
        raise bad_request("reasoning is not served", "reasoning")
    messages: list[ChatMessage] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string", "instructions")
        messages.append(ChatMessage(role="system", content=instructions))
    messages += _input_items(body.get("input"))
    specs = _response_tools(body.get("tools"))
    value = body.get("tool_choice")
    named = None
    if isinstance(value, dict):
        named = value.get("name")
        if value.get("type") != "function" or not isinstance(named, str):
            raise bad_request(
                "'tool_choice' names a function as {type: function, name}", "tool_choice"
            )
    choice = tool_choice_field(value, specs, named)
    answer = _text_format(body.get("text"))
    fmt = tool_format(specs, choice, _parallel(body), answer)
    if fmt is not answer:
        messages = list(with_tools(tuple(messages), specs))
    fmt = checked(fmt, "tools" if fmt is not answer else "text")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    max_tokens = or_default(body.get("max_output_tokens"), DEFAULT_MAX_TOKENS)
    params = Params(
        max_tokens=int_field(max_tokens, "max_output_tokens", 1, MAX_OUTPUT_TOKENS),
        temperature=number_field(
            or_default(body.get("temperature"), 1.0), "temperature", 0.0, MAX_TEMPERATURE
        ),
        top_p=number_field(or_default(body.get("top_p"), 1.0), "top_p", 0.0, 1.0),
        format=fmt,
    )
    request = Request(model_id=model, kind="chat", messages=tuple(messages), params=params)
    unset = unset_sampling(body)
    return Job("chat", request, 1, stream, False, unset)


def _parallel(body: dict[str, Any]) -> bool:
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    return parallel


def _response_tools(value: object) -> list[ToolSpec]:
    """The Responses API's function tools (flat: type, name, description, parameters)."""

    def spec_of(tool: Any) -> ToolSpec:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"only function tools are served, not {kind!r}", "tools")
        return tool_spec(tool.get("name"), tool.get("description"), tool.get("parameters"), "tools")

    return tool_list(value, spec_of)


def _text_format(value: object) -> Format | None:
    """``text.format``: text, json_object, or json_schema (flat: name, schema, strict)."""
    if value is None:
        return None
    fmt = value.get("format") if isinstance(value, dict) else None
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_format()
    if kind == "json_schema":
        return schema_format(fmt.get("schema"), "text")
    raise bad_request("'text.format' must be of type text, json_object or json_schema", "text")


def _body_and_model(body: object) -> tuple[dict[str, Any], str]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", "model")
    return body, model


_RESPONSE_ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system",
                          "developer": "system"}  # fmt: skip


def _input_items(value: object) -> list[ChatMessage]:
    """The input as chat turns: function calls join the assistant turn they
    follow (or make one), consecutive outputs make one user turn."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of items", "input")
    turns = _Turns()
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise bad_request(f"{where}: a function_call needs name and arguments", where)
            turns.call(name, arguments)
        elif kind == "function_call_output":
            turns.result(_input_text(item.get("output"), where))
        elif kind == "message":
            given = item.get("role")
            role = _RESPONSE_ROLES.get(given) if isinstance(given, str) else None
            if role is None:
                raise bad_request(f"{where}.role must be one of {sorted(_RESPONSE_ROLES)}", where)
            turns.say(role, _input_text(item.get("content"), where))
        else:
            raise bad_request(f"{where}: items of type {kind!r} are not served", where)
    return turns.done()


class _Turns:
    """Chat turns built from an API's items, with tool calls and results
    written as the model reads them (``inference/tools.py``)."""

    def __init__(self) -> None:
        self._out: list[ChatMessage] = []
        self._calls: list[tuple[str, str]] = []
        self._results: list[str] = []

    def say(self, role: str, text: str) -> None:
        self._flush()
        self._out.append(ChatMessage(role=role, content=text))

    def call(self, name: str, arguments: str) -> None:
        if self._results:
            self._flush()
        self._calls.append((name, arguments))

    def result(self, text: str) -> None:
        if self._calls:
            self._flush()
        self._results.append(text)

    def done(self) -> list[ChatMessage]:
        self._flush()
        return self._out

    def _flush(self) -> None:
        if self._calls:
            content = ""
            if self._out and self._out[-1].role == "assistant":
                content = self._out.pop().content
            self._out.append(
                ChatMessage(role="assistant", content=calls_text(content, self._calls))
            )
            self._calls = []
        if self._results:
            self._out.append(ChatMessage(role="user", content=results_text(self._results)))
            self._results = []


def _input_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise bad_request(f"{where}.content is required", where)
    if not isinstance(value, list):
        raise bad_request(f"{where}.content must be a string or an array of parts", where)
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
            raise bad_request(f"{where}.content: only text parts are served", f"{where}.content")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.content: a text part needs 'text'", f"{where}.content")
        texts.append(text)
    return "".join(texts)


class ResponseShape:
    """A Responses API answer: a message item with one output_text part, or a
    function_call item per tool call."""

    def __init__(self, job: Job) -> None:
        self._model = job.request.model_id
        self._max_tokens = job.request.params.max_tokens
        self._id = "resp_" + secrets.token_hex(12)
        self._item = "msg_" + secrets.token_hex(12)
        self._created = int(time.time())
        self._seq = 0
        self._text_open = False
        # Streamed calls: (item id, call id, name, arguments so far), by index.
        self._calls: list[tuple[str, str, str, str]] = []
        self._call_open = False

    def _response(
        self, status: str, output: list[dict[str, Any]], usage: tuple[int, int] | None
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "model": self._model,
            "output": output,
            "incomplete_details": incomplete,
            "error": None,
            "instructions": None,
            "max_output_tokens": self._max_tokens,
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "store": False,
            "text": {"format": {"type": "text"}},
            "usage": None if usage is None else _response_usage(usage),
        }

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self._part(text)]
        return {"type": "message", "id": self._item, "status": status, "role": "assistant",
                "content": content}  # fmt: skip

    def _call_item(self, index: int, status: str) -> dict[str, Any]:
        item, call, name, arguments = self._calls[index]
        return {"type": "function_call", "id": item, "call_id": call, "name": name,
                "arguments": arguments, "status": status}  # fmt: skip

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _at(self) -> dict[str, Any]:
        return {"item_id": self._item, "output_index": 0, "content_index": 0}

    def opening(self) -> list[dict[str, Any]]:
        started = self._response("in_progress", [], None)
        return [
            self._event("response.created", response=started),
            self._event("response.in_progress", response=started),
        ]

    def delta(self, text: str) -> list[dict[str, Any]]:
        events = []
        if not self._text_open:
            self._text_open = True
            events = [
                self._event(
                    "response.output_item.added",
                    output_index=0,
                    item=self._message("in_progress", None),
                ),
                self._event("response.content_part.added", **self._at(), part=self._part("")),
            ]
        return [
            *events,
            self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[]),
        ]

    def call_start(self, index: int, name: str) -> list[dict[str, Any]]:
        events = self._close_call()
        self._calls.append(("fc_" + secrets.token_hex(12), call_id(), name, ""))
        self._call_open = True
        item = self._call_item(index, "in_progress")
        return [*events, self._event("response.output_item.added", output_index=index, item=item)]

    def call_arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        item, call, name, arguments = self._calls[index]
        self._calls[index] = (item, call, name, arguments + text)
        return [
            self._event(
                "response.function_call_arguments.delta",
                item_id=item,
                output_index=index,
                delta=text,
            )
        ]

    def _close_call(self) -> list[dict[str, Any]]:
        if not self._call_open:
            return []
        self._call_open = False
        index = len(self._calls) - 1
        item, _, name, arguments = self._calls[index]
        return [
            self._event(
                "response.function_call_arguments.done",
                item_id=item,
                output_index=index,
                name=name,
                arguments=arguments,
            ),
            self._event(
                "response.output_item.done",
                output_index=index,
                item=self._call_item(index, "completed"),
            ),
        ]

    def closing(
        self, text: str, calls: list[tuple[str, str]], finish: str, usage: tuple[int, int]
    ) -> list[dict[str, Any]]:
        final = self.whole(text, calls, finish, usage)
        done = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        events = self._close_call()
        if self._text_open:
            events += [
                self._event("response.output_text.done", **self._at(), text=text, logprobs=[]),
                self._event("response.content_part.done", **self._at(), part=self._part(text)),
                self._event("response.output_item.done", output_index=0, item=final["output"][0]),
            ]
        return [*events, self._event(done, response=final)]

    def whole(
        self, text: str, calls: list[tuple[str, str]], finish: str, usage: tuple[int, int]
    ) -> dict[str, Any]:
        status = "incomplete" if finish == "length" else "completed"
        if calls:
            for index, (name, arguments) in enumerate(calls):
                if index == len(self._calls):  # not streamed: ids are made here
                    self._calls.append(("fc_" + secrets.token_hex(12), call_id(), name, ""))
                item, call, _, _ = self._calls[index]
                self._calls[index] = (item, call, name, arguments)
            output = [self._call_item(i, "completed") for i in range(len(calls))]
            return self._response(status, output, usage)
        return self._response(status, [self._message(status, text)], usage)

    def error_events(self, error: ApiError) -> list[dict[str, Any]]:
        # The error, then the response as failed: the openai client's stream
        # helpers wait for a terminal response event.
        inner = error.body["error"]
        failed = self._response("failed", [], None)
        failed["error"] = {"code": inner["code"] or "server_error", "message": inner["message"]}
        return [
            self._event(
                "error", code=inner["code"], message=inner["message"], param=inner["param"]
            ),
            self._event("response.failed", response=failed),
        ]


def _response_usage(usage: tuple[int, int]) -> dict[str, Any]:
    prompt, completion = usage
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


# --- Anthropic Messages -------------------------------------------------------------


def parse_messages_request(body: object) -> Job:
    """A ``POST /v1/messages`` body (Anthropic's API) as a chat job. Raises ApiError(400)."""
    body, model = _body_and_model(body)
    if "max_tokens" not in body:
        raise bad_request("'max_tokens' is required", "max_tokens")
    if body.get("thinking"):
        raise bad_request("'thinking' is not served", "thinking")
    if body.get("top_k") is not None:
        # The sampler's top-k is a protocol constant (inference/sampling.py).
        raise bad_request("'top_k' cannot be set here", "top_k")
    turns = _Turns()
    system = body.get("system")
    if system is not None:
        turns.say("system", text_content(system, "system"))
    given = body.get("messages")
    if not isinstance(given, list) or not given:
        raise bad_request("'messages' must be a non-empty array", "messages")
    for i, turn in enumerate(given):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant'", f"{where}.role")
        _blocks(turns, turn["role"], turn.get("content"), where)
    specs = _anthropic_tools(body.get("tools"))
    choice, parallel = _anthropic_choice(body.get("tool_choice"), specs)
    fmt = tool_format(specs, choice, parallel, None)
    messages = turns.done()
    if fmt is not None:
        messages = list(with_tools(tuple(messages), specs))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    params = Params(
        max_tokens=int_field(body["max_tokens"], "max_tokens", 1, MAX_OUTPUT_TOKENS),
        # Anthropic's range is [0, 1]; its default 1.0.
        temperature=number_field(or_default(body.get("temperature"), 1.0), "temperature", 0.0, 1.0),
        top_p=number_field(or_default(body.get("top_p"), 1.0), "top_p", 0.0, 1.0),
        stop=stop_field(body.get("stop_sequences"), "stop_sequences"),
        format=checked(fmt, "tools"),
    )
    request = Request(model_id=model, kind="chat", messages=tuple(messages), params=params)
    unset = unset_sampling(body)
    return Job("chat", request, 1, stream, False, unset)


def _blocks(turns: _Turns, role: str, content: object, where: str) -> None:
    """One Anthropic turn: its text, ``tool_use`` blocks (assistant) and
    ``tool_result`` blocks (user), in order."""
    if isinstance(content, str):
        turns.say(role, content)
        return
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of blocks", where)
    texts: list[str] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
            continue
        if texts:
            turns.say(role, "".join(texts))
            texts = []
        if kind == "tool_use" and role == "assistant":
            name, value = block.get("name"), block.get("input", {})
            if not isinstance(name, str):
                raise bad_request(f"{where}: a tool_use block needs a name", where)
            turns.call(name, json.dumps(value, ensure_ascii=False))
        elif kind == "tool_result" and role == "user":
            result = block.get("content", "")
            turns.result(text_content(result, where) if result else "")
        else:
            raise bad_request(f"{where}.content: {kind!r} blocks are not served here", where)
    if texts:
        turns.say(role, "".join(texts))


def _anthropic_tools(value: object) -> list[ToolSpec]:
    """Anthropic's client tools (name, description, input_schema); its server tools are refused."""

    def spec_of(tool: Any) -> ToolSpec:
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"only client tools are served, not {kind!r}", "tools")
        return tool_spec(
            tool.get("name"), tool.get("description"), tool.get("input_schema"), "tools"
        )

    return tool_list(value, spec_of)


_ANTHROPIC_CHOICES: Final = {"auto": "auto", "any": "required", "none": "none"}


def _anthropic_choice(value: object, specs: list[ToolSpec]) -> tuple[str, bool]:
    """(tool choice as ours, parallel calls allowed) from Anthropic's tool_choice object."""
    if value is None:
        return tool_choice_field(None, specs, None), True
    if not isinstance(value, dict):
        raise bad_request("'tool_choice' must be an object", "tool_choice")
    parallel = not value.get("disable_parallel_tool_use", False)
    kind = value.get("type")
    if not isinstance(kind, str):
        raise bad_request("'tool_choice' type is auto, any, tool or none", "tool_choice")
    if kind == "tool":
        name = value.get("name")
        if not isinstance(name, str):
            raise bad_request("'tool_choice' of type tool needs a name", "tool_choice")
        return tool_choice_field(name, specs, name), parallel
    if kind not in _ANTHROPIC_CHOICES:
        raise bad_request("'tool_choice' type is auto, any, tool or none", "tool_choice")
    return tool_choice_field(_ANTHROPIC_CHOICES[str(kind)], specs, None), parallel


class MessageShape:
    """An Anthropic Messages answer: a text content block, or a tool_use block per call."""

    def __init__(self, job: Job) -> None:
        self._model = job.request.model_id
        self._id = "msg_" + secrets.token_hex(12)
        self._open: int | None = None  # the content block being streamed
        self._blocks = 0
        self._ids: list[str] = []

    def _message(
        self, content: list[dict[str, Any]], stop: str | None, usage: tuple[int, int]
    ) -> dict[str, Any]:
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
        }

    def opening(self) -> list[dict[str, Any]]:
        return [{"type": "message_start", "message": self._message([], None, (0, 0))}]

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._stop()
        self._open = self._blocks
        self._blocks += 1
        return [
            *events,
            {"type": "content_block_start", "index": self._open, "content_block": block},
        ]

    def _stop(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        return [{"type": "content_block_stop", "index": index}]

    def delta(self, text: str) -> list[dict[str, Any]]:
        events = [] if self._open is not None else self._start({"type": "text", "text": ""})
        return [*events, {"type": "content_block_delta", "index": self._open,
                          "delta": {"type": "text_delta", "text": text}}]  # fmt: skip

    def call_start(self, index: int, name: str) -> list[dict[str, Any]]:
        self._ids.append(_tool_use_id())
        return self._start({"type": "tool_use", "id": self._ids[-1], "name": name, "input": {}})

    def call_arguments(self, index: int, text: str) -> list[dict[str, Any]]:
        return [{"type": "content_block_delta", "index": self._open,
                 "delta": {"type": "input_json_delta", "partial_json": text}}]  # fmt: skip

    def closing(
        self, text: str, calls: list[tuple[str, str]], finish: str, usage: tuple[int, int]
    ) -> list[dict[str, Any]]:
        # A stream with no text at all still has its (empty) text block.
        events = (
            self._stop()
            if self._blocks
            else [*self._start({"type": "text", "text": ""}), *self._stop()]
        )
        return [
            *events,
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(finish, calls), "stop_sequence": None},
                "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
            },
            {"type": "message_stop"},
        ]

    def whole(
        self, text: str, calls: list[tuple[str, str]], finish: str, usage: tuple[int, int]
    ) -> dict[str, Any]:
        if not calls:
            content = [{"type": "text", "text": text}]
        else:
            self._ids += [_tool_use_id() for _ in calls[len(self._ids) :]]
            content = [
                {
                    "type": "tool_use",
                    "id": self._ids[i],
                    "name": name,
                    "input": json.loads(arguments),
                }
                for i, (name, arguments) in enumerate(calls)
            ]
        return self._message(content, _stop_reason(finish, calls), usage)

    def error_events(self, error: ApiError) -> list[dict[str, Any]]:
        kind = "overloaded_error" if error.status in (429, 503) else "api_error"
        message = error.body["error"]["message"]
        return [{"type": "error", "error": {"type": kind, "message": message}}]


def _tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def _stop_reason(finish: str, calls: list[tuple[str, str]]) -> str:
    # (A stop sequence and the model's own end are both "stop" to the node.)
    if finish == "length":
        return "max_tokens"
    return "tool_use" if calls else "end_turn"
