"""Every error p2pnode raises on purpose.

::

    P2PNodeError
    ├── ProtocolError            a frame or message broke a wire protocol (has .code)
    │   ├── LocalProtocolError   we tried to send something the protocol forbids: our bug
    │   └── RemoteProtocolError  the peer sent something malformed, oversized or out of
    │                            order: reset that stream with .code, count it, carry on
    ├── ConfigError              bad flag, file, key or address; the CLI prints one line
    ├── NetworkError             a peer could not be reached or did not answer in time
    │   ├── BrokenStreamError    the peer or the network broke a stream (reset, EOF)
    │   ├── UnreachableError     no stream to the peer came up in time
    │   └── NoProviderError      no provider could serve a request (none, or all failed)
    ├── PaymentError             this node cannot pay for a request: no provider could be
    │   │                        paid, whoever it asked
    │   ├── SpendLimitError      serving it would escrow more than the spend limit allows
    │   └── FundsError           the wallet lacks the tokens (or the ether) to pay for it
    ├── ChainError               the chain refused or failed a call
    └── EngineError              an inference engine failed

Expected outcomes travel as values where a caller acts on them (a provider's
refusal, busy or rejected, is a ``protocols/refusal.py`` Refusal); these
exceptions are for what a caller does not plan for.
Library exceptions are re-raised as one of these ``from`` the original at the
boundary that meets them.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Stable error codes carried in ``Error`` frames. Never renumber."""

    MALFORMED = 1  # not a frame, not msgpack, not a map
    OVERSIZE = 2  # declared length above the cap for this protocol
    UNKNOWN_TYPE = 3  # type tag not part of this protocol
    BAD_FIELD = 4  # field missing or of the wrong type
    UNEXPECTED = 5  # a valid message at the wrong moment
    TRUNCATED = 6  # the stream ended inside a frame
    TIMEOUT = 7  # the peer did not answer in time
    INTERNAL = 8  # the answering side failed; nothing the peer did
    UNSUPPORTED = 9  # a request this node does not serve
    BUSY = 10  # no free slot and the queue is full: try another provider
    RATE_LIMITED = 11  # this peer sent too many requests: slow down
    UNKNOWN_SESSION = 12  # no such session here (expired, or never opened)
    NOT_ALLOWED = 13  # the provider does not serve this peer or wallet
    # A stream id its session already used (or too old to tell): a replayed
    # request, or a consumer reusing a nonce. Open a new stream id.
    REPLAYED = 14
    # A paid session whose last answer the consumer did not acknowledge (no Ack,
    # a bad one, or a request it cancelled): the session serves nothing more.
    # Open a new session.
    UNACKNOWLEDGED = 15
    # A sealed frame failed authentication: tampered with, replayed, reordered
    # or spliced from another stream or session (or sealed with other keys).
    UNAUTHENTIC = 16


class P2PNodeError(Exception):
    """Root of p2pnode's own exceptions."""


class ProtocolError(P2PNodeError):
    """A wire-protocol violation, with the code to report to the peer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name.lower()}: {message}")
        self.code = code
        self.detail = message


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol. Reset that stream; the node carries on."""


class ConfigError(P2PNodeError):
    """Configuration that cannot work: a bad flag, file, key or address."""


class NetworkError(P2PNodeError):
    """A peer was unreachable, refused, or did not answer within its bound."""


class BrokenStreamError(NetworkError):
    """A stream was reset or cut by the peer or the network (trio's "Broken…")."""


class UnreachableError(NetworkError):
    """No stream to the peer came up in time (not refused: it took too long):
    nothing of ours was exchanged with it, and our own congestion is as likely
    a cause as the peer."""


class NoProviderError(NetworkError):
    """No provider could serve a request: none is known, or every one tried failed."""

    def __init__(self, message: str, *, rate_limited: bool = False) -> None:
        super().__init__(message)
        # Every provider tried said "slow down": the caller should too.
        self.rate_limited = rate_limited


class PaymentError(P2PNodeError):
    """This node cannot pay for the request, whichever provider it asked: not a
    network failure, and nothing another provider could change."""


class SpendLimitError(PaymentError):
    """A new paid session would take the consumer's open stakes over its spend limit."""


class FundsError(PaymentError):
    """The consumer's wallet lacks the tokens for a session's stake, or ether for gas."""


class ChainError(P2PNodeError):
    """The chain rejected or failed a call."""


class EngineError(P2PNodeError):
    """An inference engine could not serve a request."""


class BadRequestError(EngineError):
    """The request itself cannot be served by this model (a logit_bias id outside
    its vocabulary): the asker's mistake, not the engine's failure."""
