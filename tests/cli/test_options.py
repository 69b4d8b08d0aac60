"""``p2pnode start``'s flags, parsed by click as the command parses them, land in the node's config.

In process: nothing starts. Each flag is given a value other than its
default, so a flag wired to the wrong field (or to none) fails here.
"""

from __future__ import annotations

from pathlib import Path

from p2pnode.cli import options
from p2pnode.cli.node_cmd import start

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
        ]
    )  # fmt: skip
    config = parsed.node_config(Path("control.sock"), None)
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
