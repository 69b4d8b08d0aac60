"""The library example in docs/library.md runs as written, against a real provider."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode import client
from p2pnode.errors import NoProviderError
from p2pnode.inference.llamacpp import BUNDLED_MODEL_ID, Config, bundled_model_path, open_llamacpp
from p2pnode.p2p.node import NodeConfig, open_node

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"
BOUND_S = 90


def _example() -> str:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    return code


async def test_the_documented_example_streams_and_completes_through_a_provider(
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace: dict[str, object] = {"__name__": "example"}
    exec(compile(_example(), str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["MODEL"] == BUNDLED_MODEL_ID
    cfg = Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1)
    async with (
        open_llamacpp(cfg) as engine,
        open_node(
            NodeConfig(measure_tokens=0), key_pair=create_new_key_pair(), engines=[engine]
        ) as provider,
    ):
        main = namespace["main"]
        assert callable(main)
        with trio.fail_after(BOUND_S):
            await main(provider.addrs[0])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(provider.peer_id)  # the provider, found
    assert "".join(out[1:-1]).strip()  # the streamed answer (its own lines, maybe)
    assert out[-1].endswith(f"from {provider.peer_id})")  # the whole one
    assert "(stop," in out[-1] or "(length," in out[-1]


async def test_a_model_nobody_serves_is_a_no_provider_error() -> None:
    async with client.connect() as net:
        assert await net.models() == []
        assert await net.providers("no-such-model") == []
        with trio.fail_after(BOUND_S), pytest.raises(NoProviderError):
            await _read_all(net, "no-such-model")


async def _read_all(net: client.Network, model_id: str) -> str:
    async with net.stream(model_id, "hi") as pieces:
        return "".join([text async for text in pieces])
