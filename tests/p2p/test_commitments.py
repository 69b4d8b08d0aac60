"""What a consumer checks of every provider's commitment, without its model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from p2pnode.p2p.consumer import (
    FalseCommitment,
    check_commitment,
    check_scored,
    offence_of_violation,
)
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols.infer.messages import (
    SCORE,
    Commitment,
    Done,
    Receipt,
    Request,
    Scored,
    request_hash,
)

WEIGHTS = "ab" * 32
WIRE = Request(request_id="r1", model_id="m", kind="completion", prompt="hi", max_tokens=8)


def done(commitment: Commitment | None, finish: str = "length", tokens: int = 3) -> Done:
    receipt = Receipt(
        session_id=b"s", requests=1, prompt_tokens=2, completion_tokens=tokens,
        commitment=commitment,
    )  # fmt: skip
    return Done(finish_reason=finish, prompt_tokens=2, completion_tokens=tokens, receipt=receipt)


HONEST = Commitment(
    request_hash=request_hash(WIRE),
    gguf_sha256=WEIGHTS,
    prompt_tokens=2,
    completion_tokens=3,
    token_ids=(5, 6, 7),
    logprobs=(-100, -20, -3),
)


def test_an_honest_commitment_passes() -> None:
    check_commitment(done(HONEST), WIRE, WEIGHTS)
    # An end-of-generation id is generated but not usage: one more id, on "stop".
    stopped = replace(HONEST, token_ids=(5, 6, 7, 2), logprobs=(-1, -2, -3, -4))
    check_commitment(done(stopped, "stop"), WIRE, WEIGHTS)
    # A provider with no weights file (an upstream server) commits to less.
    check_commitment(done(replace(HONEST, gguf_sha256="", token_ids=(), logprobs=())), WIRE, None)


@pytest.mark.parametrize(
    ("lie", "finish", "why"),
    [
        (None, "length", "sent no commitment with its answer"),
        (
            replace(HONEST, request_hash=b"\x00" * 32),
            "length",
            "committed to another request than ours",
        ),
        (
            replace(HONEST, gguf_sha256="cd" * 32),
            "length",
            "served other weights than its offer names",
        ),
        (replace(HONEST, completion_tokens=4), "length", "signed other usage than it reported"),
        (replace(HONEST, prompt_tokens=9), "length", "signed other usage than it reported"),
        (replace(HONEST, token_ids=(5, 6)), "length", "claims 3 tokens for 2 token ids"),
        (replace(HONEST, token_ids=(5, 6, 7, 2)), "length", "claims 3 tokens for 4 token ids"),
        (replace(HONEST, token_ids=(5, 6, 7, 2, 2)), "stop", "claims 3 tokens for 5 token ids"),
        (
            replace(HONEST, logprobs=(-1,)),
            "length",
            "committed to a log-probability for some tokens only",
        ),
    ],
)
def test_a_false_commitment_is_a_broken_promise(
    lie: Commitment | None, finish: str, why: str
) -> None:
    with pytest.raises(FalseCommitment) as caught:
        check_commitment(done(lie, finish), WIRE, WEIGHTS)
    assert str(caught.value) == f"bad_field: {why}"
    assert offence_of_violation(caught.value) is Offence.BROKEN_PROMISE


def test_the_request_hash_covers_every_field() -> None:
    for changed in (
        replace(WIRE, prompt="ho"),
        replace(WIRE, temperature=0.9),
        replace(WIRE, top_p=0.5),
        replace(WIRE, max_tokens=9),
        replace(WIRE, continuation="x"),
        replace(WIRE, seed=3),
    ):
        assert request_hash(changed) != request_hash(WIRE)


SCORE_WIRE = replace(WIRE, kind=SCORE, score_kind="completion", score_ids=(5, 6, 7))
SCORED = Scored(
    gaps=(0.0, 1.5, 0.0),
    kept=(True, False, True),
    below=(0.0, 1.0, 0.25),
    prob=(0.9, 0.0, 0.5),
    possible=(True, True, True),
    prompt_tokens=2,
    text=" a b",
    ends_with_eog=False,
)
SCORES = Commitment(
    request_hash=request_hash(SCORE_WIRE),
    gguf_sha256=WEIGHTS,
    prompt_tokens=5,
    token_ids=(5, 6, 7),
    logprobs=(-100, -2000, -3),
    scored=SCORED,
)


def scored(
    commitment: Commitment, *, tokens: int = 0, finish: str = "stop", prompt: int = 5
) -> Done:
    """An auditor's Done for SCORE_WIRE: its prefill billed as prompt tokens."""
    receipt = Receipt(
        session_id=b"s", requests=1, prompt_tokens=prompt, completion_tokens=tokens,
        commitment=commitment,
    )  # fmt: skip
    return Done(
        finish_reason=finish, prompt_tokens=prompt, completion_tokens=tokens, receipt=receipt
    )


def test_an_auditors_scores_pass_when_they_are_of_our_ids_and_in_range() -> None:
    check_scored(scored(SCORES), SCORE_WIRE, WEIGHTS)
    # At the edges of what a model gives: a certain token (log-probability 0),
    # and a kept token whose mass before it and its own make up all of it.
    certain = replace(SCORES, logprobs=(0, -2000, -3))
    check_scored(scored(certain), SCORE_WIRE, WEIGHTS)
    whole = replace(SCORES, scored=replace(SCORED, below=(0.0, 1.0, 0.5), prob=(1.0, 0.0, 0.5)))
    check_scored(scored(whole), SCORE_WIRE, WEIGHTS)
    # "No run of the model gives these ids" says nothing else, and is an answer.
    impossible = replace(SCORES, logprobs=(), scored=Scored(impossible="id outside"))
    check_scored(scored(impossible, prompt=5), SCORE_WIRE, WEIGHTS)


@pytest.mark.parametrize(
    ("lie", "tokens", "weights", "why", "finish"),
    [
        (replace(SCORES, scored=None), 0, WEIGHTS, "sent no scores for a score request", "stop"),
        (
            replace(SCORES, request_hash=request_hash(WIRE)),
            0,
            WEIGHTS,
            "scored another request than ours",
            "stop",
        ),
        (SCORES, 0, "cd" * 32, "scored with other weights than its offer names", "stop"),
        (
            SCORES,
            0,
            None,
            "scored with other weights than its offer names",
            "stop",
        ),  # an offer naming no weights cannot audit
        (
            replace(SCORES, token_ids=(5, 6, 8)),
            0,
            WEIGHTS,
            "scored other ids than ours, or generated some",
            "stop",
        ),
        (SCORES, 1, WEIGHTS, "scored other ids than ours, or generated some", "stop"),
        (
            replace(SCORES, completion_tokens=1),
            0,
            WEIGHTS,
            "scored other ids than ours, or generated some",
            "stop",
        ),
        (replace(SCORES, logprobs=(-1, -2)), 0, WEIGHTS, "sent scores for some ids only", "stop"),
        (
            replace(SCORES, scored=replace(SCORED, kept=(True,))),
            0,
            WEIGHTS,
            "sent scores for some ids only",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, impossible="x")),
            0,
            WEIGHTS,
            "sent scores for some ids only",
            "stop",
        ),
        (replace(SCORES, logprobs=(-1, 2, -3)), 0, WEIGHTS, "sent scores no model gives", "stop"),
        (replace(SCORES, logprobs=(-1, 1, -3)), 0, WEIGHTS, "sent scores no model gives", "stop"),
        (
            replace(SCORES, scored=replace(SCORED, gaps=(0, -1, 0))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, prob=(0.9, 0, 1.5))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, below=(-0.1, 1, 0))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, prompt_tokens=-1)),
            0,
            WEIGHTS,
            "billed another prefill than the prompt and our ids",
            "stop",
        ),
        (SCORES, 0, WEIGHTS, "ended a score request with 'length'", "length"),
        (
            replace(SCORES, prompt_tokens=9),
            0,
            WEIGHTS,
            "billed another prefill than the prompt and our ids",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, prob=(0.9, 0, 0.8))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, possible=(False, True, True))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, prob=(0.9, 0.1, 0.5))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, below=(0, 0.5, 0.25))),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
        (
            replace(SCORES, scored=replace(SCORED, cpu_s=-1.0)),
            0,
            WEIGHTS,
            "sent scores no model gives",
            "stop",
        ),
    ],
)
def test_scores_an_auditor_could_not_have_measured_are_a_broken_promise(
    lie: Commitment, tokens: int, weights: str | None, why: str, finish: str
) -> None:
    with pytest.raises(FalseCommitment) as caught:
        check_scored(scored(lie, tokens=tokens, finish=finish), SCORE_WIRE, weights)
    assert str(caught.value) == f"bad_field: {why}"
    assert offence_of_violation(caught.value) is Offence.BROKEN_PROMISE
