"""Who may open a session: the provider's admission of a Hello, as one pure decision.

The provider's adapter (``p2p/provider.py:Provider.serve_session``) gathers
what the decision needs, both clocks included, and :func:`decide` says yes
(None) or why not (a :class:`RejectCode`), in this order: the allowlist
(a peer id, or a wallet that signed this very Hello, naming this provider), the model, the
Hello's age by the wall clock, the peer's rate by the monotonic clock, and
in paid mode the Hello's chain fields (``p2p/market/billing.py:ProviderMarket.check_hello``).
A wallet field alone is anyone's to write: only :func:`signed_by_wallet`
makes it mean something.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_defunct

from p2pnode.protocols.session.messages import Hello, RejectCode


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The provider's admission rules."""

    # Peer ids and wallet addresses (lower case) allowed to open sessions;
    # empty: everyone.
    allowlist: frozenset[str] = frozenset()
    # How far a Hello's timestamp may be from our wall clock.
    hello_skew_s: float = 120.0


def signed_by_wallet(hello: Hello) -> bool:
    """Whether the Hello's ``consumer_wallet`` signed it (EIP-191 over its signing bytes)."""
    if not hello.consumer_wallet or not hello.signature:
        return False
    try:
        signer = Account.recover_message(
            encode_defunct(primitive=hello.signing_bytes()), signature=hello.signature
        )
    except Exception:  # noqa: BLE001 - eth-account raises several kinds on bad input
        return False
    return bool(signer.lower() == hello.consumer_wallet.lower())


def decide(
    hello: Hello,
    peer: str,
    cfg: Config,
    *,
    local_peer: str,
    served: Collection[str],
    wall_now: float,
    rate_allows: Callable[[str, float], bool],
    clock_now: float,
    paid: Callable[[Hello], RejectCode | None] | None = None,
) -> RejectCode | None:
    """Admit ``peer``'s Hello (None) or say why not; ``local_peer`` is this provider.

    ``served``: the model ids served here. ``wall_now`` is the wall clock the
    Hello's timestamp is compared with; ``clock_now`` the monotonic clock the
    rate limiter counts by (``rate_allows(peer, clock_now)`` spends a token).
    ``paid`` checks the chain fields in paid mode.
    """
    allow = cfg.allowlist
    if allow and peer not in allow:
        # A wallet's Hello admits only at the provider it names: one seen by
        # another provider cannot be replayed here within its skew.
        wallet = (hello.consumer_wallet or "").lower()
        if wallet not in allow or hello.provider != local_peer or not signed_by_wallet(hello):
            return RejectCode.NOT_ALLOWED
    if hello.model_id not in served:
        return RejectCode.UNKNOWN_MODEL
    if abs(wall_now - hello.timestamp) > cfg.hello_skew_s:
        return RejectCode.STALE_HELLO
    if not rate_allows(peer, clock_now):
        return RejectCode.RATE_LIMITED
    return paid(hello) if paid is not None else None
