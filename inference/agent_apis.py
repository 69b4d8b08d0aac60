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

Not yet served (a 400 naming the field): function tools and their outputs,
structured output (``text.format`` other than text), built-in tools,
reasoning, images; Anthropic's ``tools``, ``top_k`` and ``thinking``.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Final

from p2pnode.inference.api_fields import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    Job,
    bad_request,
    int_field,
    number_field,
    or_default,
    stop_field,
    text_content,
    unset_sampling,
)
from p2pnode.inference.engine import ChatMessage, Params, Request
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
    if body.get("tools"):
        raise bad_request("tools are not served yet", "tools")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("tools are not served yet", "tool_choice")
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad_request("only text output is served yet ('text.format' type 'text')", "text")
    if body.get("reasoning") is not None:
        raise bad_request("reasoning is not served", "reasoning")
    messages: list[ChatMessage] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string", "instructions")
        messages.append(ChatMessage(role="system", content=instructions))
    messages += _input_items(body.get("input"))
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
    )
    request = Request(model_id=model, kind="chat", messages=tuple(messages), params=params)
    unset = unset_sampling(body)
    return Job("chat", request, 1, stream, False, unset)


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
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of items", "input")
    out = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind != "message":
            raise bad_request(f"{where}: items of type {kind!r} are not served yet", where)
        role = _RESPONSE_ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad_request(f"{where}.role must be one of {sorted(_RESPONSE_ROLES)}", where)
        out.append(ChatMessage(role=role, content=_input_text(item.get("content"), where)))
    return out


def _input_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
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
    """A Responses API answer: one message item with one output_text part."""

    def __init__(self, job: Job) -> None:
        self._model = job.request.model_id
        self._max_tokens = job.request.params.max_tokens
        self._id = "resp_" + secrets.token_hex(12)
        self._item = "msg_" + secrets.token_hex(12)
        self._created = int(time.time())
        self._seq = 0

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
            self._event(
                "response.output_item.added",
                output_index=0,
                item=self._message("in_progress", None),
            ),
            self._event("response.content_part.added", **self._at(), part=self._part("")),
        ]

    def delta(self, text: str) -> list[dict[str, Any]]:
        return [self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[])]

    def closing(self, text: str, finish: str, usage: tuple[int, int]) -> list[dict[str, Any]]:
        final = self.whole(text, finish, usage)
        done = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [
            self._event("response.output_text.done", **self._at(), text=text, logprobs=[]),
            self._event("response.content_part.done", **self._at(), part=self._part(text)),
            self._event("response.output_item.done", output_index=0, item=final["output"][0]),
            self._event(done, response=final),
        ]

    def whole(self, text: str, finish: str, usage: tuple[int, int]) -> dict[str, Any]:
        status = "incomplete" if finish == "length" else "completed"
        item_status = "incomplete" if status == "incomplete" else "completed"
        return self._response(status, [self._message(item_status, text)], usage)

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
    for unserved in ("tools", "thinking"):
        if body.get(unserved):
            raise bad_request(f"'{unserved}' is not served yet", unserved)
    if body.get("top_k") is not None:
        # The sampler's top-k is a protocol constant (inference/sampling.py).
        raise bad_request("'top_k' cannot be set here", "top_k")
    messages: list[ChatMessage] = []
    system = body.get("system")
    if system is not None:
        messages.append(ChatMessage(role="system", content=text_content(system, "system")))
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise bad_request("'messages' must be a non-empty array", "messages")
    for i, turn in enumerate(turns):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be 'user' or 'assistant'", f"{where}.role")
        messages.append(
            ChatMessage(role=turn["role"], content=text_content(turn.get("content"), where))
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    params = Params(
        max_tokens=int_field(body["max_tokens"], "max_tokens", 1, MAX_OUTPUT_TOKENS),
        # Anthropic's range is [0, 1]; its default 1.0.
        temperature=number_field(or_default(body.get("temperature"), 1.0), "temperature", 0.0, 1.0),
        top_p=number_field(or_default(body.get("top_p"), 1.0), "top_p", 0.0, 1.0),
        stop=stop_field(body.get("stop_sequences"), "stop_sequences"),
    )
    request = Request(model_id=model, kind="chat", messages=tuple(messages), params=params)
    unset = unset_sampling(body)
    return Job("chat", request, 1, stream, False, unset)


class MessageShape:
    """An Anthropic Messages answer: one text content block."""

    def __init__(self, job: Job) -> None:
        self._model = job.request.model_id
        self._id = "msg_" + secrets.token_hex(12)

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
        return [
            {"type": "message_start", "message": self._message([], None, (0, 0))},
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}},
        ]  # fmt: skip

    def delta(self, text: str) -> list[dict[str, Any]]:
        return [{"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": text}}]  # fmt: skip

    def closing(self, text: str, finish: str, usage: tuple[int, int]) -> list[dict[str, Any]]:
        return [
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(finish), "stop_sequence": None},
                "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
            },
            {"type": "message_stop"},
        ]

    def whole(self, text: str, finish: str, usage: tuple[int, int]) -> dict[str, Any]:
        return self._message([{"type": "text", "text": text}], _stop_reason(finish), usage)

    def error_events(self, error: ApiError) -> list[dict[str, Any]]:
        kind = "overloaded_error" if error.status in (429, 503) else "api_error"
        message = error.body["error"]["message"]
        return [{"type": "error", "error": {"type": kind, "message": message}}]


def _stop_reason(finish: str) -> str:
    # (A stop sequence and the model's own end are both "stop" to the node.)
    return "max_tokens" if finish == "length" else "end_turn"
