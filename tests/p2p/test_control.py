"""The control socket: only this user may connect, and a bad request costs one answer."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnode.errors import ConfigError
from p2pnode.p2p import control

BOUND_S = 10


def _echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"echo": request}


async def _ask(path: Path, line: bytes) -> dict[str, Any]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(line)
        data = b""
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    assert isinstance(answer, dict)
    return answer


async def test_the_socket_is_this_users_alone_and_goes_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    umask = os.umask(0o022)
    try:
        with trio.fail_after(BOUND_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, path, _echo)
                assert stat.S_ISSOCK(path.stat().st_mode)
                assert stat.S_IMODE(path.stat().st_mode) == 0o600
                assert os.umask(0o022) == 0o022  # the process umask is given back
                assert await _ask(path, b'{"q": 1}\n') == {"echo": {"q": 1}}
                nursery.cancel_scope.cancel()
    finally:
        os.umask(umask)
    assert not path.exists()


async def test_bad_requests_get_an_error_answer_and_the_socket_serves_on(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path, _echo)
            assert "bad request" in (await _ask(path, b"not json\n"))["error"]
            assert "bad request" in (await _ask(path, b"[1, 2]\n"))["error"]
            too_long = b'{"x": "' + b"a" * control.MAX_REQUEST + b'"}\n'
            assert "too long" in (await _ask(path, too_long))["error"]
            assert await _ask(path, b"{}\n") == {"echo": {}}
            nursery.cancel_scope.cancel()


async def test_a_second_node_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with trio.fail_after(BOUND_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path, _echo)
            with pytest.raises(ConfigError, match="another node is running"):
                await control.serve(path, _echo)
            nursery.cancel_scope.cancel()


async def test_a_client_that_sends_nothing_is_answered_after_the_timeout(
    tmp_path: Path, autojump_clock: object
) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve, path, _echo)
        started = trio.current_time()
        answer = await _ask(path, b'{"never": "ends the line"')
        assert "bad request" in answer["error"]
        assert trio.current_time() - started >= control.REQUEST_TIMEOUT_S
        nursery.cancel_scope.cancel()
