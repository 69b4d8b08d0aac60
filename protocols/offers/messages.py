"""The signed Offer a provider gossips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from p2pnode.protocols.wire import Codec, Message, added, signing_payload

SIGNING_DOMAIN: Final = b"p2pnode/offer/1:"
MAX_FEATURES: Final = 16
MAX_FEATURE_LEN: Final = 32
MAX_TEMPERATURE: Final = 2.0
"""The highest sampling temperature (OpenAI's range): an offer recommending more is invalid."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelOffer(Message):
    """One model in an offer."""

    model_id: str
    gguf_sha256: str | None = None
    context_length: int = 0
    # Price in the chain token's smallest unit per second; 0 in free mode.
    price_per_s: int = 0
    bid_id: str | None = None
    tokens_per_s: float = 0.0
    # Sampling the provider recommends for the model when a request does not
    # say (inference/engine.py:ModelInfo); consumers' shims apply it.
    temperature: float | None = added(None)
    top_p: float | None = added(None)
    # What the provider does for the model beyond plain sampling
    # (inference/engine.py:FEATURES); a request needing one goes only to
    # providers that list it. Names this version does not know are ignored.
    features: tuple[str, ...] = added(())


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer(Message):
    """A provider's signed advertisement."""

    TYPE: ClassVar[str] = "offer"
    peer_id: str
    addrs: tuple[str, ...]
    models: tuple[ModelOffer, ...]
    slots_free: int
    queue_len: int
    seq: int
    timestamp: float
    wallet: str | None = None
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        """The exact bytes the signature covers (everything but the signature)."""
        return signing_payload(self, SIGNING_DOMAIN)

    def serves(self, model_id: str) -> ModelOffer | None:
        """This offer's terms for ``model_id``, if it serves it."""
        return next((m for m in self.models if m.model_id == model_id), None)


GOSSIP_CODEC = Codec([Offer])
"""What travels on the offers topic: one bare Offer body per message."""
