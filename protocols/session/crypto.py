"""Session keys and sealed frames (docs/protocols.md#key-derivation).

Theory of operation. Each side of a session handshake makes an X25519
ephemeral key pair. The shared secret goes through HKDF-SHA256, salted with
the hash of the handshake transcript, into one ChaCha20-Poly1305 key per
direction (consumer→provider and provider→consumer), so neither side ever
encrypts with the other's key.

Besides the Hello and Approve bodies, the transcript names both libp2p peer
ids, consumer's then provider's, as each end knows them: its own, and the
other's as the stream's secure channel (Noise) authenticated it. The
ephemeral keys are signed by no one, so without the ids a peer M could relay
a consumer C's handshake to a provider P byte for byte: C would believe M
serves it and P that M is its consumer, while C and P share the keys (and
M could pass another provider's bid off as its own). With them, C hashes
(C, M) and P hashes (M, P): a relayed handshake yields two unrelated key
sets, and the first sealed frame across fails authentication.

A :class:`Sealer` encrypts the frames one side sends on one stream; an
:class:`Opener` decrypts what it receives. The 96-bit nonce is the stream id
(32 bits) and a frame counter (64 bits) that both ends advance in step: a key
serves every stream of its session and direction, so the stream id must be in
the nonce, or two streams would reuse ChaCha20's keystream (associated data
does not change it). Stream ids are unique within a session: the consumer
counts them up, and the provider refuses one its session has seen
(``infer.replay.ReplayWindow``); a reused id would also replay a whole
request. The associated data binds every frame to its session and stream as
well. So a flipped bit, a replayed or reordered frame, or a frame spliced in
from another stream or session fails authentication; the opener then
refuses everything after it (a stream that lied once is done).

Pure: no I/O, no clock; ``cryptography`` does the arithmetic.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

KEY_INFO: Final = b"p2pnode/session/1 keys"
TAG_BYTES: Final = 16
MAX_STREAM_ID: Final = 2**32 - 1
MAX_FRAMES: Final = 2**64


TRANSCRIPT_DOMAIN: Final = b"p2pnode/session/1"


def transcript_hash(*parts: bytes) -> bytes:
    """SHA-256 over length-prefixed parts: no two transcripts hash alike."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


def handshake_transcript(
    *, consumer: bytes, provider: bytes, hello: bytes, approve: bytes
) -> bytes:
    """The hash a session's keys (and its free-mode id) derive from.

    ``consumer`` and ``provider`` are the two libp2p peer ids (their bytes),
    ``hello`` and ``approve`` the exact message bodies that crossed the wire.
    Both ids are required: a transcript without them is open to relaying
    (see the module docstring).
    """
    if not consumer or not provider:
        raise LocalProtocolError(ErrorCode.BAD_FIELD, "a transcript needs both peer ids")
    return transcript_hash(TRANSCRIPT_DOMAIN, consumer, provider, hello, approve)


class Ephemeral:
    """One side's X25519 key pair for one handshake."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public: bytes = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def shared_secret(self, peer_public: bytes) -> bytes:
        """The X25519 secret with the peer's public key (32 raw bytes)."""
        if len(peer_public) != 32:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "X25519 key must be 32 bytes")
        try:
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # a low-order point gives an all-zero secret
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "unusable X25519 key") from exc
        return secret


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The two directional keys of a session."""

    consumer_to_provider: bytes
    provider_to_consumer: bytes

    @classmethod
    def derive(cls, shared_secret: bytes, transcript: bytes) -> SessionKeys:
        """HKDF-SHA256(secret, salt=transcript hash) split into the two keys."""
        material = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=transcript, info=KEY_INFO
        ).derive(shared_secret)
        return cls(material[:32], material[32:])


class _StreamCipher:
    """One direction of one stream: its key, associated data and frame counter."""

    def __init__(self, key: bytes, session_id: bytes, stream_id: int) -> None:
        if not 0 <= stream_id <= MAX_STREAM_ID:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "stream id must fit in 32 bits")
        self._aead = ChaCha20Poly1305(key)
        self._aad = session_id + stream_id.to_bytes(8, "big")
        self._stream_id = stream_id
        self._counter = 0

    def _nonce(self) -> bytes:
        # nonce = stream id (4 bytes) || frame counter (8 bytes)
        return self._stream_id.to_bytes(4, "big") + self._counter.to_bytes(8, "big")


class Sealer(_StreamCipher):
    """Encrypts the frames one side sends on one stream, in order."""

    def seal(self, plaintext: bytes) -> bytes:
        """Ciphertext and tag of the next frame."""
        if self._counter >= MAX_FRAMES:
            raise LocalProtocolError(ErrorCode.UNEXPECTED, "too many frames on one stream")
        sealed = self._aead.encrypt(self._nonce(), plaintext, self._aad)
        self._counter += 1
        return sealed


class Opener(_StreamCipher):
    """Decrypts and authenticates the frames one side receives on one stream, in order."""

    def __init__(self, key: bytes, session_id: bytes, stream_id: int) -> None:
        super().__init__(key, session_id, stream_id)
        self._failed = False

    def open(self, sealed: bytes) -> bytes:
        """The plaintext of the next frame; anything tampered raises RemoteProtocolError."""
        if self._failed:
            raise RemoteProtocolError(ErrorCode.UNAUTHENTIC, "stream already failed authentication")
        if len(sealed) < TAG_BYTES:
            self._failed = True
            raise RemoteProtocolError(ErrorCode.MALFORMED, "sealed frame shorter than its tag")
        try:
            plaintext = self._aead.decrypt(self._nonce(), sealed, self._aad)
        except InvalidTag as exc:
            self._failed = True
            raise RemoteProtocolError(
                ErrorCode.UNAUTHENTIC,
                "frame failed authentication (tampered, replayed or reordered)",
            ) from exc
        self._counter += 1
        return plaintext
