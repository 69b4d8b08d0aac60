"""simnet's and the benchmarks' figures as PNGs (``--plot``), drawn with matplotlib.

Each figure is drawn from a report as the command prints it (JSON), after
the run. matplotlib runs on its Agg backend: no display is needed, and
nothing is shown, only written.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OURS: Final = "#1f77b4"
BASELINE: Final = "#7f7f7f"
BAD: Final = "#d62728"
GOOD: Final = "#2ca02c"


def _figure(title: str, size: tuple[float, float] = (7.0, 4.2)) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever the environment says
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _cumulative(ax: Axes, values: Sequence[float], label: str, color: str = OURS) -> None:
    """How many of ``values`` were at most x: a step line."""
    ordered = sorted(values)
    ax.step([0.0, *ordered], range(len(ordered) + 1), where="post", label=label, color=color)


# --- simnet ---------------------------------------------------------------------


def simnet_figures(report: dict[str, Any], out: Path) -> list[Path]:
    """The figures of a simnet report into directory ``out``; returns the files written."""
    draw = _SCENARIOS.get(str(report.get("scenario")))
    return draw(report, out) if draw is not None else []


def _discovery(report: dict[str, Any], out: Path) -> list[Path]:
    written = []
    peers = report["peers"]
    fig, ax = _figure(f"DHT lookup latency: {len(report['lookup_ms'])} cold lookups, {peers} peers")
    if report["lookup_ms"]:
        ax.hist(report["lookup_ms"], bins=min(20, max(5, len(report["lookup_ms"]))), color=OURS)
        ax.axvline(report["lookup_ms_median"], color=BAD, linestyle="--",
                   label=f"median {report['lookup_ms_median']} ms")  # fmt: skip
        ax.legend()
    ax.set_xlabel("ms")
    ax.set_ylabel("lookups")
    written.append(_save(fig, out / "lookup_latency.png"))

    fig, ax = _figure(f"Offer propagation: a re-priced offer reaching the other {peers - 1} peers")
    for i, r in enumerate(report["offer_rounds"]):
        _cumulative(ax, r.get("seen_ms", []), f"round {i + 1}", color=f"C{i % 10}")
    ax.set_xlabel("ms after the provider changed its offer")
    ax.set_ylabel("peers holding the new offer")
    ax.axhline(peers - 1, color=BASELINE, linestyle=":", label="every other peer")
    ax.legend(fontsize="small")
    written.append(_save(fig, out / "offer_propagation.png"))

    fig, ax = _figure(f"Readiness: peers holding every provider's offer ({peers} peers)")
    _cumulative(ax, [ms / 1000 for ms in report.get("ready_ms", [])], "ready peers")
    ax.axhline(peers, color=BASELINE, linestyle=":", label="all peers")
    if report.get("start_s") is not None:
        ax.axvline(report["start_s"], color=BAD, linestyle="--", label="last node started")
    ax.set_xlabel("s since the first node started")
    ax.set_ylabel("peers")
    ax.legend()
    written.append(_save(fig, out / "readiness.png"))
    return written


def _market(report: dict[str, Any], out: Path) -> list[Path]:
    written = []
    fig, ax = _figure(f"Paid session opens: {len(report['open_ms'])} sessions")
    _cumulative(ax, report["open_ms"], "handshake + on-chain open")
    if report.get("chain_open_ms"):
        _cumulative(ax, report["chain_open_ms"], "on-chain open alone", color=BASELINE)
    ax.set_xlabel("ms")
    ax.set_ylabel("sessions opened")
    ax.legend()
    written.append(_save(fig, out / "session_opens.png"))

    fig, ax = _figure("Escrow: where the consumers' stakes went (wei)")
    paid, refunded = int(report["paid_wei"]), int(report["refunded_wei"])
    ax.bar(["paid to providers", "refunded"], [paid, refunded], color=[OURS, GOOD])
    ax.axhline(int(report["escrowed_wei"]), color=BAD, linestyle="--", label="escrowed")
    ax.legend()
    written.append(_save(fig, out / "escrow.png"))

    fig, ax = _figure("Gas per transaction (median)")
    ax.bar(["openSession", "closeSession"],
           [report["gas_open"] or 0, report["gas_close"] or 0], color=OURS)  # fmt: skip
    ax.set_ylabel("gas")
    written.append(_save(fig, out / "gas.png"))
    return written


def _relay(report: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = _figure("Tokens/s to a private provider: through the relay vs direct")
    series = [
        ("direct,\nmodel", report.get("direct_tokens_per_s") or [], BASELINE),
        ("relayed,\nmodel", report.get("relayed_tokens_per_s") or [], OURS),
        ("direct,\nlink capacity", report.get("direct_capacity_tokens_per_s") or [], BASELINE),
        ("relayed,\nlink capacity", report.get("relayed_capacity_tokens_per_s") or [], OURS),
    ]
    for x, (_, values, color) in enumerate(series):
        if values:
            ax.bar(x, statistics.median(values), color=color, alpha=0.6)
            ax.scatter([x] * len(values), values, color=color, zorder=3, s=14)
    ax.set_xticks(range(len(series)), [label for label, _, _ in series], fontsize="small")
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (bars: median; dots: rounds)")
    ax.text(0.02, 0.97, f"hole-punch upgrades {report.get('dcutr_upgrades', 0)}, failed "
            f"{report.get('dcutr_failed', 0)}; upgraded/direct capacity "
            f"{report.get('upgraded_capacity_ratio')}", transform=ax.transAxes, va="top",
            fontsize="small")  # fmt: skip
    return [_save(fig, out / "relay_throughput.png")]


def _hostile(report: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = _figure("Hostile network: attacks sent vs what the honest peers gave them",
                      size=(8.0, 4.6))  # fmt: skip
    flood = report.get("flood_offers_sent", {})
    sent = {
        "crash offers": report.get("crash_offers_sent", 0),
        "flood offers": sum(flood.values()) if isinstance(flood, dict) else flood,
        "junk frames": report.get("junk_frames", 0),
        "fuzz frames": report.get("fuzz_frames", 0),
        "DHT poison records": report.get("dht_poison_records", 0),
    }
    gained = {
        "node exits": report.get("node_exits", 0),
        "sybil sessions": report.get("sybil_sessions", 0),
        "made-up relay ids granted": report.get("relay_made_up_ids_granted", 0),
        "tokens served after a close": report.get("served_after_close_tokens", 0),
    }
    labels = [*sent, *gained]
    ax.barh(labels, [*sent.values(), *gained.values()],
            color=[BASELINE] * len(sent) + [BAD] * len(gained))  # fmt: skip
    ax.set_xscale("symlog")
    ax.set_xlabel("count (grey: attacks sent; red: what they won)")
    ok = report.get("honest_ok", 0)
    ax.text(0.55, 0.05, f"honest requests served {ok}/{report.get('honest_requests', 0)}",
            transform=ax.transAxes)  # fmt: skip
    return [_save(fig, out / "hostile.png")]


def _audit(report: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = _figure("Audits: requests until each cheater was caught")
    detected = report.get("detected", {})
    kinds = list(detected)
    caught = [detected[k]["requests_to_catch_median"] or 0 for k in kinds]
    colors = [GOOD if detected[k]["caught"] else BAD for k in kinds]
    ax.bar(kinds, caught, color=colors)
    ax.set_ylim(0, max([*caught, 1]) * 1.3)  # room for the note above the bars
    ax.set_ylabel("requests (red: not caught)")
    ax.text(0.02, 0.95, f"false positives {report.get('false_positives', 0)} in "
            f"{report.get('honest_audits', 0)} audits of honest providers",
            transform=ax.transAxes, va="top")  # fmt: skip
    return [_save(fig, out / "audit_detection.png")]


def _churn(report: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = _figure(
        f"Failovers under churn: {report['kills']} kills, {report['completed']}/"
        f"{report['requests']} answers complete, {report['lost_or_repeated_text']} wrong"
    )
    _cumulative(ax, report["failover_gaps_ms"], "answers that failed over mid-stream")
    ax.axvline(1000, color=BASELINE, linestyle=":", label="goal for the median")
    ax.set_xlabel("ms between the dead provider's last text and the next one's first")
    ax.set_ylabel("answers")
    ax.legend(fontsize="small")
    written = [_save(fig, out / "failover_gaps.png")]
    fig, ax = _figure("Rejoining: a restarted provider's new offer at every consumer")
    _cumulative(ax, report["rejoin_s"], "restarts")
    ax.set_xlabel("s from the restart")
    ax.set_ylabel("restarts")
    ax.legend(fontsize="small")
    written.append(_save(fig, out / "rejoin.png"))
    return written


_SCENARIOS: Final[dict[str, Callable[[dict[str, Any], Path], list[Path]]]] = {
    "churn": _churn,
    "discovery": _discovery,
    "market": _market,
    "relay": _relay,
    "hostile": _hostile,
    "audit": _audit,
}


# --- benchmarks -------------------------------------------------------------------

Stats = dict[str, float]  # median, p90, min, max (simnet/bench.py:summarize)
Panel = tuple[str, list[tuple[str, Stats]]]  # what, then (label, stats): ours first, baseline last


def _panels(bench: str, report: dict[str, Any]) -> list[Panel]:
    if bench == "engine":
        return [
            (
                "tokens/s",
                [
                    ("LlamaCppEngine", report["engine_tokens_per_s"]),
                    ("llama-cpp-python directly", report["direct_tokens_per_s"]),
                ],
            )
        ]
    if bench == "e2e":
        net, direct = report["network"], report["direct"]
        return [
            (
                "tokens/s",
                [
                    ("shim → p2p → provider", net["tokens_per_s"]),
                    ("llama_cpp.server", direct["tokens_per_s"]),
                ],
            ),
            (
                "time to first token, ms",
                [
                    ("shim → p2p → provider", net["ttft_ms"]),
                    ("llama_cpp.server", direct["ttft_ms"]),
                ],
            ),
        ]
    if bench == "connect":
        lp, tcp = report["libp2p"], report["tcp"]
        return [
            ("connect, ms", [("libp2p", lp["connect_ms"]), ("TCP", tcp["connect_ms"])]),
            (
                "round trip, ms",
                [("libp2p status", lp["status_rtt_ms"]), ("TCP echo", tcp["rtt_ms"])],
            ),
        ]
    if bench == "load":
        net, local = report["network"], report["local"]
        return [
            (
                "aggregate tokens/s",
                [
                    (f"{report['clients']} clients through the network", net["tokens_per_s"]),
                    ("the engine locally", local["tokens_per_s"]),
                ],
            )
        ]
    if bench == "cli":
        commands = [(f"p2pnode {name}", f["ms"]) for name, f in report["commands"].items()]
        return [("start-up, ms", [*commands, ("python -c pass", report["baseline_ms"])])]
    raise ValueError(f"no figure for bench {bench!r}")  # fmt: skip


def bench_figure(bench: str, report: dict[str, Any], path: Path) -> Path:
    """A bench's figures beside its baseline's, measured in the same run: median
    bars, min-max whiskers, p90 marks, and the ratio of the medians."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    panels = _panels(bench, report)
    wide = max(len(bars) for _, bars in panels)
    fig = Figure(figsize=(max(4.2, 1.3 * wide) * len(panels), 4.4), dpi=110, layout="constrained")
    for i, (what, bars) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        labels = [label for label, _ in bars]
        medians = [s["median"] for _, s in bars]
        below = [m - s["min"] for m, (_, s) in zip(medians, bars, strict=True)]
        above = [s["max"] - m for m, (_, s) in zip(medians, bars, strict=True)]
        colors = [OURS] * (len(bars) - 1) + [BASELINE]
        ax.bar(labels, medians, yerr=[below, above], capsize=6, color=colors)
        ax.scatter(labels, [s["p90"] for _, s in bars], marker="_", s=400, color=BAD,
                   label="p90", zorder=3)  # fmt: skip
        ratio = medians[0] / medians[-1] if medians[-1] else None
        ax.set_title(f"{what}" + (f": ratio {ratio:.3f}" if len(bars) == 2 and ratio else ""))
        ax.tick_params(axis="x", labelsize="small", labelrotation=20 if len(bars) > 2 else 0)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"p2pnode bench {bench}: medians, whiskers min to max, grey the baseline")
    return _save(fig, path)
