"""Misbehaviour scores as the README states them: weights, half-life, ban, bound."""

from __future__ import annotations

import pytest

from p2pnode.p2p.reputation import Config, Offence, Reputation

T0 = 1000.0


@pytest.mark.parametrize(
    ("offence", "weight"),
    [
        (Offence.FAILED, 1.0),
        (Offence.REFUSED, 1.0),
        (Offence.PROTOCOL, 2.0),
        (Offence.BROKEN_PROMISE, 4.0),
        (Offence.AUTH, 8.0),
        (Offence.PAID_NO_SERVICE, 40.0),
    ],
)
def test_each_offence_adds_its_weight(offence: Offence, weight: float) -> None:
    reputation = Reputation(Config())
    assert reputation.record("p", offence, T0) == weight
    assert reputation.record("p", offence, T0) == 2 * weight
    assert reputation.totals[offence] == 2


def test_a_score_halves_every_five_minutes_and_fades_to_clean() -> None:
    reputation = Reputation(Config())
    assert Config().half_life_s == 300.0
    reputation.record("p", Offence.AUTH, T0)
    assert reputation.score("p", T0 + 300) == pytest.approx(4.0)
    assert reputation.score("p", T0 + 600) == pytest.approx(2.0)
    # Decay is counted from the last offence: a new one adds to what is left.
    assert reputation.record("p", Offence.FAILED, T0 + 600) == pytest.approx(3.0)
    # Below a quarter the peer counts as clean again.
    fade = 300 * 4  # 3 -> 0.1875 after four half-lives
    assert reputation.score("p", T0 + 600 + fade) == 0.0
    assert reputation.score("unknown", T0) == 0.0


def test_twenty_bans_until_the_score_decays_below() -> None:
    reputation = Reputation(Config())
    for _ in range(2):
        reputation.record("tamperer", Offence.AUTH, T0)
    assert not reputation.banned("tamperer", T0)  # 16
    reputation.record("tamperer", Offence.AUTH, T0)
    assert reputation.banned("tamperer", T0)  # 24: the third try bans
    standing = reputation.standing("tamperer", T0)
    assert standing is not None
    assert (standing.score, standing.banned, standing.offences) == (24.0, True, {"auth": 3})
    # 24 halves below 20 within a half-life.
    assert not reputation.banned("tamperer", T0 + 300)
    # A paid session taken and not served bans at once, for about a half-life.
    reputation.record("taker", Offence.PAID_NO_SERVICE, T0)
    assert reputation.banned("taker", T0)
    assert reputation.banned("taker", T0 + 299)
    assert not reputation.banned("taker", T0 + 301)


def test_serving_is_shown_and_never_erases_offences() -> None:
    reputation = Reputation(Config())
    reputation.record("p", Offence.FAILED, T0)
    for _ in range(5):
        reputation.served("p", T0)
    standing = reputation.standing("p", T0)
    assert standing is not None
    assert (standing.served, standing.score, standing.offences) == (5, 1.0, {"failed": 1})
    assert reputation.standing("nobody", T0) is None


def test_the_table_is_bounded_and_a_flood_pushes_out_the_least_suspicious() -> None:
    reputation = Reputation(Config(max_peers=20))
    reputation.record("cheat", Offence.AUTH, T0)
    for n in range(200):  # a Sybil flood of fresh identities
        reputation.record(f"sybil{n}", Offence.REFUSED, T0 + n)
        assert len(reputation) <= 20
    assert reputation.score("cheat", T0 + 200) > 0  # the worst is remembered
    assert Config().max_peers == 10_000
