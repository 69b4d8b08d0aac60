"""What a node needs to know at start: the configs of its parts, composed.

``p2pnode start`` builds one from its options (``cli/``), simnet and the
tests build theirs directly; ``p2p/node.py:open_node`` takes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from p2pnode.p2p import audit as auditlib
from p2pnode.p2p import consumer as consumerlib
from p2pnode.p2p import discovery as discoverylib
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import market as marketlib
from p2pnode.p2p import provider as providerlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.protocols import dialback, offers, status


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Everything a node needs to know at start; composed of subsystem configs."""

    host: hostlib.Config = field(default_factory=hostlib.Config)
    status: status.Config = field(default_factory=status.Config)
    # None: no DHT, no gossip (a throwaway client such as `p2pnode status`).
    discovery: discoverylib.Config | None = field(default_factory=discoverylib.Config)
    # Models this node announces. The inference engines fill this from what
    # they really serve; a config may announce models for testing discovery.
    models: tuple[offers.ModelOffer, ...] = ()
    # Wallet address carried in offers (None in free mode without a wallet).
    wallet: str | None = None
    # Unix socket for `p2pnode offers` / `peers` (None: no local control).
    control_socket: Path | None = None
    # Full multiaddrs (with /p2p/<id>) of peers to join the network through.
    bootstrap: tuple[str, ...] = ()
    # Bound on the first attempt to reach each bootstrap peer at start; the
    # node starts regardless and keeps trying in the background.
    bootstrap_timeout: float = 5.0
    # How often lost bootstrap peers are tried again. Seconds, not faster:
    # a bootstrap peer that is down should not cost the network much.
    bootstrap_retry_s: float = 30.0
    # At start, each served model generates this many tokens once so that
    # offers carry a measured tokens/s (0 skips it; ~0.7 s for SmolLM2).
    measure_tokens: int = 32
    # Sessions and requests this node serves (when it has engines) ...
    provider: providerlib.Config = field(default_factory=providerlib.Config)
    # ... and those it asks of others,
    consumer: consumerlib.Config = field(default_factory=consumerlib.Config)
    # ... a share of whose answers it audits (None: none).
    audit: auditlib.Config | None = field(default_factory=auditlib.Config)
    # The chain and this node's account on it (None: free mode, nobody pays).
    market: marketlib.Config | None = None
    dialback: dialback.Config = field(default_factory=dialback.Config)
    # "auto": measured by dial-back; "public"/"private": as configured.
    reachability: str = "auto"
    # The first check waits for the node's start-up (connections, identify,
    # gossip: ~10 s of CPU in a 50-node simnet) to be over; then it repeats,
    # since addresses and NATs change.
    reachability_first_s: float = 30.0
    reachability_every_s: float = 300.0
    # Circuit relay v2: the service this node offers others, and the relays a
    # private node reserves on.
    relay: relaylib.Config = field(default_factory=relaylib.Config)
    relay_check_s: float = 30.0
    # What the node remembers of peers' misbehaviour, and when it bans.
    reputation: reputationlib.Config = field(default_factory=reputationlib.Config)
    # Inbound streams of our protocols running at once, per peer and overall;
    # a stream beyond is reset on arrival. A consumer runs a few requests at
    # once; hundreds from one peer are an attack.
    max_streams_per_peer: int = 64
    max_streams: int = 1024
