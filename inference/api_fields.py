"""What the shim's APIs share: their error, the job a request becomes, field parsing.

See docs/architecture.md#the-openai-shim. Chat and text completions
(``inference/openai_api.py``), the Responses and Messages APIs
(``inference/agent_apis.py``) all parse a body into a :class:`Job` with
these, and fail with :class:`ApiError`, an OpenAI error body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from starlette.responses import JSONResponse
from starlette.types import Send

from p2pnode.inference.engine import Request

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
