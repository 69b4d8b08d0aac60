"""Inference-stream messages: round trips, sealed transport, signed receipts."""

from __future__ import annotations

from dataclasses import replace

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2pnode.p2p.discovery import verify_peer_signature
from p2pnode.protocols.infer.messages import (
    CLEAR_CODEC,
    SEALED_CODEC,
    Ack,
    Chunk,
    Done,
    InferOpen,
    Receipt,
    Request,
    Turn,
)
from p2pnode.protocols.session.crypto import Ephemeral, Opener, Sealer, SessionKeys, transcript_hash

SESSION = b"\x01" * 32


def test_request_and_chunks_survive_sealing() -> None:
    a, b = Ephemeral(), Ephemeral()
    keys = SessionKeys.derive(a.shared_secret(b.public), transcript_hash(b"t"))
    request = Request(
        request_id="r1",
        model_id="m",
        kind="chat",
        messages=(Turn(role="system", content="be brief"), Turn(role="user", content="hi")),
        max_tokens=16,
        temperature=0.0,
        stop=("\n",),
        seed=7,
    )
    sealer = Sealer(keys.consumer_to_provider, SESSION, 3)
    opener = Opener(keys.consumer_to_provider, SESSION, 3)
    for msg in (request, Ack(signature=b"s" * 64)):
        assert SEALED_CODEC.decode(opener.open(sealer.seal(SEALED_CODEC.encode_body(msg)))) == msg
    up = Sealer(keys.provider_to_consumer, SESSION, 3)
    down = Opener(keys.provider_to_consumer, SESSION, 3)
    chunks = [Chunk(seq=i, text=f"t{i}", tokens=2) for i in range(3)]
    got = [SEALED_CODEC.decode(down.open(up.seal(SEALED_CODEC.encode_body(c)))) for c in chunks]
    assert got == chunks


def test_the_opening_frame_is_clear() -> None:
    opening = InferOpen(session_id=SESSION, stream_id=3)
    assert CLEAR_CODEC.decode(CLEAR_CODEC.encode_body(opening)) == opening


def test_receipts_are_signed_and_acknowledged_over_the_same_bytes() -> None:
    provider, consumer = create_new_key_pair(), create_new_key_pair()
    receipt = Receipt(session_id=SESSION, requests=2, prompt_tokens=70, completion_tokens=300)
    signed = replace(receipt, signature=provider.private_key.sign(receipt.signing_bytes()))
    done = Done(finish_reason="stop", prompt_tokens=35, completion_tokens=150, receipt=signed)
    arrived = SEALED_CODEC.decode(SEALED_CODEC.encode_body(done))
    assert isinstance(arrived, Done)
    provider_id = str(ID.from_pubkey(provider.public_key))
    payload = arrived.receipt.signing_bytes()
    assert verify_peer_signature(provider_id, payload, arrived.receipt.signature)
    # Any change to the usage breaks the provider's signature.
    inflated = replace(arrived.receipt, completion_tokens=301)
    assert not verify_peer_signature(provider_id, inflated.signing_bytes(), inflated.signature)
    ack = Ack(signature=consumer.private_key.sign(payload))
    consumer_id = str(ID.from_pubkey(consumer.public_key))
    assert verify_peer_signature(consumer_id, payload, ack.signature)
