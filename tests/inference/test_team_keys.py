"""Team keys at the shim: each key's requests, tokens and spend are its own, its
limits hold, and a revoked key is refused from its next request on, by a
running shim that was not restarted."""

from __future__ import annotations

import functools
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
async def _shim(home: Path) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client, and the shim's chat URL, the shim's team keys in ``home``."""
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                functools.partial(
                    openai_api.serve, ScriptedNode(), KEY, "127.0.0.1:0", ring=keys.KeyRing(home)
                )
            )
            async with httpx.AsyncClient() as http:
                yield http, f"{url}/chat/completions"
            nursery.cancel_scope.cancel()


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
        first = await http.post(chat, json=CHAT, headers=_bearer(frugal))
        assert first.status_code == 200
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
