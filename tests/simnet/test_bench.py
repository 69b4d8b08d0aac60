"""The benchmarks run end to end and report consistent figures (never timed asserts)."""

from __future__ import annotations

from p2pnode.simnet.bench import bench_connect, summarize


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
