"""``/p2pnode/session/1.0.0``: a consumer and a provider agree on a session and its keys.

Hello → Approve (or Reject{code}) → Opened{session_id} → Ready, then requests
flow on ``/p2pnode/infer/1.0.0`` sealed with the session's keys
(docs/protocols.md#session-handshake). ``messages`` and ``machine`` are the
pure protocol, ``crypto`` the key schedule and sealed frames, ``admission``
who may open a session (a pure decision the provider's adapter calls),
``service`` the trio adapter.
"""

from __future__ import annotations

from typing import Final

from p2pnode.protocols.session.machine import ConsumerMachine, ProviderMachine, State
from p2pnode.protocols.session.messages import (
    CODEC,
    Approve,
    Hello,
    Opened,
    Ready,
    Reject,
    RejectCode,
    approval_nonce,
)

PROTOCOL_ID: Final = "/p2pnode/session/1.0.0"

__all__ = [
    "CODEC",
    "PROTOCOL_ID",
    "Approve",
    "ConsumerMachine",
    "Hello",
    "Opened",
    "ProviderMachine",
    "Ready",
    "Reject",
    "RejectCode",
    "State",
    "approval_nonce",
]
