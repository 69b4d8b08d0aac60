"""The market scenario on a small simnet: paid chats, every session closed, escrow balanced."""

from __future__ import annotations

import pytest

from p2pnode.simnet.harness import Topology
from p2pnode.simnet.scenarios import market

pytestmark = pytest.mark.slow


async def test_market_scenario_settles_every_session() -> None:
    report = await market(
        Topology(peers=6, providers=2), consumers=2, requests=2, max_tokens=4, settle_s=0
    )
    assert report["errors"] == []
    assert report["chats_ok"] == report["chats"] == 4
    assert report["sessions_opened"] == 2  # one paid session per consumer, reused
    assert report["sessions_closed"] == 2
    assert report["escrow_invariant_ok"]
    assert report["paid_wei"] + report["refunded_wei"] == report["escrowed_wei"]
    assert report["paid_wei"] > 0
    assert len(report["open_ms"]) == 2
    assert report["gas_open"] > report["gas_close"] > 21_000
