"""Byte vectors of messages as peers of an earlier version encode, hash and sign
them: a field added since is left out at its default (protocols/wire.py:added),
so those peers' hashes and signatures still agree (docs/protocols.md#messages).

The infer vectors were computed with the code of commit a3116de, before score
requests added ``score_ids``, ``score_kind`` and ``Commitment.scored``; the
offer's with that of 2c444db, before a model offer could recommend sampling.
"""

from __future__ import annotations

from dataclasses import replace

from p2pnode.protocols import offers
from p2pnode.protocols.infer.messages import (
    SCORE,
    SEALED_CODEC,
    Bias,
    Chunk,
    Commitment,
    Format,
    Receipt,
    Request,
    Scored,
    Tool,
    Turn,
    request_hash,
)

REQUEST = Request(
    request_id="r1",
    model_id="m",
    kind="chat",
    messages=(Turn(role="user", content="hi"),),
    max_tokens=8,
    temperature=0.5,
    top_p=0.9,
    stop=("x",),
    seed=7,
    continuation="c",
)
REQUEST_HASH = "5bf9c66484f51753749c4250f57af565c101c9da2121c277ebf1806c8acfb921"

RECEIPT = Receipt(
    session_id=b"s",
    requests=1,
    prompt_tokens=2,
    completion_tokens=3,
    commitment=Commitment(
        request_hash=b"h" * 32,
        gguf_sha256="ab",
        prompt_tokens=2,
        completion_tokens=3,
        token_ids=(1, 2, 3),
        logprobs=(-1, -2, -3),
    ),
)
RECEIPT_SIGNED = (
    "7032706e6f64652f726563656970742f313a86aa73657373696f6e5f6964c40173a872657175657374"
    "7301ad70726f6d70745f746f6b656e7302b1636f6d706c6574696f6e5f746f6b656e7303aa636f6d6d"
    "69746d656e7486ac726571756573745f68617368c42068686868686868686868686868686868686868"
    "68686868686868686868686868ab676775665f736861323536a26162ad70726f6d70745f746f6b656e"
    "7302b1636f6d706c6574696f6e5f746f6b656e7303a9746f6b656e5f69647393010203a86c6f677072"
    "6f627393fffefda174a0"
)


def test_a_request_hashes_as_before_score_requests_existed() -> None:
    # (Nor penalties: a plain request is what a3116de's consumers sent.)
    assert request_hash(REQUEST).hex() == REQUEST_HASH
    assert not {"score_ids", "presence_penalty", "logit_bias"} & set(REQUEST.to_wire())


def test_penalties_travel_once_they_are_used() -> None:
    biased = replace(REQUEST, frequency_penalty=0.5, logit_bias=(Bias(token=3, bias=-100.0),))
    assert SEALED_CODEC.decode(SEALED_CODEC.encode_body(biased)) == biased
    assert request_hash(biased) != request_hash(REQUEST)


def test_an_output_format_travels_once_it_is_used() -> None:
    tool = Tool(name="get_time", parameters='{"type": "object"}')
    formatted = replace(REQUEST, format=Format(kind="tools", tools=(tool,), tool_choice="auto"))
    assert SEALED_CODEC.decode(SEALED_CODEC.encode_body(formatted)) == formatted
    assert request_hash(formatted) != request_hash(REQUEST)


def test_a_receipt_signs_the_same_bytes_as_before() -> None:
    assert RECEIPT.signing_bytes().hex() == RECEIPT_SIGNED


def test_a_chunk_without_ids_is_encoded_as_before() -> None:
    # (An upstream server's chunks carry no ids; a3116de's had none at all.)
    body = SEALED_CODEC.encode_body(Chunk(seq=3, text="hi", tokens=1))
    assert (
        body.hex()
        == "84a3736571 03a474657874a26869a6746f6b656e7301a174ab696e6665722e6368756e6b".replace(
            " ", ""
        )
    )


def test_added_fields_travel_once_they_are_used() -> None:
    score = Request(
        request_id="s1", model_id="m", kind=SCORE, prompt="hi", score_kind="completion",
        score_ids=(5, 6),
    )  # fmt: skip
    body = SEALED_CODEC.encode_body(score)
    assert SEALED_CODEC.decode(body) == score
    assert request_hash(score) != request_hash(Request(request_id="s1", model_id="m", kind=SCORE))
    assert RECEIPT.commitment is not None
    scored = Receipt(
        session_id=b"s", requests=1, prompt_tokens=2, completion_tokens=0,
        commitment=Commitment(request_hash=b"h" * 32, scored=Scored(impossible="no")),
    )  # fmt: skip
    assert b"scored" in scored.signing_bytes()
    # An older peer's map (no added fields at all) decodes to their defaults.
    old = {k: v for k, v in score.to_wire().items() if not k.startswith("score")}
    assert Request.from_wire(old) == Request(request_id="s1", model_id="m", kind=SCORE, prompt="hi")


OFFER = offers.Offer(
    peer_id="p",
    addrs=("/ip4/127.0.0.1/tcp/1",),
    models=(
        offers.ModelOffer(
            model_id="m",
            gguf_sha256="ab",
            context_length=8,
            price_per_s=3,
            bid_id="b",
            tokens_per_s=1.5,
        ),
    ),
    slots_free=1,
    queue_len=0,
    seq=2,
    timestamp=10.0,
    wallet="w",
)
OFFER_SIGNED = (
    "7032706e6f64652f6f666665722f313a89a7706565725f6964a170a5616464727391b42f6970342f3132"
    "372e302e302e312f7463702f31a66d6f64656c739186a86d6f64656c5f6964a16dab676775665f736861"
    "323536a26162ae636f6e746578745f6c656e67746808ab70726963655f7065725f7303a66269645f6964"
    "a162ac746f6b656e735f7065725f73cb3ff8000000000000aa736c6f74735f6672656501a971756575"
    "655f6c656e00a373657102a974696d657374616d70cb4024000000000000a677616c6c6574a177a174"
    "a56f66666572"
)


def test_an_offer_without_recommended_sampling_signs_the_same_bytes_as_before() -> None:
    assert OFFER.signing_bytes().hex() == OFFER_SIGNED


def test_a_recommendation_travels_and_an_older_peers_offer_reads_as_none() -> None:
    (model,) = OFFER.models
    recommending = replace(
        OFFER, models=(replace(model, temperature=0.2, top_p=0.9, features=("penalties",)),)
    )
    decoded = offers.GOSSIP_CODEC.decode(offers.GOSSIP_CODEC.encode_body(recommending))
    assert decoded == recommending
    assert recommending.signing_bytes() != OFFER.signing_bytes()
    old = offers.GOSSIP_CODEC.decode(offers.GOSSIP_CODEC.encode_body(OFFER))
    assert isinstance(old, offers.Offer)
    assert (old.models[0].temperature, old.models[0].top_p, old.models[0].features) == (
        None,
        None,
        (),
    )
