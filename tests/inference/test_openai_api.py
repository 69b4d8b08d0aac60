"""The shim's guards against its own clients: body cap, requests in flight, bind address.

These run the shim (hypercorn, Starlette) on a free loopback port, or its ASGI
app directly, in front of a scripted node: the guards are the shim's, the node
behind it does not matter, and a scripted one lets a test hold a request in
flight for as long as it needs.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
import httpx
import pytest
import trio

from p2pnode.errors import BadRequestError, ConfigError, NoProviderError, SpendLimitError
from p2pnode.inference import openai_api
from p2pnode.inference.engine import Request, TokenLogprob

KEY = "sk-test-shim"
AUTH = {"Authorization": f"Bearer {KEY}"}
BOUND_S = 10
CHAT = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}


@dataclass(frozen=True)
class Outcome:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    provider: str = "scripted-peer"
    vectors: tuple[bytes, ...] = ()


class ScriptedNode:
    """A shim backend: "fast" answers at once, "slow" says one word and waits for
    cancellation, and looking up "lookup-forever" never ends."""

    def __init__(self) -> None:
        self.generation_cancelled = trio.Event()
        self.lookup_started = trio.Event()
        self.lookup_cancelled = trio.Event()
        self.requests: list[Request] = []

    def list_models(self) -> list[tuple[str, str]]:
        return [("fast", "network"), ("slow", "network")]

    def recommended_sampling(self, model_id: str) -> tuple[float | None, float | None]:
        # "fast" comes with its authors' sampling, as the bundled model does.
        return (0.2, 0.9) if model_id == "fast" else (None, None)

    def prometheus(self) -> bytes:
        return b"# scripted\n"

    def price_per_s(self, provider: str, model_id: str) -> int:
        # "": the highest on offer (what a streaming answer is held at).
        return 10**15 if provider in ("scripted-peer", "") else 0

    def dashboard(self) -> dict[str, Any]:
        return {"node": {"peer_id": "scripted"}}

    async def has_model(self, model_id: str) -> bool:
        if model_id == "lookup-forever":
            self.lookup_started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.lookup_cancelled.set()
        return model_id in (
            "fast", "plain", "slow", "paced", "limited", "unpaid", "dies", "badbias"
        )  # fmt: skip

    async def generate(
        self,
        request: Request,
        deliver: Callable[[str, int], Awaitable[None]],
        *,
        logprobs: Callable[[tuple[TokenLogprob, ...]], None] | None = None,
    ) -> Outcome:
        self.requests.append(request)
        if logprobs is not None:  # what a provider that shows them sends with "hello"
            logprobs((TokenLogprob(b"hello", -0.25, ((b"hello", -0.25), (b"hi", -1.5))),))
        if request.model_id == "limited":  # every provider said "slow down"
            raise NoProviderError("every provider is rate-limiting us", rate_limited=True)
        if request.model_id == "unpaid":
            raise SpendLimitError("spend limit reached")
        if request.model_id == "badbias":  # this node's own engine refused the request
            raise BadRequestError("logit_bias names a token id outside this model's 0-9")
        await deliver("hello", 1)
        if request.model_id == "dies":  # the last provider failed mid-answer
            raise NoProviderError("no provider could finish it")
        if request.model_id == "paced":  # nine more words, 20 ms apart
            for word in (" two", " three", " four", " five", " six", " seven", " eight"):
                await trio.sleep(0.02)
                await deliver(word, 1)
            return Outcome("stop", 1, 8)
        if request.model_id == "slow":
            try:
                await trio.sleep_forever()
            finally:
                self.generation_cancelled.set()
        return Outcome("stop", 1, 1)


@pytest.fixture
def node() -> ScriptedNode:
    return ScriptedNode()


async def _serve(
    nursery: trio.Nursery, node: ScriptedNode, config: openai_api.Config | None = None
) -> str:
    url = await nursery.start(functools.partial(openai_api.serve, node, KEY, "127.0.0.1:0", config))
    assert isinstance(url, str)
    return url


# --- the body cap, enforced while reading ------------------------------------


class Sender:
    """An ASGI ``receive`` that offers ``total`` bytes of body in 64 KiB messages,
    counting what the app pulled."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.pulled = 0

    async def __call__(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if self.left <= 0:
            await trio.sleep_forever()  # only a disconnect could come now
        chunk = min(self.left, 64 * 1024)
        self.left -= chunk
        self.pulled += chunk
        return {"type": "http.request", "body": b" " * chunk, "more_body": self.left > 0}


def _http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """An ASGI HTTP scope as the server hands one to the app, from a loopback client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }


async def _asgi_post(receive: Sender, headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
    """POST /v1/chat/completions straight into the app; (status, JSON body)."""
    app = openai_api.create_app(ScriptedNode(), KEY)
    loopback = [(b"host", b"127.0.0.1:8080"), (b"authorization", f"Bearer {KEY}".encode())]
    scope = _http_scope("POST", "/v1/chat/completions", loopback + headers)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(BOUND_S):
        await app(scope, receive, send)  # type: ignore[arg-type]
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body)


def _is_too_large(status: int, body: Any) -> bool:
    error = body["error"]
    return status == 413 and error["type"] == "invalid_request_error" and "over" in error["message"]


async def test_a_body_without_length_is_cut_at_the_cap() -> None:
    body = Sender(16 * openai_api.MAX_BODY)
    status, answer = await _asgi_post(body, [])
    assert _is_too_large(status, answer)
    # It stopped reading at the first message past the cap.
    assert body.pulled <= openai_api.MAX_BODY + 64 * 1024


async def test_a_lying_content_length_does_not_lift_the_cap() -> None:
    body = Sender(16 * openai_api.MAX_BODY)
    status, answer = await _asgi_post(body, [(b"content-length", b"10")])
    assert _is_too_large(status, answer)
    assert body.pulled <= openai_api.MAX_BODY + 64 * 1024


async def test_a_declared_length_over_the_cap_is_refused_unread() -> None:
    body = Sender(openai_api.MAX_BODY + 1)
    status, answer = await _asgi_post(
        body, [(b"content-length", str(openai_api.MAX_BODY + 1).encode())]
    )
    assert _is_too_large(status, answer)
    assert body.pulled == 0
    huge = Sender(1)
    status, answer = await _asgi_post(huge, [(b"content-length", b"9" * 5000)])
    assert _is_too_large(status, answer)


async def test_a_body_of_exactly_the_cap_is_read() -> None:
    # A JSON body padded with spaces to MAX_BODY bytes: read, parsed, answered.
    status, answer = await _asgi_post(Sender(openai_api.MAX_BODY), [])
    assert status == 400  # all spaces: not JSON, but not too large either
    assert "not valid JSON" in answer["error"]["message"]


async def test_a_chunked_body_that_never_ends_gets_413(node: ScriptedNode) -> None:
    """Over real HTTP: 413 arrives while the client is still sending."""
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, node)
        port = int(url.split(":")[2].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="POST",
            target="/v1/chat/completions",
            headers=[
                ("Host", f"127.0.0.1:{port}"),
                ("Authorization", f"Bearer {KEY}"),
                ("Transfer-Encoding", "chunked"),
            ],
        )
        events: list[Any] = []

        async def send_body() -> None:
            # 8 MiB and no end of body: a shim that waits for the end never answers.
            try:
                await stream.send_all(client.send(head) or b"")
                for _ in range(128):
                    await stream.send_all(client.send(h11.Data(data=b"x" * 65536)) or b"")
            except trio.BrokenResourceError:
                pass  # the shim answered and closed

        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as talk:
                talk.start_soon(send_body)
                while not events or not isinstance(events[-1], h11.EndOfMessage):
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some())
                    else:
                        events.append(event)
                talk.cancel_scope.cancel()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    response, *data = events[:-1]
    assert response.status_code == 413
    answer = json.loads(b"".join(bytes(d.data) for d in data))
    assert answer["error"]["code"] == "request_too_large"


# --- requests in flight ----------------------------------------------------------


async def test_requests_beyond_the_bound_get_429_and_a_leaving_client_frees_its_slot(
    node: ScriptedNode,
) -> None:
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, node, openai_api.Config(max_in_flight=1))
        async with httpx.AsyncClient(headers=AUTH, timeout=BOUND_S) as http:
            with trio.fail_after(BOUND_S):
                held = await _open_slow_stream(url)  # holds the one slot
                refused = await http.post(f"{url}/chat/completions", json=CHAT)
                assert refused.status_code == 429
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "rate_limit_exceeded"
                assert (await http.get(f"{url}/models")).status_code == 429
                # The client hangs up: its generation stops and its slot frees.
                await held.aclose()
                await node.generation_cancelled.wait()
                answer = await _post_until_admitted(http, url)
        nursery.cancel_scope.cancel()
    assert answer.json()["choices"][0]["message"]["content"] == "hello"


async def _open_slow_stream(url: str) -> trio.SocketStream:
    """A streamed chat of the "slow" model, open until its first token has arrived.

    Raw HTTP (h11), so that the connection closes exactly when the test says.
    """
    port = int(url.split(":")[2].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = h11.Connection(h11.CLIENT)
    body = json.dumps({**CHAT, "model": "slow", "stream": True}).encode()
    head = h11.Request(
        method="POST",
        target="/v1/chat/completions",
        headers=[
            ("Host", f"127.0.0.1:{port}"),
            ("Authorization", f"Bearer {KEY}"),
            ("Content-Length", str(len(body))),
        ],
    )
    for message in (head, h11.Data(data=body), h11.EndOfMessage()):
        await stream.send_all(client.send(message) or b"")
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Response):
            assert event.status_code == 200
        elif isinstance(event, h11.Data) and b"hello" in bytes(event.data):
            return stream


async def test_a_client_that_leaves_during_the_model_lookup_frees_its_slot(
    node: ScriptedNode,
) -> None:
    async with trio.open_nursery() as nursery:
        url = await _serve(nursery, node, openai_api.Config(max_in_flight=1))
        async with httpx.AsyncClient(headers=AUTH, timeout=BOUND_S) as http:
            with trio.fail_after(BOUND_S):
                async with trio.open_nursery() as client:
                    lookup = {**CHAT, "model": "lookup-forever"}
                    post = functools.partial(http.post, json=lookup)
                    client.start_soon(post, f"{url}/chat/completions")
                    await node.lookup_started.wait()
                    assert (await http.get(f"{url}/models")).status_code == 429
                    client.cancel_scope.cancel()  # the client leaves
                await node.lookup_cancelled.wait()
                answer = await _post_until_admitted(http, url)
        nursery.cancel_scope.cancel()
    assert answer.status_code == 200


async def _post_until_admitted(http: httpx.AsyncClient, url: str) -> httpx.Response:
    """POST a chat until it is not refused for want of a slot (the caller bounds the wait).

    The slot frees a few scheduler turns after the generation is cancelled,
    which a test cannot observe from outside the shim.
    """
    while True:
        answer = await http.post(f"{url}/chat/completions", json=CHAT)
        if answer.status_code != 429:
            assert answer.status_code == 200, answer.text
            return answer
        await trio.sleep(0.01)


# --- where it listens ------------------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.2:1", "[::1]:8080", "localhost:0"])
def test_loopback_addresses_are_accepted(listen: str) -> None:
    assert openai_api.check_listen(listen, allow_remote=False)


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:8080", "[::]:8080", "192.168.1.20:8080", "node.example:8080"]
)
def test_other_addresses_need_allow_remote(listen: str) -> None:
    with pytest.raises(ConfigError, match="--shim-allow-remote"):
        openai_api.check_listen(listen, allow_remote=False)
    assert not openai_api.check_listen(listen, allow_remote=True)


async def test_serving_beyond_loopback_is_refused_unless_allowed(
    node: ScriptedNode, caplog: pytest.LogCaptureFixture
) -> None:
    # Refused before it listens (a shim that serves instead would run until the deadline).
    with trio.fail_after(BOUND_S), pytest.raises(ConfigError, match="reachable from other"):
        await openai_api.serve(node, KEY, "0.0.0.0:0")
    async with trio.open_nursery() as nursery:
        with caplog.at_level(logging.WARNING, logger="p2pnode.inference.openai_api"):
            url = await nursery.start(
                functools.partial(
                    openai_api.serve,
                    node,
                    KEY,
                    "0.0.0.0:0",
                    openai_api.Config(allow_remote=True),
                )
            )
        port = url.split(":")[2].split("/")[0]
        async with httpx.AsyncClient(headers=AUTH, timeout=BOUND_S) as http:
            # Still the same rules: the key, and a loopback Host header.
            base = f"http://127.0.0.1:{port}/v1"
            assert (await http.get(f"{base}/models")).status_code == 200
            foreign = await http.get(f"{base}/models", headers={"Host": f"10.0.0.2:{port}"})
            assert foreign.status_code == 403
            keyless = await http.get(f"{base}/models", headers={"Authorization": ""})
            assert keyless.status_code == 401
        nursery.cancel_scope.cancel()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "0.0.0.0:0" in warning.getMessage()
    assert "beyond this machine" in warning.getMessage()


async def _asgi_get_models(host: bytes | None) -> int:
    """GET /v1/models straight into the app with this Host header (None: none); the status."""
    app = openai_api.create_app(ScriptedNode(), KEY)
    headers = [(b"authorization", f"Bearer {KEY}".encode())]
    if host is not None:
        headers.append((b"host", host))
    scope = _http_scope("GET", "/v1/models", headers)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(BOUND_S):
        await app(scope, receive, send)  # type: ignore[arg-type]
    status: int = sent[0]["status"]
    if status == 403:
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert body["error"]["code"] == "forbidden_host"
    return status


@pytest.mark.parametrize(
    "host",
    [
        b"127.0.0.1:8080",
        b"127.0.0.1",
        b"localhost:8080",
        b"LocalHost:8080",
        b"[::1]:8080",
        b"[::1]",
    ],
)
async def test_a_loopback_host_header_is_served(host: bytes) -> None:
    assert await _asgi_get_models(host) == 200


@pytest.mark.parametrize(
    "host",
    [
        None,  # no Host at all
        b"",
        b"evil.example:8080",
        b"127.0.0.1.evil.example",  # a rebinding name that starts like loopback
        b"127.0.0.1.evil.example:8080",
        b"localhost.evil.example",
        b"[::1].evil.example",
        b"127.0.0.1:8080@evil.example",  # not a port
        b"127.0.0.1:80:80",
        b"[::1]x",
        b"10.0.0.1:8080",
    ],
)
async def test_any_other_host_header_is_refused(host: bytes | None) -> None:
    # The DNS-rebinding guard: a page on another origin may reach 127.0.0.1,
    # but its browser sends that origin's name as Host.
    assert await _asgi_get_models(host) == 403


# --- errors of the node behind the shim, before and after the headers -----------


async def _post(
    body: dict[str, Any], path: str = "/v1/chat/completions", node: ScriptedNode | None = None
) -> tuple[int, bytes]:
    """POST ``body`` straight into the app; (status, raw body)."""
    app = openai_api.create_app(node or ScriptedNode(), KEY)
    loopback = [(b"host", b"127.0.0.1:8080"), (b"authorization", f"Bearer {KEY}".encode())]
    scope = _http_scope("POST", path, [*loopback, (b"content-type", b"application/json")])
    data = json.dumps(body).encode()
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if given:
            await trio.sleep_forever()  # only a disconnect could come now
        given = True
        return {"type": "http.request", "body": data, "more_body": False}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(BOUND_S):
        await app(scope, receive, send)  # type: ignore[arg-type]
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _events(raw: bytes) -> list[Any]:
    datas = [line[len(b"data: ") :] for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    return [d.decode() if d == b"[DONE]" else json.loads(d) for d in datas]


@pytest.mark.parametrize("stream", [False, True])
async def test_every_provider_rate_limiting_is_a_429_before_any_text(stream: bool) -> None:
    status, raw = await _post({**CHAT, "model": "limited", "stream": stream})
    assert status == 429
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"


async def test_a_spend_limit_is_a_429_insufficient_quota() -> None:
    status, raw = await _post({**CHAT, "model": "unpaid"})
    assert status == 429
    assert json.loads(raw)["error"]["code"] == "insufficient_quota"


async def test_a_failure_after_text_arrives_as_an_error_event_then_done() -> None:
    # The 200 and the first chunk are gone: the error travels in the stream.
    status, raw = await _post({**CHAT, "model": "dies", "stream": True})
    assert status == 200
    events = _events(raw)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "no_provider"
    assert "no provider could finish it" in events[-2]["error"]["message"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    assert text == "hello"


async def test_the_same_failure_unstreamed_is_a_503() -> None:
    status, raw = await _post({**CHAT, "model": "dies"})
    assert status == 503
    assert json.loads(raw)["error"]["type"] == "server_error"


@pytest.mark.parametrize("n", [0, 9])
async def test_n_outside_one_to_eight_is_a_400_naming_n(n: int) -> None:
    status, raw = await _post({**CHAT, "n": n})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "n"


async def test_n_up_to_eight_answers_that_many_choices() -> None:
    status, raw = await _post({**CHAT, "n": 8})
    assert status == 200
    assert [c["index"] for c in json.loads(raw)["choices"]] == list(range(8))


# --- sampling the model recommends ----------------------------------------------


@pytest.mark.parametrize(
    ("given", "model", "used"),
    [
        ({}, "fast", (0.2, 0.9)),  # left out: the model's recommendation
        ({"temperature": None, "top_p": None}, "fast", (0.2, 0.9)),  # null is "not given"
        ({"temperature": 0.7}, "fast", (0.7, 0.9)),  # what the client sets stands
        ({"temperature": 0.0, "top_p": 1.0}, "fast", (0.0, 1.0)),
        ({}, "plain", (1.0, 1.0)),  # no recommendation: OpenAI's defaults
    ],
)
async def test_sampling_a_client_leaves_out_is_the_models_recommendation(
    given: dict[str, Any], model: str, used: tuple[float, float]
) -> None:
    node = ScriptedNode()
    for path, body in (
        ("/v1/chat/completions", {**CHAT, **given, "model": model}),
        ("/v1/completions", {"model": model, "prompt": "hi", **given}),
    ):
        status, _raw = await _post(body, path, node)
        assert status == 200
    assert [(r.params.temperature, r.params.top_p) for r in node.requests] == [used, used]


@pytest.mark.parametrize(
    ("given", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": [5]}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"user": 7}, "user"),
    ],
)
async def test_bad_penalties_bias_or_user_are_a_400_naming_the_field(
    given: dict[str, Any], param: str
) -> None:
    status, raw = await _post({**CHAT, **given})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == param


async def test_penalties_and_bias_are_passed_on_by_token_id() -> None:
    node = ScriptedNode()
    body = {
        **CHAT,
        "presence_penalty": -0.5,
        "frequency_penalty": 1,
        "logit_bias": {"9": -100, "3": 2.5},
    }
    assert (await _post(body, node=node))[0] == 200
    (request,) = node.requests
    p = request.params
    assert (p.presence_penalty, p.frequency_penalty) == (-0.5, 1.0)
    assert p.logit_bias == ((3, 2.5), (9, -100.0))


# --- the Responses and Messages APIs (inference/agent_apis.py) -----------------


def _named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"event: "):
            name, _, data = block.partition(b"\n")
            out.append((name[len(b"event: ") :].decode(), json.loads(data[len(b"data: ") :])))
    return out


async def test_a_response_stream_that_fails_after_text_ends_with_an_error_event() -> None:
    body = {"model": "dies", "input": "hi", "stream": True}
    status, raw = await _post(body, "/v1/responses")
    assert status == 200
    events = _named_events(raw)
    assert all(name == data["type"] for name, data in events)
    assert [d["delta"] for n, d in events if n == "response.output_text.delta"] == ["hello"]
    assert [n for n, _ in events[-2:]] == ["error", "response.failed"]
    assert events[-2][1]["code"] == "no_provider"
    assert events[-1][1]["response"]["status"] == "failed"
    assert b"[DONE]" not in raw  # that is chat completions' end, not this API's


async def test_a_messages_stream_that_fails_after_text_ends_with_an_error_event() -> None:
    body = {"model": "dies", "max_tokens": 4, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    status, raw = await _post(body, "/v1/messages")
    assert status == 200
    events = _named_events(raw)
    assert [n for n, _ in events][:3] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    assert events[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error",
                                    "message": "no provider could finish it"}})  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/responses", {"model": "limited", "input": "hi"}, 429),
        ("/v1/messages", {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}, 400),
        ("/v1/messages", {"model": "fast", "max_tokens": 1, "messages": []}, 400),
        (
            "/v1/messages",
            {"model": "nope", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
            404,
        ),  # fmt: skip
    ],
)
async def test_the_other_apis_answer_failures_with_statuses(
    path: str, body: dict[str, Any], status: int
) -> None:
    assert (await _post(body, path))[0] == status


async def test_the_key_may_come_as_x_api_key() -> None:
    app = openai_api.create_app(ScriptedNode(), KEY)
    for key, status in ((KEY, 200), ("sk-wrong", 401)):
        scope = _http_scope(
            "GET", "/v1/models", [(b"host", b"127.0.0.1"), (b"x-api-key", key.encode())]
        )
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any], sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        await app(scope, receive, send)  # type: ignore[arg-type]
        assert sent[0]["status"] == status


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modalities", ["text", "audio"]),
        ("functions", [{"name": "f"}]),
    ],
)
async def test_fields_that_would_change_the_answer_but_are_not_served_are_a_400(
    field: str, value: object
) -> None:
    # A client asking for tool calls or JSON must not get plain text it takes for one.
    status, raw = await _post({**CHAT, field: value})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == field


async def test_their_off_values_and_unknown_fields_pass() -> None:
    off = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"},
           "logprobs": False, "top_logprobs": 0, "modalities": ["text"], "store": False,
           "metadata": {"a": "b"}, "parallel_tool_calls": True, "service_tier": "auto"}  # fmt: skip
    assert (await _post({**CHAT, **off}))[0] == 200
    status, _ = await _post({"model": "fast", "prompt": "hi", "logprobs": 0, "echo": False},
                            "/v1/completions")  # fmt: skip
    assert status == 200


async def test_a_request_the_engine_calls_bad_is_a_400() -> None:
    status, raw = await _post({**CHAT, "model": "badbias", "logit_bias": {"12": 1}})
    assert status == 400
    assert "outside this model" in json.loads(raw)["error"]["message"]


_FN = {"type": "function", "name": "f", "parameters": {"type": "object"}}
_TOOL = {"name": "f", "input_schema": {"type": "object"}}
_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/responses",
            {"tools": [_FN], "tool_choice": {"type": "function", "name": "g"}},
            "tool_choice",
        ),
        ("/v1/responses", {"tools": [_FN], "tool_choice": {"type": "mcp"}}, "tool_choice"),
        ("/v1/responses", {"tools": [_FN, _FN]}, "tools"),
        ("/v1/responses", {"tools": [{**_FN, "parameters": {"minimum": 1}}]}, "tools"),
        ("/v1/responses", {"text": {"format": {"type": "json_schema", "schema": 3}}}, "text"),
        ("/v1/responses", {"tools": [_FN], "parallel_tool_calls": 1}, "parallel_tool_calls"),
        ("/v1/responses", {"input": [{"type": "function_call", "name": "f"}]}, "input[0]"),
        (
            "/v1/messages",
            {"tools": [_TOOL], "tool_choice": {"type": "tool", "name": "g"}},
            "tool_choice",
        ),
        ("/v1/messages", {"tools": [_TOOL], "tool_choice": {"type": "some"}}, "tool_choice"),
        ("/v1/messages", {"tools": [{**_TOOL, "name": "a b"}]}, "tools"),
        ("/v1/messages", {"tools": [_TOOL], "tool_choice": {"type": []}}, "tool_choice"),
        ("/v1/responses", {"input": [{"role": [], "content": "hi"}]}, "input[0]"),
        ("/v1/chat/completions", {"messages": [{"role": [], "content": "hi"}]}, "messages[0].role"),
        (
            "/v1/messages",
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "name": "f"}]}]},
            "messages[0]",
        ),
    ],
)
async def test_tool_fields_of_the_other_apis_are_a_400_naming_them(
    path: str, body: dict[str, Any], param: str
) -> None:
    base = {
        "/v1/responses": {"model": "fast", "input": "hi"},
        "/v1/messages": {"model": "fast", "max_tokens": 4, "messages": _HI},
        "/v1/chat/completions": CHAT,
    }[path]
    status, raw = await _post({**base, **body}, path)
    assert status == 400
    assert json.loads(raw)["error"]["param"] == param


async def test_tool_history_of_the_other_apis_reaches_the_model_as_turns() -> None:
    node = ScriptedNode()
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'}
    body = {
        "model": "fast",
        "tools": [_FN],
        "tool_choice": "none",
        "input": [
            {"role": "user", "content": "hi"},
            call,
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
    }
    assert (await _post(body, "/v1/responses", node=node))[0] == 200
    body = {
        "model": "fast",
        "max_tokens": 4,
        "messages": [
            *_HI,
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me see."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}],
            },
        ],  # fmt: skip
    }
    assert (await _post(body, "/v1/messages", node=node))[0] == 200
    responses, messages = node.requests
    assert [(m.role, m.content) for m in responses.messages] == [
        ("user", "hi"),
        ("assistant", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'),
        ("user", "<tool_response>\n42\n</tool_response>"),
    ]
    assert responses.params.format is None  # tool_choice none: nothing to hold the answer to
    assert [(m.role, m.content) for m in messages.messages][1:] == [
        (
            "assistant",
            'Let me see.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
        ),
        ("user", "<tool_response>\n42\n</tool_response>"),
    ]


async def test_logprobs_in_openais_shapes_for_chat_and_completions() -> None:
    body = {**CHAT, "logprobs": True, "top_logprobs": 2}
    status, raw = await _post(body)
    assert status == 200
    hello = {"token": "hello", "logprob": -0.25, "bytes": list(b"hello")}
    alternatives = [hello, {"token": "hi", "logprob": -1.5, "bytes": [104, 105]}]
    want = {"content": [{**hello, "top_logprobs": alternatives}], "refusal": None}
    assert json.loads(raw)["choices"][0]["logprobs"] == want
    status, raw = await _post({**body, "stream": True})
    chunks = [c for c in _events(raw) if isinstance(c, dict) and c.get("choices")]
    shown = [c["choices"][0]["logprobs"] for c in chunks]
    assert [s for s in shown if s is not None] == [want]
    status, raw = await _post({"model": "fast", "prompt": "hi", "logprobs": 2}, "/v1/completions")
    assert json.loads(raw)["choices"][0]["logprobs"] == {
        "tokens": ["hello"],
        "token_logprobs": [-0.25],
        "top_logprobs": [{"hello": -0.25, "hi": -1.5}],
        "text_offset": [0],
    }


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ],
)
async def test_bad_logprobs_fields_are_a_400_naming_them(
    path: str, fields: dict[str, Any], param: str
) -> None:
    base = CHAT if path == "/v1/chat/completions" else {"model": "fast", "prompt": "hi"}
    status, raw = await _post({**base, **fields}, path)
    assert status == 400
    assert json.loads(raw)["error"]["param"] == param
