"""Session keys and sealed frames: what authenticates and what must not."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols.session.crypto import (
    MAX_FRAMES,
    Ephemeral,
    Opener,
    Sealer,
    SessionKeys,
    handshake_transcript,
    transcript_hash,
)

SESSION = b"s" * 32


def _pair() -> tuple[SessionKeys, SessionKeys]:
    consumer, provider = Ephemeral(), Ephemeral()
    transcript = transcript_hash(b"hello", consumer.public, b"approve", provider.public)
    return (
        SessionKeys.derive(consumer.shared_secret(provider.public), transcript),
        SessionKeys.derive(provider.shared_secret(consumer.public), transcript),
    )


def test_both_sides_derive_the_same_two_distinct_keys() -> None:
    at_consumer, at_provider = _pair()
    assert at_consumer == at_provider
    assert at_consumer.consumer_to_provider != at_consumer.provider_to_consumer
    assert len(at_consumer.consumer_to_provider) == 32


def test_a_different_transcript_gives_different_keys() -> None:
    consumer, provider = Ephemeral(), Ephemeral()
    secret = consumer.shared_secret(provider.public)
    assert SessionKeys.derive(secret, transcript_hash(b"a")) != SessionKeys.derive(
        secret, transcript_hash(b"b")
    )


def test_transcript_parts_cannot_be_shifted() -> None:
    assert transcript_hash(b"ab", b"c") != transcript_hash(b"a", b"bc")


@given(st.lists(st.binary(max_size=2048), max_size=20))
def test_frames_round_trip_in_order(frames: list[bytes]) -> None:
    keys, _ = _pair()
    sealer = Sealer(keys.consumer_to_provider, SESSION, 1)
    opener = Opener(keys.consumer_to_provider, SESSION, 1)
    assert [opener.open(sealer.seal(f)) for f in frames] == frames


def sealed_frame(count: int, stream_id: int = 1) -> tuple[list[bytes], SessionKeys]:
    keys, _ = _pair()
    sealer = Sealer(keys.provider_to_consumer, SESSION, stream_id)
    return [sealer.seal(f"token {i}".encode()) for i in range(count)], keys


def test_a_flipped_bit_fails() -> None:
    frames, keys = sealed_frame(1)
    tampered = bytearray(frames[0])
    tampered[0] ^= 0x01
    opener = Opener(keys.provider_to_consumer, SESSION, 1)
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        opener.open(bytes(tampered))


def test_a_replayed_frame_fails() -> None:
    frames, keys = sealed_frame(2)
    opener = Opener(keys.provider_to_consumer, SESSION, 1)
    assert opener.open(frames[0]) == b"token 0"
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        opener.open(frames[0])


def test_reordered_frames_fail() -> None:
    frames, keys = sealed_frame(2)
    opener = Opener(keys.provider_to_consumer, SESSION, 1)
    with pytest.raises(RemoteProtocolError):
        opener.open(frames[1])


def test_a_frame_from_another_stream_fails() -> None:
    frames, keys = sealed_frame(1, stream_id=2)
    with pytest.raises(RemoteProtocolError):
        Opener(keys.provider_to_consumer, SESSION, 1).open(frames[0])


def test_a_frame_from_another_session_fails() -> None:
    frames, keys = sealed_frame(1)
    with pytest.raises(RemoteProtocolError):
        Opener(keys.provider_to_consumer, b"t" * 32, 1).open(frames[0])


def test_the_wrong_direction_key_fails() -> None:
    frames, keys = sealed_frame(1)
    with pytest.raises(RemoteProtocolError):
        Opener(keys.consumer_to_provider, SESSION, 1).open(frames[0])


def test_after_a_failure_the_stream_is_done() -> None:
    frames, keys = sealed_frame(2)
    opener = Opener(keys.provider_to_consumer, SESSION, 1)
    with pytest.raises(RemoteProtocolError):
        opener.open(b"x" * 20)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        opener.open(frames[0])


def test_short_frames_and_bad_keys_are_refused() -> None:
    _, keys = _pair()
    with pytest.raises(RemoteProtocolError, match="shorter than its tag"):
        Opener(keys.provider_to_consumer, SESSION, 1).open(b"short")
    with pytest.raises(RemoteProtocolError, match="32 bytes"):
        Ephemeral().shared_secret(b"\x01" * 31)
    with pytest.raises(RemoteProtocolError, match="unusable"):
        Ephemeral().shared_secret(b"\x00" * 32)  # a low-order point


def test_streams_of_one_session_never_share_a_keystream() -> None:
    """One key serves every stream, so the stream id must be in the nonce."""
    keys, _ = _pair()
    same = b"\x00" * 64
    first = Sealer(keys.consumer_to_provider, SESSION, 1).seal(same)
    second = Sealer(keys.consumer_to_provider, SESSION, 2).seal(same)
    # Equal plaintexts under a reused (key, nonce) give equal ciphertext bodies.
    assert first[:64] != second[:64]


def test_stream_ids_must_fit_the_nonce() -> None:
    keys, _ = _pair()
    with pytest.raises(LocalProtocolError, match="32 bits"):
        Sealer(keys.consumer_to_provider, SESSION, 2**32)


def test_the_handshake_transcript_binds_both_peer_ids_by_role() -> None:
    base = {"consumer": b"C", "provider": b"P", "hello": b"hello", "approve": b"approve"}
    reference = handshake_transcript(**base)
    for field, other in (("consumer", b"M"), ("provider", b"M")):
        assert handshake_transcript(**(base | {field: other})) != reference
    swapped = base | {"consumer": b"P", "provider": b"C"}
    assert handshake_transcript(**swapped) != reference


def test_a_handshake_transcript_without_peer_ids_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError, match="both peer ids"):
        handshake_transcript(consumer=b"", provider=b"P", hello=b"h", approve=b"a")


@pytest.mark.parametrize("bad", ["flipped", "short"])
def test_a_stream_that_failed_once_stays_failed(bad: str) -> None:
    # After one bad frame the nonce sequence is unknown: even the genuine next
    # frame is refused, so nothing after a forgery is ever delivered.
    frames, keys = sealed_frame(2)
    opener = Opener(keys.provider_to_consumer, SESSION, 1)
    forged = frames[0][:3] if bad == "short" else bytes([frames[0][0] ^ 1]) + frames[0][1:]
    expected = (
        "sealed frame shorter than its tag"
        if bad == "short"
        else "frame failed authentication \\(tampered, replayed or reordered\\)"
    )
    with pytest.raises(RemoteProtocolError, match=f": {expected}$") as raised:
        opener.open(forged)
    assert raised.value.code is (ErrorCode.MALFORMED if bad == "short" else ErrorCode.UNAUTHENTIC)
    for frame in frames:
        with pytest.raises(RemoteProtocolError, match=": stream already failed authentication$"):
            opener.open(frame)


# --- the derivation and the frames as docs/protocols.md#key-derivation states them ----
# Computed here from the primitives (RFC 5869 HKDF over hmac, ChaCha20-Poly1305 with
# the nonce and associated data the docs give), not through the code under test.


def _hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, n = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([n]), hashlib.sha256).digest()
        out, n = out + block, n + 1
    return out[:length]


def test_the_transcript_is_sha256_over_4_byte_big_endian_lengths_and_parts() -> None:
    parts = (b"p2pnode/session/1", b"consumer-id", b"provider-id", b"hello", b"")
    expected = hashlib.sha256(b"".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()
    assert transcript_hash(*parts) == expected
    assert handshake_transcript(
        consumer=b"consumer-id", provider=b"provider-id", hello=b"hello", approve=b""
    ) == expected  # fmt: skip
    # Each body counts: another Hello or Approve is another transcript.
    for changed in ({"hello": b"hellO"}, {"approve": b"x"}):
        args = {"consumer": b"consumer-id", "provider": b"provider-id", "hello": b"hello"}
        assert handshake_transcript(**{"approve": b"", **args, **changed}) != expected


def test_the_keys_are_hkdf_sha256_of_the_secret_salted_by_the_transcript() -> None:
    secret, transcript = b"s" * 32, b"t" * 32
    material = _hkdf_sha256(secret, transcript, b"p2pnode/session/1 keys", 64)
    assert SessionKeys.derive(secret, transcript) == SessionKeys(material[:32], material[32:])


def test_a_sealed_frame_is_chacha20_poly1305_under_the_documented_nonce_and_data() -> None:
    key, session = b"k" * 32, b"S" * 32
    sealer = Sealer(key, session, 7)
    frames = [sealer.seal(b"first"), sealer.seal(b"second")]
    aead = ChaCha20Poly1305(key)
    aad = session + (7).to_bytes(8, "big")
    for counter, (frame, plain) in enumerate(zip(frames, (b"first", b"second"), strict=True)):
        nonce = (7).to_bytes(4, "big") + counter.to_bytes(8, "big")
        assert aead.decrypt(nonce, frame, aad) == plain


def test_a_stream_seals_up_to_its_frame_limit_and_no_further() -> None:
    sealer = Sealer(b"k" * 32, b"S" * 32, 1)
    sealer._counter = MAX_FRAMES - 1  # noqa: SLF001 - 2^64 frames cannot be sealed in a test
    sealer.seal(b"the last one")
    with pytest.raises(LocalProtocolError, match=": too many frames on one stream$") as raised:
        sealer.seal(b"one more")
    assert raised.value.code is ErrorCode.UNEXPECTED


@pytest.mark.parametrize(
    ("public", "detail"),
    [(b"x" * 31, "X25519 key must be 32 bytes"), (bytes(32), "unusable X25519 key")],
)
def test_an_unusable_peer_key_is_the_peers_error(public: bytes, detail: str) -> None:
    with pytest.raises(RemoteProtocolError) as raised:
        Ephemeral().shared_secret(public)
    assert (raised.value.code, raised.value.detail) == (ErrorCode.BAD_FIELD, detail)


def test_a_transcript_without_both_peer_ids_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError) as raised:
        handshake_transcript(consumer=b"", provider=b"p", hello=b"h", approve=b"a")
    assert (raised.value.code, raised.value.detail) == (
        ErrorCode.BAD_FIELD,
        "a transcript needs both peer ids",
    )


@pytest.mark.parametrize("stream_id", [-1, 2**32])
def test_a_stream_id_beyond_32_bits_is_our_bug(stream_id: int) -> None:
    with pytest.raises(LocalProtocolError) as raised:
        Sealer(b"k" * 32, b"S" * 32, stream_id)
    assert (raised.value.code, raised.value.detail) == (
        ErrorCode.BAD_FIELD,
        "stream id must fit in 32 bits",
    )
