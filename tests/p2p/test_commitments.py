"""What a consumer checks of every provider's commitment, without its model."""

from __future__ import annotations

from dataclasses import replace

import pytest

from p2pnode.p2p.consumer import FalseCommitment, check_commitment, offence_of_violation
from p2pnode.p2p.reputation import Offence
from p2pnode.protocols.infer.messages import Commitment, Done, Receipt, Request, request_hash

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
        (None, "length", "no commitment"),
        (replace(HONEST, request_hash=b"\x00" * 32), "length", "another request"),
        (replace(HONEST, gguf_sha256="cd" * 32), "length", "other weights"),
        (replace(HONEST, completion_tokens=4), "length", "other usage"),
        (replace(HONEST, prompt_tokens=9), "length", "other usage"),
        (replace(HONEST, token_ids=(5, 6)), "length", "claims 3 tokens for 2"),
        (replace(HONEST, token_ids=(5, 6, 7, 2)), "length", "claims 3 tokens for 4"),
        (replace(HONEST, token_ids=(5, 6, 7, 2, 2)), "stop", "claims 3 tokens for 5"),
        (replace(HONEST, logprobs=(-1,)), "length", "some tokens only"),
    ],
)
def test_a_false_commitment_is_a_broken_promise(
    lie: Commitment | None, finish: str, why: str
) -> None:
    with pytest.raises(FalseCommitment, match=why) as caught:
        check_commitment(done(lie, finish), WIRE, WEIGHTS)
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
