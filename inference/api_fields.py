"""What the shim's APIs share: their error, the job a request becomes, field parsing.

See docs/architecture.md#the-openai-shim. Chat and text completions
(``inference/openai_api.py``), the Responses and Messages APIs
(``inference/agent_apis.py``) all parse a body into a :class:`Job` with
these, and fail with :class:`ApiError`, an OpenAI error body.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from starlette.responses import JSONResponse
from starlette.types import Send

from p2pnode.errors import BadRequestError
from p2pnode.inference import grammar
from p2pnode.inference.engine import JSON_OBJECT, JSON_SCHEMA, TOOLS, Format, Request, Tool
from p2pnode.inference.tools import TOOL_NAME, ToolSpec

DEFAULT_MAX_TOKENS: Final = 512
"""``max_tokens`` when a request leaves it out."""


class ApiError(Exception):
    """An error the client gets as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)

    async def send(self, send: Send) -> None:
        """Answer with this error straight through ASGI (for the guards before the routes)."""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send_json(send, self.status, self.body, headers)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True, slots=True)
class Job:
    """A parsed completion request."""

    kind: Literal["chat", "completion"]
    request: Request
    n: int
    stream: bool
    include_usage: bool
    # Sampling fields the client left out: the model's recommendation fills
    # them (:meth:`with_recommended`), else OpenAI's defaults stand.
    unset: frozenset[str] = frozenset()

    @property
    def reads_calls(self) -> bool:
        """Whether the answer may be tool calls (to be read back out of its text)."""
        fmt = self.request.params.format
        return fmt is not None and fmt.kind == TOOLS

    def with_recommended(self, temperature: float | None, top_p: float | None) -> Job:
        """This job with the model's recommended sampling where the client set none."""
        params = self.request.params
        if temperature is not None and "temperature" in self.unset:
            params = replace(params, temperature=temperature)
        if top_p is not None and "top_p" in self.unset:
            params = replace(params, top_p=top_p)
        return replace(self, request=replace(self.request, params=params))


def unset_sampling(body: dict[str, Any]) -> frozenset[str]:
    """The sampling fields a body leaves out (null counts as left out, as OpenAI
    reads it): what the model's recommendation may fill (:meth:`Job.with_recommended`)."""
    return frozenset(f for f in ("temperature", "top_p") if body.get(f) is None)


def or_default(value: object, default: float) -> object:
    return default if value is None else value


def text_content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad_request(
                    f"{where}.content: only text parts are supported", f"{where}.content"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.content: a text part needs 'text'", f"{where}.content")
            parts.append(text)
        return "".join(parts)
    raise bad_request(
        f"{where}.content must be a string or an array of text parts", f"{where}.content"
    )


def stop_field(value: object, name: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise bad_request(f"'{name}' must be a string or an array of up to 4 strings", name)


def int_field(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer in [{low}, {high}]", name)
    return value


def number_field(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number in [{low:g}, {high:g}]", name)
    return float(value)


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})


# --- output formats: structured answers and tools -------------------------------

ANY_OBJECT: Final = {"type": "object"}
"""A function's parameters when its tool gives none."""


def schema_format(schema: object, param: str) -> Format:
    """A JSON-schema format (``schema`` from the client: a JSON object)."""
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be a JSON schema object", param)
    return Format(kind=JSON_SCHEMA, schema=json.dumps(schema, ensure_ascii=False))


def tool_format(
    specs: list[ToolSpec], choice: str, parallel: bool, answer: Format | None
) -> Format | None:
    """The format of an answer that may call ``specs`` (None under tool_choice none:
    then the answer is ``answer``'s). ``answer``: what a reply that calls
    nothing must be, honoured under tool_choice auto."""
    if not specs or choice == "none":
        return answer
    schema = ""
    if answer is not None and choice == "auto":
        schema = answer.schema or json.dumps(ANY_OBJECT)
    tools = tuple(
        Tool(name=s.name, parameters=json.dumps(s.parameters, ensure_ascii=False)) for s in specs
    )
    return Format(kind=TOOLS, tools=tools, tool_choice=choice, parallel=parallel, schema=schema)


def json_object_format() -> Format:
    return Format(kind=JSON_OBJECT)


def checked(fmt: Format | None, param: str) -> Format | None:
    """``fmt``, once a grammar can be built for it (else a 400 naming ``param``)."""
    if fmt is not None:
        try:
            grammar.gbnf_of(fmt)
        except BadRequestError as exc:
            raise bad_request(str(exc), param) from exc
    return fmt


def tool_spec(name: object, description: object, parameters: object, where: str) -> ToolSpec:
    """A function tool as a client describes it (its three fields, any API)."""
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise bad_request(f"{where}: a tool's name is 1-64 of A-Z a-z 0-9 _ -", where)
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}: a tool's description is a string", where)
    if parameters is None:
        parameters = ANY_OBJECT
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}: a tool's parameters are a JSON schema object", where)
    return ToolSpec(name=name, description=description or "", parameters=parameters)


def tool_list(value: object, spec_of: Callable[[Any], ToolSpec]) -> list[ToolSpec]:
    """The ``tools`` of a request, each read by its API's ``spec_of``."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > grammar.MAX_TOOLS:
        raise bad_request(f"'tools' must be an array of at most {grammar.MAX_TOOLS} tools", "tools")
    specs = [spec_of(tool) for tool in value]
    if len({s.name for s in specs}) != len(specs):
        raise bad_request("'tools' names a tool twice", "tools")
    return specs


def tool_choice_field(value: object, specs: list[ToolSpec], named: str | None) -> str:
    """ "none", "auto", "required" or a tool's name, from a client's value
    (``named``: the name the API's object form gave, already read out)."""
    if value is None:
        return "auto" if specs else "none"
    choice = named if named is not None else value
    if choice in ("none", "auto"):
        return str(choice)
    if not specs:
        raise bad_request("'tool_choice' needs tools", "tool_choice")
    if choice == "required" or choice in [s.name for s in specs]:
        return str(choice)
    raise bad_request(
        "'tool_choice' is none, auto, required or a named function among the tools",
        "tool_choice",
    )


def call_id() -> str:
    """A new id for a tool call (OpenAI's look: call_ and 24 characters)."""
    return "call_" + secrets.token_hex(12)
