"""Team keys at the shim: each key's requests, tokens and spend are its own, its
limits hold, and a revoked key is refused from its next request on, by a
running shim that was not restarted."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pnode.errors import ConfigError
from p2pnode.inference import keys, openai_api
from p2pnode.tests.inference.test_openai_api import AUTH, CHAT, KEY, ScriptedNode

BOUND_S = 10


@asynccontextmanager
async def _shim(
    home: Path, node: ScriptedNode | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client, and the shim's chat URL, the shim's team keys in ``home``."""
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(
                    openai_api.serve,
                    node or ScriptedNode(),
                    KEY,
                    "127.0.0.1:0",
                    ring=keys.KeyRing(home),
                )
            )
            async with httpx.AsyncClient() as http:
                yield http, f"{url}/chat/completions"
            nursery.cancel_scope.cancel()


async def _leave_after(seen: bytes, url: str, key: str, body: dict[str, object]) -> None:
    """A client that posts ``body``, reads until ``seen`` arrives, and hangs up."""
    where = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {where.path} HTTP/1.1\r\nHost: {where.host}:{where.port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    stream = await trio.open_tcp_stream(where.host, where.port or 80)
    async with stream:
        await stream.send_all(head.encode() + payload)
        got = b""
        with trio.fail_after(BOUND_S):
            while seen not in got:
                got += await stream.receive_some(4096)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_each_key_is_accounted_and_a_revoked_key_is_refused_at_once(
    tmp_path: Path,
) -> None:
    alice = keys.add_key(tmp_path, "alice", None, None)
    bob = keys.add_key(tmp_path, "bob", None, None)
    assert alice not in (tmp_path / keys.KEYS_FILE).read_text()  # only its digest is kept
    async with _shim(tmp_path) as (http, chat):
        for _ in range(2):
            answer = await http.post(chat, json=CHAT, headers=_bearer(alice))
            assert answer.status_code == 200, answer.text
        assert (await http.post(chat, json=CHAT, headers=_bearer(bob))).status_code == 200
        assert (await http.post(chat, json=CHAT, headers=AUTH)).status_code == 200
        wrong = await http.post(chat, json=CHAT, headers=_bearer(alice + "x"))
        assert wrong.status_code == 401
        used = keys.read_usage(tmp_path)  # what `keys list` reads, written by the shim
        assert used["alice"].requests == 2
        assert used["alice"].completion_tokens == 2  # "hello", one token an answer
        assert used["alice"].prompt_tokens == 2
        assert used["alice"].spent_wei > 0  # its seconds at the scripted price
        assert used["bob"].requests == 1  # the owner's request is no one's
        scrape = chat.removesuffix("/v1/chat/completions") + "/metrics"
        page = (await http.get(scrape, headers=AUTH)).text
        samples = {
            (s.name, s.labels.get("key")): s.value
            for family in text_string_to_metric_families(page)
            for s in family.samples
        }
        assert samples[("p2pnode_key_requests_total", "alice")] == 2
        assert samples[("p2pnode_key_completion_tokens_total", "bob")] == 1
        assert samples[("p2pnode_key_revoked", "alice")] == 0
        keys.revoke_key(tmp_path, "alice")  # what `p2pnode keys revoke` does
        refused = await http.post(chat, json=CHAT, headers=_bearer(alice))
        assert refused.status_code == 401
        assert "revoked" in refused.json()["error"]["message"]
        assert (await http.post(chat, json=CHAT, headers=_bearer(bob))).status_code == 200
    assert keys.read_usage(tmp_path)["alice"].requests == 2


async def test_a_key_past_its_limits_is_refused_with_the_right_429(tmp_path: Path) -> None:
    paced = keys.add_key(tmp_path, "paced", None, 2)
    frugal = keys.add_key(tmp_path, "frugal", 1, None)  # one wei: spent by the first answer
    async with _shim(tmp_path) as (http, chat):
        for _ in range(2):
            ok = await http.post(chat, json=CHAT, headers=_bearer(paced))
            assert ok.status_code == 200
        third = await http.post(chat, json=CHAT, headers=_bearer(paced))
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "rate_limit_exceeded"
        assert third.headers["retry-after"] == "60"
        # The first answer's first token already costs more than one wei: it
        # is stopped there, charged, and the next is refused at the door.
        first = await http.post(chat, json=CHAT, headers=_bearer(frugal))
        assert first.status_code == 429
        assert first.json()["error"]["code"] == "insufficient_quota"
        spent = await http.post(chat, json=CHAT, headers=_bearer(frugal))
        assert spent.status_code == 429
        assert spent.json()["error"]["code"] == "insufficient_quota"
    assert keys.read_usage(tmp_path)["paced"].requests == 2  # refused ones are not counted


def test_names_are_checked_and_unique(tmp_path: Path) -> None:
    keys.add_key(tmp_path, "ci-bot", None, None)
    with pytest.raises(ConfigError, match="already"):
        keys.add_key(tmp_path, "ci-bot", None, None)
    with pytest.raises(ConfigError, match="name"):
        keys.add_key(tmp_path, "has space", None, None)
    with pytest.raises(ConfigError, match="no key named"):
        keys.revoke_key(tmp_path, "nobody")
    assert (tmp_path / keys.KEYS_FILE).stat().st_mode & 0o077 == 0


async def test_a_key_cannot_reach_the_owners_pages(tmp_path: Path) -> None:
    """The dashboard's state (wallet, other keys, peers) and /metrics are the owner's."""
    bot = keys.add_key(tmp_path, "bot", None, None)
    async with _shim(tmp_path) as (http, chat):
        base = chat.removesuffix("/v1/chat/completions")
        for path in ("/dashboard/state", "/metrics", "/"):
            answer = await http.get(base + path, headers=_bearer(bot))
            assert answer.status_code == 403, path
        assert (await http.get(base + "/v1/models", headers=_bearer(bot))).status_code == 200
        assert (await http.get(base + "/metrics", headers=AUTH)).status_code == 200


async def test_an_answer_cut_short_is_charged_and_a_limit_stops_it_mid_stream(
    tmp_path: Path,
) -> None:
    """ "slow" says one word and waits: the client that leaves is charged that
    word and its seconds; a key whose limit runs out while it waits is stopped."""
    leaver = keys.add_key(tmp_path, "leaver", None, None)
    node = ScriptedNode()
    async with _shim(tmp_path, node) as (http, chat):
        body = {**CHAT, "model": "slow", "stream": True}
        await _leave_after(b"hello", chat, leaver, body)  # before the answer ends
        with trio.fail_after(BOUND_S):
            await node.generation_cancelled.wait()
        used = keys.read_usage(tmp_path)["leaver"]
        assert (used.requests, used.completion_tokens) == (1, 1)
        assert used.spent_wei > 0  # its seconds, at the highest price on offer
    # One wei of limit: the first token's seconds already pass it.
    frugal = keys.add_key(tmp_path, "frugal", 1, None)
    async with _shim(tmp_path) as (http, chat):
        body = {**CHAT, "model": "slow", "stream": True}
        with trio.fail_after(BOUND_S):
            answer = await http.post(chat, json=body, headers=_bearer(frugal))
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "insufficient_quota"
    assert keys.read_usage(tmp_path)["frugal"].spent_wei >= 1


@pytest.mark.parametrize(
    ("file", "text"),
    [
        (keys.KEYS_FILE, '["not", "an", "object"]'),
        (keys.KEYS_FILE, '{"keys": [{"name": "a", "sha256": "00", "spend_limit": "5"}]}'),
        (keys.USAGE_FILE, "[1, 2]"),
        (keys.USAGE_FILE, '{"a": {"requests": null}}'),
    ],
)
def test_a_broken_file_is_a_clear_configuration_error(tmp_path: Path, file: str, text: str) -> None:
    (tmp_path / file).write_text(text)
    with pytest.raises(ConfigError, match="is not a"):
        keys.read_keys(tmp_path) if file == keys.KEYS_FILE else keys.read_usage(tmp_path)


async def test_a_key_whose_limit_runs_out_mid_answer_is_stopped_there(tmp_path: Path) -> None:
    """At the scripted 10**15 wei a second, 10**13 wei is 10 ms: "paced" passes it
    between its words, after the stream has begun."""
    limited = keys.add_key(tmp_path, "limited", 10**13, None)
    async with _shim(tmp_path) as (http, chat):
        body = {**CHAT, "model": "paced", "stream": True}
        with trio.fail_after(BOUND_S):
            answer = await http.post(chat, json=body, headers=_bearer(limited))
    assert answer.status_code == 200  # the stream had begun
    events = [json.loads(line[6:]) for line in answer.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    words = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    assert words.startswith("hello")
    assert "eight" not in words  # stopped before the answer's end
    assert events[-1]["error"]["code"] == "insufficient_quota"
    used = keys.read_usage(tmp_path)["limited"]
    assert used.spent_wei >= 10**13
    assert 1 <= used.completion_tokens < 8
