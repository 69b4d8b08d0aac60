"""The provider's admission of a Hello, as one pure decision with both clocks passed in."""

from __future__ import annotations

from dataclasses import replace

from eth_account import Account
from eth_account.messages import encode_defunct

from p2pnode.protocols.session import admission
from p2pnode.protocols.session.messages import Hello, RejectCode

WALL = 1_800_000_000.0
ME = "12D3KooWme"
HELLO = Hello(model_id="m", ephemeral=b"e" * 32, nonce=b"n" * 16, timestamp=WALL)


def _decide(hello: Hello, peer: str = "peer", **kw: object) -> RejectCode | None:
    args: dict[str, object] = {
        "served": {"m"},
        "wall_now": WALL,
        "rate_allows": lambda _peer, _now: True,
        "clock_now": 0.0,
        "local_peer": ME,
    }
    args.update(kw)
    cfg = args.pop("cfg", admission.Config())
    assert isinstance(cfg, admission.Config)
    return admission.decide(hello, peer, cfg, **args)  # type: ignore[arg-type]


def _signed(account: object, hello: Hello) -> Hello:
    signature = Account.sign_message(encode_defunct(primitive=hello.signing_bytes()), account.key)  # type: ignore[attr-defined]
    return replace(hello, signature=bytes(signature.signature))


def test_an_open_provider_admits_a_fresh_hello_for_a_model_it_serves() -> None:
    assert _decide(HELLO) is None
    assert _decide(replace(HELLO, model_id="other")) is RejectCode.UNKNOWN_MODEL


def test_the_hello_is_aged_by_the_wall_clock_and_the_rate_by_the_monotonic_one() -> None:
    asked: list[tuple[str, float]] = []

    def rate(peer: str, now: float) -> bool:
        asked.append((peer, now))
        return False

    assert _decide(HELLO, wall_now=WALL + 121) is RejectCode.STALE_HELLO
    assert _decide(HELLO, wall_now=WALL - 121) is RejectCode.STALE_HELLO
    assert asked == []  # a stale Hello spends no token
    assert _decide(HELLO, wall_now=WALL + 119, rate_allows=rate, clock_now=7.5) is (
        RejectCode.RATE_LIMITED
    )
    assert asked == [("peer", 7.5)]


def test_an_allowlisted_wallet_counts_only_when_it_signed_this_hello() -> None:
    owner, impostor = Account.create(), Account.create()
    cfg = admission.Config(allowlist=frozenset({owner.address.lower(), "friend"}))
    claimed = replace(HELLO, consumer_wallet=owner.address, provider=ME)
    assert _decide(claimed, cfg=cfg) is RejectCode.NOT_ALLOWED  # the field alone
    assert _decide(_signed(impostor, claimed), cfg=cfg) is RejectCode.NOT_ALLOWED
    assert _decide(_signed(owner, claimed), cfg=cfg) is None
    assert _decide(HELLO, peer="friend", cfg=cfg) is None  # an allowed peer id
    # Any change after signing (here the provider it names) undoes the signature.
    assert _decide(replace(_signed(owner, claimed), provider="x"), cfg=cfg) is (
        RejectCode.NOT_ALLOWED
    )


def test_a_wallets_hello_admits_only_at_the_provider_it_names() -> None:
    # A signed Hello seen by one provider, replayed to another within its skew.
    owner = Account.create()
    cfg = admission.Config(allowlist=frozenset({owner.address.lower()}))
    elsewhere = _signed(owner, replace(HELLO, consumer_wallet=owner.address, provider="12D3Koo"))
    assert _decide(elsewhere, cfg=cfg) is RejectCode.NOT_ALLOWED
    unnamed = _signed(owner, replace(HELLO, consumer_wallet=owner.address))
    assert _decide(unnamed, cfg=cfg) is RejectCode.NOT_ALLOWED


def test_the_paid_check_comes_last_and_has_the_last_word() -> None:
    seen: list[Hello] = []

    def paid(hello: Hello) -> RejectCode | None:
        seen.append(hello)
        return RejectCode.PRICE_CHANGED

    assert _decide(replace(HELLO, model_id="other"), paid=paid) is RejectCode.UNKNOWN_MODEL
    assert seen == []
    assert _decide(HELLO, paid=paid) is RejectCode.PRICE_CHANGED
    assert seen == [HELLO]


def test_a_signature_that_is_not_one_admits_nobody() -> None:
    owner = Account.create()
    hello = replace(HELLO, consumer_wallet=owner.address, provider=ME)
    for junk in (b"\x00" * 65, b"short", b"\xff" * 65):
        assert not admission.signed_by_wallet(replace(hello, signature=junk))
    assert not admission.signed_by_wallet(replace(_signed(owner, hello), consumer_wallet=""))
    assert admission.signed_by_wallet(_signed(owner, hello))


def test_a_hello_exactly_at_the_skew_is_still_fresh() -> None:
    skew = admission.Config().hello_skew_s
    assert _decide(HELLO, wall_now=WALL + skew) is None
    assert _decide(HELLO, wall_now=WALL - skew) is None
