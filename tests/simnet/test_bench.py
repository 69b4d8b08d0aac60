"""The benchmarks run end to end and report consistent figures (never timed asserts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pnode.inference.llamacpp import bundled_model_path
from p2pnode.simnet.bench import (
    bench_connect,
    bench_e2e,
    bench_engine,
    bench_load,
    bench_stream,
    summarize,
)
from p2pnode.simnet.plots import bench_figure
from p2pnode.simnet.startup import bench_cli


def _drawn(bench: str, report: dict[str, Any], tmp_path: Path) -> None:
    """``--plot``: the bench's figure beside its baseline's, drawn from the report."""
    figure = bench_figure(bench, report, tmp_path / f"{bench}.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.stat().st_size > 10_000


def test_summarize() -> None:
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "p90": 10.0, "min": 1.0, "max": 10.0}


async def test_bench_connect_reports_both_stacks() -> None:
    report = await bench_connect(rounds=2, rtts=3)
    for stack, keys in (
        ("libp2p", ("connect_ms", "status_rtt_ms")),
        ("tcp", ("connect_ms", "rtt_ms")),
    ):
        for key in keys:
            figures = report[stack][key]
            assert 0 < figures["min"] <= figures["median"] <= figures["max"]
    assert report["ratio_connect_median"] > 0
    assert report["ratio_rtt_median"] > 0
    assert report["goal_met"] == (report["libp2p"]["connect_ms"]["median"] <= 25.0)


async def test_bench_stream_reports_consistent_figures() -> None:
    report = await bench_stream(tokens=3000, per_token_tokens=200)
    assert report["tokens"] == 3000
    assert 0 < report["frames"] < 3000  # batched: fewer frames than tokens
    assert report["tokens_per_frame"] > 1
    assert report["tokens_per_s"] > 0
    assert report["per_token_frames_tokens_per_s"] > 0
    assert report["goal_met"] == (report["tokens_per_s"] >= 20_000)


@pytest.mark.slow
async def test_bench_e2e_compares_against_llama_cpp_server(tmp_path: Path) -> None:
    report = await bench_e2e(bundled_model_path(), rounds=1, max_tokens=8)
    for side in ("network", "direct"):
        assert report[side]["tokens_per_s"]["median"] > 0
        assert report[side]["ttft_ms"]["median"] > 0
    assert report["ratio_tokens_per_s"] > 0
    assert len(report["added_ttft_ms_per_round"]) == 1
    _drawn("e2e", report, tmp_path)


@pytest.mark.slow
async def test_bench_engine_compares_against_llama_cpp_called_directly(tmp_path: Path) -> None:
    report = await bench_engine(bundled_model_path(), rounds=2, max_tokens=8, threads=1)
    engine, direct = report["engine_tokens_per_s"], report["direct_tokens_per_s"]
    assert 0 < engine["min"] <= engine["max"]
    assert 0 < direct["min"] <= direct["max"]
    assert len(report["ratios"]) == 2
    assert report["ratio"] == pytest.approx(sum(report["ratios"]) / 2, abs=1e-3)
    assert report["goal_met"] == (report["ratio"] >= 0.98)
    _drawn("engine", report, tmp_path)


@pytest.mark.slow
def test_bench_cli_times_commands_next_to_the_bare_interpreter(tmp_path: Path) -> None:
    report = bench_cli(rounds=1, commands=(("--version",), ("status",)))
    base = report["baseline_ms"]["median"]
    assert set(report["commands"]) == {"--version", "status"}  # status asks a node it started
    for figures in report["commands"].values():
        assert figures["ms"]["median"] > 0
        assert figures["ratio_to_baseline"] == round(figures["ms"]["median"] / base, 2)
    slowest = max(f["ms"]["median"] for f in report["commands"].values())
    assert report["goal_met"] == (slowest < 300)
    _drawn("cli", report, tmp_path)


@pytest.mark.slow
async def test_bench_load_runs_more_clients_than_a_session_takes_without_a_refusal(
    tmp_path: Path,
) -> None:
    """Six clients, a provider that runs four requests at once in a session: the
    consumer holds the other two back instead of having them refused busy (and
    counting it against an honest provider)."""
    report = await bench_load(
        bundled_model_path(), clients=6, requests=1, max_tokens=6, slots=2, rounds=1
    )
    assert report["provider_refusals"] == {}
    assert report["consumer_sessions_opened"] == 1
    assert report["consumer_providers_tried"] == 6 + 1  # one each, and the warm-up
    for side in ("network", "local"):
        assert report[side]["requests"] == 6
        assert report[side]["failed"] == 0
        assert report[side]["tokens_per_s"]["median"] > 0
    assert report["ratio_tokens_per_s"] > 0
    _drawn("load", report, tmp_path)
