"""Command-line values turned into p2pnode's configuration: no click here.

The commands (``cli/node_cmd.py``, ``cli/demo.py``, ``cli/sim_cmd.py``)
parse; what the values mean for the node (which engines it opens, its
``NodeConfig``) is decided here, so that it can be read and tested without
a command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pnode.cli import settings
from p2pnode.errors import ConfigError

if TYPE_CHECKING:  # imported where used: the CLI starts without libp2p
    from p2pnode.p2p.config import NodeConfig
    from p2pnode.p2p.market import Config as MarketConfig


EMBEDDING_SUFFIX = "-embedding"
"""The id a model served for embeddings (``--embeddings``) is announced under."""


def serving(
    *,
    no_serve: bool,
    model_path: Path | None,
    model_id: str | None,
    slots: int,
    queue_limit: int,
    threads: int | None,
    recommend_temperature: float | None,
    recommend_top_p: float | None,
    embeddings: bool,
    upstream_url: str | None,
    upstream_model: tuple[str, ...],
    upstream_embedding_model: tuple[str, ...],
    upstream_key_file: Path | None,
) -> Any:
    from p2pnode.inference import llamacpp, upstream
    from p2pnode.inference.serving import Serving

    if no_serve:
        return Serving()
    if upstream_model and not upstream_url:
        raise ConfigError("--upstream-model needs --upstream-url")
    if upstream_embedding_model and not upstream_url:
        raise ConfigError("--upstream-embedding-model needs --upstream-url")
    ups: tuple[upstream.Config, ...] = ()
    if upstream_url:
        if not upstream_model and not upstream_embedding_model:
            raise ConfigError("--upstream-url needs at least one --upstream-model")
        key = None
        if upstream_key_file is not None:
            key = settings.read_secret_file(upstream_key_file).strip()
        ups = (
            upstream.Config(
                base_url=upstream_url,
                models=upstream_model,
                embedding_models=upstream_embedding_model,
                api_key=key,
                queue_limit=queue_limit,
            ),
        )
    local: tuple[llamacpp.Config, ...] = ()
    if model_path is not None or not ups:  # the bundled model unless told otherwise
        path = model_path if model_path is not None else llamacpp.bundled_model_path()
        ident = model_id or (path.stem if model_path is not None else llamacpp.BUNDLED_MODEL_ID)
        extra: dict[str, Any] = {"n_threads": threads} if threads else {}
        chat = llamacpp.Config(
            model_path=path,
            model_id=ident,
            slots=slots,
            queue_limit=queue_limit,
            temperature=recommend_temperature,
            top_p=recommend_top_p,
            **extra,
        )
        local = (chat,)
        if embeddings:
            embed = llamacpp.Config(
                model_path=path,
                model_id=f"{ident}{EMBEDDING_SUFFIX}",
                queue_limit=queue_limit,
                embedding=True,
                **extra,
            )
            local = (chat, embed)
    return Serving(llamacpp=local, upstream=ups)


@dataclass(frozen=True, slots=True, kw_only=True)
class PaidOptions:
    """``p2pnode start``'s options for paying providers (used with a chain)."""

    spend_limit: str  # whole tokens, as written
    session_seconds: int
    max_price: int

    @classmethod
    def take(cls, values: dict[str, Any]) -> PaidOptions:
        """Take this class's fields out of ``values`` (click's keyword arguments)."""
        return cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls)})

    def terms(self, sessions_db: Path) -> MarketConfig:
        """The consumer's terms; a spend limit that is no amount is a ConfigError."""
        from p2pnode.chain.units import parse_tokens
        from p2pnode.p2p import market

        return market.Config(
            session_seconds=self.session_seconds,
            spend_limit=parse_tokens(self.spend_limit),
            max_price_per_s=self.max_price,
            sessions_db=sessions_db,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeOptions:
    """``p2pnode start``'s options that shape the node itself (not its engines or chain)."""

    listen: tuple[str, ...]
    bootstrap: tuple[str, ...]
    announce_model: tuple[str, ...]
    allow: tuple[str, ...]
    rate_limit: int
    reachability: str
    reachability_first_s: float
    relay_service: bool
    relays: tuple[str, ...]
    relay_max_reservations: int
    relay_max_circuits: int
    relay_circuit_seconds: int
    relay_circuit_mib: int
    relay_max_circuits_per_peer: int
    relay_total_mib: int
    relay_total_seconds: int
    dialback_per_minute: int
    dialback_per_peer_per_minute: int
    no_hole_punch: bool
    audit_rate: float
    no_remote_audits: bool

    @classmethod
    def take(cls, values: dict[str, Any]) -> NodeOptions:
        """Take this class's fields out of ``values`` (click's keyword arguments)."""
        return cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls)})

    def node_config(
        self, control_socket: Path, paid: MarketConfig | None, audits: Path | None = None
    ) -> NodeConfig:
        """The node's configuration; ``paid`` is the chain's part (None: free mode),
        ``audits`` the file of providers' audit records."""
        from p2pnode.p2p import audit as auditlib
        from p2pnode.p2p import host as hostlib
        from p2pnode.p2p import provider as providerlib
        from p2pnode.p2p import relay as relaylib
        from p2pnode.p2p.config import NodeConfig
        from p2pnode.protocols import dialback, offers
        from p2pnode.protocols.session import admission

        return NodeConfig(
            host=hostlib.Config(listen=tuple(self.listen)),
            bootstrap=tuple(self.bootstrap),
            control_socket=control_socket,
            models=tuple(offers.ModelOffer(model_id=m) for m in self.announce_model),
            provider=providerlib.Config(
                admission=admission.Config(
                    allowlist=frozenset(
                        # Wallet addresses in any case; peer ids (base58) as written.
                        a.lower() if a.lower().startswith("0x") else a
                        for a in self.allow
                    )
                ),
                requests_per_minute=self.rate_limit,
            ),
            market=paid,
            reachability=self.reachability,
            reachability_first_s=self.reachability_first_s,
            relay=relaylib.Config(
                service=self.relay_service,
                relays=tuple(self.relays),
                max_reservations=self.relay_max_reservations,
                max_circuits=self.relay_max_circuits,
                circuit_duration_s=self.relay_circuit_seconds,
                circuit_bytes=self.relay_circuit_mib << 20,
                max_circuits_per_peer=self.relay_max_circuits_per_peer,
                total_bytes=self.relay_total_mib << 20,
                total_window_s=self.relay_total_seconds,
                hole_punch=not self.no_hole_punch,
            ),
            dialback=dialback.Config(
                requests_per_minute=self.dialback_per_minute,
                requests_per_peer_per_minute=self.dialback_per_peer_per_minute,
            ),
            audit=auditlib.Config(
                rate=self.audit_rate, path=audits, remote=not self.no_remote_audits
            ),
        )

    def relay_summary(self) -> str:
        """The relay service's limits, as ``start`` prints them."""
        return (
            f"relay service: up to {self.relay_max_reservations} reservations,"
            f" {self.relay_max_circuits} circuits ({self.relay_max_circuits_per_peer} per peer)"
            f" of {self.relay_circuit_seconds} s and {self.relay_circuit_mib} MiB each,"
            f" {self.relay_total_mib} MiB per {self.relay_total_seconds} s in all"
        )
