"""``p2pnode start``'s flags, parsed by click as the command parses them, land in the node's config.

In process: nothing starts. Each flag is given a value other than its
default, so a flag wired to the wrong field (or to none) fails here.
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from p2pnode.chain.units import parse_tokens
from p2pnode.cli import options
from p2pnode.cli.node_cmd import generate, start
from p2pnode.errors import ConfigError

WALLET = "0xAbCdEf0123456789aBcDeF0123456789AbCdEf01"
IDS = (
    "12D3KooWGzBk6hHxp4B3cCTpXvGqHz2pN5H7qkS1Eif1WZu7tyYF",
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    "16Uiu2HAmRmh8t3LrNYqhGsdvnU1Ln6Lg9CLrWTrHxYTnPgEnbX5B",
)


def _parsed(args: list[str]) -> options.NodeOptions:
    ctx = start.make_context("start", args)
    return options.NodeOptions.take(dict(ctx.params))


def test_every_node_flag_reaches_its_field() -> None:
    parsed = _parsed(
        [
            "--allow", WALLET, *[a for peer in IDS for a in ("--allow", peer)],
            "--rate-limit", "7",
            "--relay-service",
            "--relay-max-reservations", "3",
            "--relay-max-circuits", "5",
            "--relay-max-circuits-per-peer", "2",
            "--relay-circuit-seconds", "11",
            "--relay-circuit-mib", "3",
            "--relay-total-mib", "9",
            "--relay-total-seconds", "13",
            "--dialback-per-minute", "17",
            "--dialback-per-peer-per-minute", "4",
            "--no-hole-punch",
            "--audit-rate", "0.25",
            "--no-remote-audits",
        ]
    )  # fmt: skip
    config = parsed.node_config(Path("control.sock"), None, Path("audits.json"))
    # Wallets match in any case; peer ids are base58 and kept exactly as written.
    assert config.provider.admission.allowlist == frozenset({WALLET.lower(), *IDS})
    assert config.provider.requests_per_minute == 7
    relay = config.relay
    assert relay.service is True
    assert (relay.max_reservations, relay.max_circuits, relay.max_circuits_per_peer) == (3, 5, 2)
    assert (relay.circuit_duration_s, relay.circuit_bytes) == (11, 3 << 20)
    assert (relay.total_bytes, relay.total_window_s) == (9 << 20, 13)
    assert relay.hole_punch is False
    assert config.dialback.requests_per_minute == 17
    assert config.dialback.requests_per_peer_per_minute == 4
    assert config.market is None
    assert config.audit is not None
    assert (config.audit.rate, config.audit.path) == (0.25, Path("audits.json"))
    assert config.audit.remote is False


def test_the_defaults_are_the_readmes() -> None:
    # README, "Limits" and the configuration table.
    config = _parsed([]).node_config(Path("control.sock"), None)
    assert config.provider.admission.allowlist == frozenset()
    assert config.provider.requests_per_minute == 600
    relay = config.relay
    assert relay.service is False
    assert (relay.max_reservations, relay.max_circuits, relay.max_circuits_per_peer) == (16, 32, 8)
    assert (relay.circuit_duration_s, relay.circuit_bytes) == (3600, 1 << 30)
    assert (relay.total_bytes, relay.total_window_s) == (4 << 30, 3600)
    assert relay.hole_punch is True
    assert config.dialback.requests_per_minute == 60
    assert config.dialback.requests_per_peer_per_minute == 6
    assert config.audit is not None
    assert (config.audit.rate, config.audit.remote) == (0.05, True)


def test_the_paying_flags_reach_the_consumers_terms(tmp_path: Path) -> None:
    ctx = start.make_context(
        "start", ["--spend-limit", "2.5", "--session-seconds", "30", "--max-price", "7"]
    )
    terms = options.PaidOptions.take(dict(ctx.params)).terms(tmp_path / "sessions.db")
    assert (terms.spend_limit, terms.session_seconds, terms.max_price_per_s) == (
        25 * 10**17,
        30,
        7,
    )
    assert terms.sessions_db == tmp_path / "sessions.db"
    with pytest.raises(ConfigError, match="not an amount of tokens: '-1'"):
        options.PaidOptions(spend_limit="-1", session_seconds=1, max_price=1).terms(tmp_path)


def test_the_paying_defaults_are_the_readmes(tmp_path: Path) -> None:
    # README, "A paid network" and the configuration table: 100 tokens held at
    # most, 600 s a session, 1 token/s at most, closed after 2 idle minutes;
    # a provider claims a session whose consumer is silent for 15 minutes.
    terms = options.PaidOptions.take(dict(start.make_context("start", []).params)).terms(tmp_path)
    assert (terms.spend_limit, terms.session_seconds, terms.max_price_per_s) == (
        100 * 10**18,
        600,
        10**18,
    )
    assert (terms.idle_close_s, terms.claim_idle_s) == (120.0, 900.0)


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1e-19", "ten", ""])
def test_an_amount_that_is_no_amount_of_tokens_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="not an amount of tokens"):
        parse_tokens(text)


def test_amounts_are_whole_tokens_to_the_smallest_unit() -> None:
    assert parse_tokens("100") == 100 * 10**18
    assert parse_tokens("0.001") == 10**15
    assert parse_tokens("1e-18") == 1


@pytest.mark.parametrize(
    ("level", "shown"),
    [
        ("warning", ["ours warning"]),
        ("info", ["ours info", "ours warning"]),
        ("debug", ["ours debug", "ours info", "ours warning", "theirs error"]),
    ],
)
def test_the_log_level_decides_what_reaches_stderr(
    level: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from p2pnode.cli import app

    root, libp2p = logging.getLogger(), logging.getLogger("libp2p")
    handlers, old, propagates = root.handlers[:], root.level, libp2p.propagate
    try:
        app.setup_logging(level)
        libp2p.propagate = True  # as app.run_async does once py-libp2p is imported
        ours, theirs = logging.getLogger("p2pnode.p2p.node"), logging.getLogger("libp2p.swarm")
        ours.debug("ours debug")
        ours.info("ours info")
        ours.warning("ours warning")
        theirs.error("theirs error")  # py-libp2p's routine failures: only when debugging
        theirs.critical("theirs critical")
    finally:
        root.handlers[:] = handlers
        root.setLevel(old)
        libp2p.propagate = propagates
    err = capsys.readouterr().err
    everything = ["ours debug", "ours info", "ours warning", "theirs error"]
    assert [m for m in everything if m in err] == shown
    assert "theirs critical" in err


def test_a_log_level_that_is_none_is_refused() -> None:
    from click.testing import CliRunner

    from p2pnode.cli.main import main

    result = CliRunner().invoke(main, ["--log-level", "verbose", "id"])
    assert result.exit_code == 2
    assert "'verbose' is not one of" in result.output


def test_the_serving_flags_reach_the_engine_config() -> None:
    # ``generate`` takes the serving flags as ``start`` does, and nothing else but its own.
    ctx = generate.make_context(
        "generate",
        ["--prompt", "hi", "--model", __file__, "--model-id", "m", "--slots", "2",
         "--queue-limit", "3", "--threads", "5",
         "--recommend-temperature", "0.3", "--recommend-top-p", "0.7"],
    )  # fmt: skip
    own = ("prompt", "max_tokens", "temperature")
    flags = {k: v for k, v in ctx.params.items() if k not in own}
    (engine,) = options.serving(no_serve=False, **flags).llamacpp
    assert (engine.model_path, engine.model_id) == (Path(__file__), "m")
    assert (engine.slots, engine.queue_limit, engine.n_threads) == (2, 3, 5)
    assert (engine.temperature, engine.top_p) == (0.3, 0.7)


@pytest.mark.parametrize("flag", [("--recommend-temperature", "2.5"), ("--recommend-top-p", "0")])
def test_a_recommendation_out_of_range_is_refused_by_the_flag(flag: tuple[str, str]) -> None:
    with pytest.raises(click.BadParameter):
        start.make_context("start", list(flag))


def test_embeddings_serve_the_model_a_second_time_in_embedding_mode() -> None:
    ctx = start.make_context("start", ["--model", __file__, "--model-id", "m", "--embeddings"])
    flags = {k: v for k, v in ctx.params.items() if k in SERVING_FLAGS}
    chat, embed = options.serving(no_serve=False, **flags).llamacpp
    assert (chat.model_id, chat.embedding) == ("m", False)
    assert (embed.model_id, embed.embedding, embed.model_path) == (
        "m-embedding",
        True,
        Path(__file__),
    )
    ctx = start.make_context("start", ["--model", __file__])
    flags = {k: v for k, v in ctx.params.items() if k in SERVING_FLAGS}
    assert len(options.serving(no_serve=False, **flags).llamacpp) == 1


SERVING_FLAGS = frozenset(
    {"model_path", "model_id", "slots", "queue_limit", "threads", "recommend_temperature",
     "recommend_top_p", "embeddings", "upstream_url", "upstream_model",
     "upstream_embedding_model", "upstream_key_file"}
)  # fmt: skip
