"""The sampler's adjustments: logit_bias, presence and frequency penalties."""

from __future__ import annotations

import numpy as np
import pytest

from p2pnode.inference.sampling import Sampler, choose, kept

LOGITS = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)


def test_no_adjustment_is_the_logits_themselves() -> None:
    plain = Sampler(0.0, 1.0)
    assert not plain.adjusts
    assert plain.adjust(LOGITS, {1: 3}) is LOGITS


def test_a_bias_is_added_and_minus_a_hundred_bans_the_best() -> None:
    sampler = Sampler(0.0, 1.0, logit_bias=((1, -100.0), (3, 0.25)))
    adjusted = sampler.adjust(LOGITS, {})
    assert adjusted.tolist() == pytest.approx([1.0, -97.0, 2.0, 0.75])
    assert LOGITS.tolist() == [1.0, 3.0, 2.0, 0.5]  # the model's own, untouched
    assert choose(adjusted, sampler, np.random.default_rng(0)) == 2


def test_penalties_count_what_the_answer_already_holds() -> None:
    sampler = Sampler(0.0, 1.0, presence_penalty=0.5, frequency_penalty=0.75)
    # Token 1 twice, token 2 once: mu - c * frequency - (c > 0) * presence.
    adjusted = sampler.adjust(LOGITS, {1: 2, 2: 1})
    assert adjusted.tolist() == pytest.approx([1.0, 3.0 - 1.5 - 0.5, 2.0 - 0.75 - 0.5, 0.5])
    assert choose(adjusted, sampler, np.random.default_rng(0)) == 0


def test_a_negative_penalty_favours_repeating() -> None:
    sampler = Sampler(0.8, 1.0, frequency_penalty=-2.0)
    adjusted = sampler.adjust(LOGITS, {3: 2})
    assert kept(adjusted, sampler).ids[0] == 3
