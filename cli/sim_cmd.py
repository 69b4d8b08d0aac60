"""simnet and the benchmarks: ``p2pnode simnet`` and ``p2pnode bench ...``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from p2pnode.cli import app, progress
from p2pnode.errors import P2PNodeError

logger = logging.getLogger("p2pnode.cli")


# --- simnet -----------------------------------------------------------------


@app.main.command()
@click.option("--peers", "peer_count", type=click.IntRange(2, 500), default=50, show_default=True)
@click.option("--providers", type=click.IntRange(1, 500), default=5, show_default=True)
@click.option(
    "--scenario",
    type=click.Choice(
        ["discovery", "market", "relay", "fuzz", "hostile", "audit", "churn", "soak"]
    ),
    default="discovery",
    show_default=True,
)
@click.option(
    "--fanout",
    type=click.IntRange(1, 16),
    default=2,
    show_default=True,
    help="Earlier nodes each new node dials.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Topology seed.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=None,
    help="discovery: worker processes the nodes are spread over (default: one per core; "
    "1 runs every node in this process). The other scenarios run in one process.",
)
@click.option(
    "--frames",
    type=click.IntRange(1),
    default=100_000,
    show_default=True,
    help="fuzz: hostile frames to send (one node, restarted when it dies); hostile: the "
    "frames fuzz() sends to honest nodes.",
)
@click.option(
    "--attackers",
    type=click.IntRange(1, 64),
    default=8,
    show_default=True,
    help="fuzz, hostile: attacking hosts (of each fuzz() run).",
)
@click.option(
    "--minutes",
    type=click.FloatRange(0.1, 24 * 60),
    default=10.0,
    show_default=True,
    help="soak: how long the network runs.",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report here as JSON.",
)
@click.option(
    "--plot",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Draw the scenario's figures as PNGs into this directory (not fuzz).",
)
def simnet(
    peer_count: int,
    providers: int,
    scenario: str,
    fanout: int,
    seed: int,
    workers: int | None,
    frames: int,
    attackers: int,
    minutes: float,
    report: Path | None,
    plot: Path | None,
) -> None:
    """Run many real nodes in this process and report how the network behaves.

    The hostile scenario runs 12 peers unless --peers is given (see simnet/hostile.py);
    the audit scenario its own 13 (simnet/audits.py); churn 16 with 10 providers
    unless told (simnet/churn.py).
    """
    from p2pnode.simnet import harness
    from p2pnode.simnet.harness import Topology
    from p2pnode.simnet.scenarios import SCENARIOS

    harness.STARTED.set(_start_up_progress())

    if providers >= peer_count:
        raise click.BadParameter("must be fewer than --peers", param_hint="--providers")
    topology = Topology(peers=peer_count, providers=providers, fanout=fanout, seed=seed)
    if workers is not None and workers > 1 and scenario != "discovery":
        raise click.BadParameter("only the discovery scenario runs over several processes",
                                 param_hint="--workers")  # fmt: skip
    if scenario == "discovery":
        from p2pnode.simnet import workers as workerslib

        spread = workers or workerslib.default_workers()
        if spread > 1:
            result = app.run_async(lambda: workerslib.discovery(topology, workers=spread))
        else:
            result = app.run_async(lambda: SCENARIOS[scenario](topology))
    elif scenario == "fuzz":
        from p2pnode.simnet.scenarios import fuzz

        result = app.run_async(lambda: fuzz(topology, frames=frames, attackers=attackers))
    elif scenario == "hostile":
        from dataclasses import replace

        from p2pnode.simnet.hostile import PEERS, Sizes, hostile

        peers_source = click.get_current_context().get_parameter_source("peer_count")
        if peers_source is click.core.ParameterSource.DEFAULT:
            topology = replace(topology, peers=PEERS)
        sizes = Sizes(fuzz_frames=frames, fuzz_attackers=attackers)
        result = app.run_async(lambda: hostile(topology, sizes))
    elif scenario == "churn":
        from dataclasses import replace

        from p2pnode.simnet.churn import PEERS, PROVIDERS, churn_scenario

        if _defaulted("peer_count"):
            topology = replace(topology, peers=PEERS)
        if _defaulted("providers"):
            topology = replace(topology, providers=PROVIDERS)
        if topology.providers >= topology.peers:
            raise click.BadParameter("churn needs fewer --providers than --peers")
        result = app.run_async(lambda: churn_scenario(topology))
    elif scenario == "soak":
        from p2pnode.simnet.soak import soak_scenario

        result = app.run_async(lambda: soak_scenario(topology, minutes=minutes))
    elif scenario == "audit":
        import tempfile

        from p2pnode.simnet.audits import audit_scenario

        # Its peers are its own: 4 honest providers, one cheater of each
        # kind, 2 auditing consumers, 2 consumers at the default rate.
        with tempfile.TemporaryDirectory(prefix="p2pnode-audit-") as workdir:
            result = app.run_async(lambda: audit_scenario(workdir=Path(workdir)))
    else:
        result = app.run_async(lambda: SCENARIOS[scenario](topology))
    text = json.dumps(result, indent=2)
    if report is not None:
        report.write_text(text + "\n")
    click.echo(text)
    if plot is not None:
        from p2pnode.simnet.plots import simnet_figures

        for path in simnet_figures(result, plot):
            click.echo(f"figure: {path}", err=True)


def _defaulted(param: str) -> bool:
    source = click.get_current_context().get_parameter_source(param)
    return source is click.core.ParameterSource.DEFAULT


def _start_up_progress() -> Callable[[int, int], None]:
    """A simnet's start-up, as nodes start (a new line for each simnet a scenario opens)."""
    shown: list[tuple[progress.Steps, int]] = []  # the current simnet's, and its count

    def started(done: int, total: int) -> None:
        if not shown or done < shown[-1][1]:
            shown.append((progress.start("simnet: nodes started", total, background=True), 0))
        steps, before = shown[-1]
        steps.step(by=done - before)
        shown[-1] = (steps, done)

    return started


# --- benchmarks -------------------------------------------------------------


@app.main.group()
def bench() -> None:
    """Benchmarks: figures next to a baseline measured in the same run."""


model_option = click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="GGUF file (default: the bundled model).",
)
plot_option = click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw the figures beside the baseline's as a PNG here.",
)


def _model(path: Path | None) -> Path:
    """The GGUF file a bench runs: ``path``, or the bundled model."""
    from p2pnode.inference import llamacpp

    try:
        return path or llamacpp.bundled_model_path()
    except P2PNodeError as exc:
        app.fail(exc)


def _plot(name: str, report: dict[str, Any], plot: Path | None) -> None:
    if plot is not None:
        from p2pnode.simnet.plots import bench_figure

        click.echo(f"figure: {bench_figure(name, report, plot)}", err=True)


@bench.command("engine")
@click.option("--rounds", type=click.IntRange(1, 50), default=7, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@model_option
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@plot_option
def bench_engine(
    rounds: int,
    max_tokens: int,
    as_json: bool,
    model_path: Path | None,
    threads: int | None,
    plot: Path | None,
) -> None:
    """Tokens/s through LlamaCppEngine vs llama-cpp-python called directly, same run."""
    from p2pnode.simnet.bench import bench_engine as run_bench

    path = _model(model_path)
    report = app.run_async(lambda: run_bench(path, rounds, max_tokens, threads))
    _plot("engine", report, plot)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"engine {report['engine_tokens_per_s']['median']:.1f} tokens/s  direct "
        f"{report['direct_tokens_per_s']['median']:.1f} tokens/s  ratio {report['ratio']:.3f}"
        f"  (goal >= 0.98: {'met' if report['goal_met'] else 'missed'})"
    )


@bench.command("stream")
@click.option("--tokens", type=click.IntRange(1000, 10_000_000), default=200_000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bench_stream(tokens: int, as_json: bool) -> None:
    """Sealed tokens/s over one infer stream, with an engine that is never the bottleneck."""
    from p2pnode.simnet.bench import bench_stream as run_bench

    report = app.run_async(lambda: run_bench(tokens))
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"stream {report['tokens_per_s']} tokens/s in {report['frames']} frames "
        f"({report['tokens_per_frame']} tokens/frame, first chunk {report['first_chunk_ms']} ms)"
        f"  (goal >= 20000: {'met' if report['goal_met'] else 'missed'})"
    )
    click.echo(
        f"engine alone {report['engine_direct_tokens_per_s']} tokens/s "
        f"(ratio {report['ratio_to_engine']});  one frame per token "
        f"{report['per_token_frames_tokens_per_s']} tokens/s "
        f"(batching x{report['batching_speedup']})"
    )


@bench.command("e2e")
@click.option("--rounds", type=click.IntRange(1, 50), default=9, show_default=True)
@click.option("--max-tokens", type=click.IntRange(8, 4096), default=96, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@plot_option
def bench_e2e(
    rounds: int,
    max_tokens: int,
    threads: int,
    model_path: Path | None,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Shim -> p2p -> provider vs llama_cpp.server on the same model: tokens/s and TTFT."""
    from p2pnode.simnet.bench import bench_e2e as run_bench

    path = _model(model_path)
    report = app.run_async(lambda: run_bench(path, rounds, max_tokens, threads))
    _plot("e2e", report, plot)
    if as_json:
        click.echo(json.dumps(report))
        return
    net, direct = report["network"], report["direct"]
    click.echo(
        f"tokens/s  network {net['tokens_per_s']['median']:.1f}  llama_cpp.server "
        f"{direct['tokens_per_s']['median']:.1f}  ratio {report['ratio_tokens_per_s']:.3f}"
        "  (goal >= 0.97)"
    )
    click.echo(
        f"ttft      network {net['ttft_ms']['median']:.1f} ms  llama_cpp.server "
        f"{direct['ttft_ms']['median']:.1f} ms  added {report['added_ttft_ms']:.1f} ms"
        f"  (goal <= 10 ms)  goals {'met' if report['goal_met'] else 'missed'}"
    )


@bench.command("load")
@click.option("--clients", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--requests", type=click.IntRange(1, 100), default=2, show_default=True,
              help="Completions each client runs in turn.")  # fmt: skip
@click.option("--max-tokens", type=click.IntRange(4, 4096), default=48, show_default=True)
@click.option("--slots", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 20), default=5, show_default=True)
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@plot_option
def bench_load(
    clients: int,
    requests: int,
    max_tokens: int,
    slots: int,
    threads: int,
    rounds: int,
    model_path: Path | None,
    as_json: bool,
    plot: Path | None,
) -> None:
    """Concurrent streaming clients through the shim vs the same engine locally, same run."""
    from p2pnode.simnet.bench import bench_load as run_bench

    path = _model(model_path)
    report = app.run_async(
        lambda: run_bench(path, clients, requests, max_tokens, slots, threads, rounds)
    )
    _plot("load", report, plot)
    if as_json:
        click.echo(json.dumps(report))
        return
    net, local = report["network"], report["local"]
    click.echo(
        f"aggregate tokens/s  network {net['tokens_per_s']['median']:.1f}  local "
        f"{local['tokens_per_s']['median']:.1f}  ratio {report['ratio_tokens_per_s']:.3f}"
        f"  (goal >= 0.95: {'met' if report['goal_met'] else 'missed'})"
    )
    click.echo(
        f"ttft p50/p99 ms    network {net['ttft_ms_p50']}/{net['ttft_ms_p99']}  local "
        f"{local['ttft_ms_p50']}/{local['ttft_ms_p99']}  ({clients} clients, {slots} slots; "
        f"refusals {report['provider_refusals'] or 'none'})"
    )


@bench.command("connect")
@click.option("--rounds", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--rtts", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@plot_option
def bench_connect(rounds: int, rtts: int, as_json: bool, plot: Path | None) -> None:
    """libp2p connect time and status round trip vs plain TCP on loopback."""
    from p2pnode.simnet.bench import bench_connect as run_bench

    report = app.run_async(lambda: run_bench(rounds, rtts))
    _plot("connect", report, plot)
    if as_json:
        click.echo(json.dumps(report))
        return
    lp, tcp = report["libp2p"], report["tcp"]
    click.echo(
        f"connect   libp2p {lp['connect_ms']['median']:.2f} ms  "
        f"tcp {tcp['connect_ms']['median']:.3f} ms  "
        f"ratio {report['ratio_connect_median']}x  (goal <= 25 ms: "
        f"{'met' if report['goal_met'] else 'missed'})"
    )
    click.echo(
        f"rtt       libp2p {lp['status_rtt_ms']['median']:.2f} ms  "
        f"tcp {tcp['rtt_ms']['median']:.3f} ms  ratio {report['ratio_rtt_median']}x"
    )


@bench.command("cli")
@click.option("--rounds", type=click.IntRange(1, 100), default=7, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@plot_option
def bench_cli(rounds: int, as_json: bool, plot: Path | None) -> None:
    """Start-up of --help, --version, id, status, offers (fresh processes) vs bare Python."""
    from p2pnode.simnet.startup import bench_cli as run_bench

    try:
        report = run_bench(rounds)
    except P2PNodeError as exc:
        app.fail(exc)
    _plot("cli", report, plot)
    if as_json:
        click.echo(json.dumps(report))
        return
    base = report["baseline_ms"]["median"]
    click.echo(f"{'python -c pass':<16} {base:7.1f} ms  (baseline, median of {rounds})")
    for name, figures in report["commands"].items():
        click.echo(
            f"{'p2pnode ' + name:<16} {figures['ms']['median']:7.1f} ms  "
            f"x{figures['ratio_to_baseline']:.1f} the baseline  (max {figures['ms']['max']:.0f} ms)"
        )
    click.echo(
        f"goal: every median < {report['goal_s'] * 1000:.0f} ms: "
        f"{'met' if report['goal_met'] else 'missed'}"
    )
