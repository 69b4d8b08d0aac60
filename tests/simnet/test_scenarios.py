"""The market and relay scenarios on small simnets (figures are reported, never asserted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pnode.simnet.harness import Topology
from p2pnode.simnet.plots import simnet_figures
from p2pnode.simnet.scenarios import discovery, market

pytestmark = pytest.mark.slow


def _drawn(report: dict[str, Any], out: Path, names: set[str]) -> None:
    """The scenario's figures (``--plot``), drawn from the report: PNGs of some size."""
    written = simnet_figures(report, out)
    assert {p.name for p in written} == names
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000  # axes, labels and data, not a blank canvas


async def test_discovery_scenario_in_one_process(tmp_path: Path) -> None:
    # `--workers 1`; tests/cli/test_cli.py runs it over two worker processes.
    report = await discovery(Topology(peers=6, providers=2), lookups=2, rounds=2)
    assert report["errors"] == []
    assert report["workers"] == 1
    assert report["nodes_per_worker"] == [6]
    assert report["ready_s"] is not None
    assert report["lookup_found"] == [2, 2]
    assert [r["delivered"] for r in report["offer_rounds"]] == [5, 5]
    _drawn(report, tmp_path, {"lookup_latency.png", "offer_propagation.png", "readiness.png"})


async def test_market_scenario_settles_every_session(tmp_path: Path) -> None:
    report = await market(
        Topology(peers=6, providers=2), consumers=2, requests=2, max_tokens=4, settle_s=0
    )
    assert report["errors"] == []
    assert report["chats_ok"] == report["chats"] == 4
    assert report["sessions_opened"] == 2  # one paid session per consumer, reused
    assert report["sessions_closed"] == 2
    assert report["escrow_invariant_ok"]
    assert report["paid_wei"] + report["refunded_wei"] == report["escrowed_wei"]
    assert report["paid_wei"] >= 0  # chats within one block second pay nothing
    assert len(report["open_ms"]) == 2
    assert report["gas_open"] > report["gas_close"] > 21_000
    _drawn(report, tmp_path, {"session_opens.png", "escrow.png", "gas.png"})


async def test_relay_scenario_reaches_private_providers_through_the_relay(tmp_path: Path) -> None:
    from p2pnode.simnet.scenarios import relay

    report = await relay(
        Topology(peers=6, providers=2), rounds=2, model_tokens=8, tokens=2000, settle_s=0
    )
    assert report["errors"] == []
    assert report["private_providers"] == 1
    assert report["relayed_ok"] == 4  # 2 model rounds, 2 synthetic ones
    assert len(report["relayed_tokens_per_s"]) == len(report["direct_tokens_per_s"]) == 2
    assert report["relayed_tokens_per_s_ratio"] > 0
    assert report["relayed_capacity_ratio"] > 0
    # The hole-punching consumer upgraded its one relayed connection, unless
    # py-libp2p's own dials had already connected the two directly (loopback
    # makes a "private" node dialable; tests/p2p/test_relay.py and the NAT
    # namespace test assert the upgrade itself).
    assert report["dcutr_failed"] == 0
    assert report["dcutr_upgrades"] + report["dcutr_direct_without_upgrade"] == 1
    assert report["upgraded_capacity_ratio"] > 0
    _drawn(report, tmp_path, {"relay_throughput.png"})


async def test_audit_scenario_catches_cheaters_and_no_honest_provider(
    degraded_gguf: Path,
) -> None:
    from p2pnode.simnet.audits import audit_scenario

    # A narrow cast (the CLI runs every kind; tests/inference/test_audit.py
    # catches each with the real models).
    # One thread each: two-thread engines would starve the test beside this one
    # (tests/inference/test_audit.py covers two threads).
    kinds = ("cheap_quant", "token_splice", "usage_inflation")
    honest = ((1, 1), (1, 2))
    report = await audit_scenario(
        honest_requests=1,
        max_cheat_requests=2,
        cost_requests=4,
        max_tokens=12,
        workdir=degraded_gguf.parent,
        kinds=kinds,
        honest_configs=honest,
    )
    assert report["errors"] == []
    assert report["honest_audits"] == report["honest_requests"] == len(honest)
    assert report["false_positives"] == 0
    assert set(report["noise_floor"]) == {
        "logprob_mean_diff_max", "logprob_mean_diff_median", "logprob_max_diff_max",
        "greedy_gap_max",
    }  # fmt: skip
    detected = report["detected"]
    assert set(detected) == set(kinds)
    # The cheats a single answer shows are caught on it.
    for kind in kinds:
        assert detected[kind]["caught"] == 1, (kind, detected[kind])
        assert detected[kind]["requests_to_catch_median"] == 1, (kind, detected[kind])
    assert report["all_caught"]
    assert report["cost_requests"] == 4
    assert report["audit_cost_ratio"] is not None
    _drawn(report, degraded_gguf.parent / "plots", {"audit_detection.png"})


async def test_churn_scenario_finishes_every_answer_word_for_word(tmp_path: Path) -> None:
    """Providers killed and restarted under traffic: every answer complete and as
    the engine gives it uninterrupted (each failover continues exactly)."""
    from p2pnode.simnet.churn import Plan, churn_scenario

    # Two providers of the four churning at once, each kill on one serving an
    # answer, about every second: a consumer may see every provider it has not
    # tried go down, and finishes on one that restarted (asked again at its
    # new address) or waits for one to be back.
    plan = Plan(requests=32, consumers=3, max_tokens=16, churn_share=0.5, alive_s=(0.5, 1.5))
    report = await churn_scenario(Topology(peers=7, providers=4), plan)
    assert report["errors"] == []
    assert report["completed"] == report["requests"] == 32
    assert report["lost_or_repeated_text"] == 0, report["wrong_answers"]
    assert report["churned_providers"] == 2
    assert report["kills"] >= 2
    assert report["kills_of_a_serving_provider"] >= 1
    assert report["rejoin_s"]  # restarted providers were found again
    assert report["first_token_ms_median"] > 0  # the run's own baseline
    # Kills at random moments do not always land mid-answer; when one did,
    # its pause was measured.
    assert len(report["failover_gaps_ms"]) <= report["failovers"]
    _drawn(report, tmp_path, {"failover_gaps.png", "rejoin.png"})


async def test_soak_scenario_reports_memory_delivery_and_gossip_scores() -> None:
    """A short soak: every offer delivered at the end, no chat lost, no honest
    peer's forwarded offer rejected as invalid by gossipsub's count (the
    memory slope of 20 s is noise: reported, not asserted)."""
    from p2pnode.simnet.soak import soak_scenario

    report = await soak_scenario(Topology(peers=6, providers=2), minutes=0.35)
    assert report["errors"] == []
    assert report["offers_delivered_ratio"] == 1.0
    assert report["honest_peers_penalized"] == 0
    assert report["chats"] >= 5
    assert report["chats_failed"] == 0
    assert report["lookups"] >= 1
    assert report["lookups_incomplete"] == 0
    assert report["rss_growth_mb_per_node_per_hour"] is not None
    assert len(report["rss_mb"]) >= 20
