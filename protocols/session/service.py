"""Trio adapter of the session handshake over a libp2p stream.

The handshake on the wire: docs/protocols.md#session-handshake.

The machines decide what is valid; this module moves their bytes and asks
its caller the two questions only the node can answer: whether to take the
session (``decide``, on Hello) and, in chain mode, which session id to name
(``on_approve``, consumer) or whether the named session checks out
(``confirm``, provider). Every call is bounded by ``wait_s``.

Both sides name the two peer ids of the stream: their own (the host's) and
the remote one the secure channel authenticated (``stream.muxed_conn.peer_id``).
They go into the transcript, so a session relayed through a third peer
never yields keys both real ends share (``crypto``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from p2pnode.errors import ErrorCode, NetworkError, RemoteProtocolError
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session.crypto import Ephemeral, SessionKeys
from p2pnode.protocols.session.machine import NONCE_BYTES, ConsumerMachine, ProviderMachine
from p2pnode.protocols.session.messages import Approve, Hello, Opened, Reject, RejectCode
from p2pnode.protocols.stream import (
    ByteStream,
    close_quietly,
    close_with_error,
    next_event,
    send,
)
from p2pnode.protocols.unary_service import code_name
from p2pnode.protocols.wire import DEFAULT_MAX_FRAME, Error, Sentinel


@dataclass(frozen=True, slots=True)
class Established:
    """A session both sides hold: its id and keys."""

    session_id: bytes
    keys: SessionKeys
    hello: Hello
    approve: Approve


async def open_session(
    stream: ByteStream,
    model_id: str,
    wait_s: float,
    *,
    local_peer: ID,
    remote_peer: ID,
    prepare: Callable[[Hello], Hello] | None = None,
    on_approve: Callable[[Hello, Approve], Awaitable[bytes]] | None = None,
) -> Established | Refusal:
    """Run the consumer's side on a fresh stream; closes the stream after.

    ``local_peer`` is this node's id, ``remote_peer`` the provider's as the
    stream's connection authenticated it (``stream.muxed_conn.peer_id``).
    Chain mode: ``prepare`` fills the Hello's chain fields and signs it, and
    ``on_approve`` opens the session on chain and returns its id; without
    them the id is the transcript hash. Returns the session, or the
    provider's :class:`Refusal` (a Reject, before or after the on-chain
    open); raises :class:`NetworkError` (timeout, broken stream, an Error
    frame) or RemoteProtocolError.
    """
    ephemeral = Ephemeral()
    machine = ConsumerMachine(
        DEFAULT_MAX_FRAME,
        ephemeral,
        local_peer=local_peer.to_bytes(),
        remote_peer=remote_peer.to_bytes(),
    )
    hello = Hello(
        model_id=model_id,
        ephemeral=ephemeral.public,
        nonce=secrets.token_bytes(NONCE_BYTES),
        timestamp=time.time(),
    )
    if prepare is not None:
        hello = prepare(hello)
    try:
        with trio.fail_after(wait_s):
            await send(stream, machine, machine.send_hello(hello))
            approve = await next_event(stream, machine)
            if isinstance(approve, Reject):
                return Refusal.of_session(approve.code, approve.reason)
            _raise_if_failed(approve)
            assert isinstance(approve, Approve)
        # The on-chain open is bounded by the chain client, not by the
        # handshake: on a slow chain a session already opened (and paid)
        # must still get its Ready, not a timeout blamed on the provider.
        session_id = await on_approve(hello, approve) if on_approve is not None else None
        with trio.fail_after(wait_s):
            await send(stream, machine, machine.send_opened(session_id))
            ready = await next_event(stream, machine)
            if isinstance(ready, Reject):
                return Refusal.of_session(ready.code, ready.reason)
            _raise_if_failed(ready)
    except trio.TooSlowError as exc:
        raise NetworkError(f"no session within {wait_s:g} s") from exc
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + wait_s):
            await close_quietly(stream)
    assert machine.keys is not None
    return Established(machine.session_id, machine.keys, hello, approve)


def _raise_if_failed(event: object) -> None:
    if isinstance(event, Error):
        raise NetworkError(f"provider refused the session: {code_name(event.code)} {event.message}")
    if isinstance(event, Sentinel):  # the machine raises on EOF; kept for the type checker
        raise NetworkError("provider closed the session stream")


Decide = Callable[[Hello], RejectCode | None]
"""The node's admission on Hello: None to approve, or why not."""

Approval = Callable[[Hello, bytes], Awaitable[tuple[bytes, int]]]
"""Chain mode: the approval (and its expiry) for a Hello, given the Approve's nonce."""

Confirm = Callable[[Hello, bytes], Awaitable[RejectCode | None]]
"""Chain mode: check the session named in Opened (free mode checks the transcript)."""


async def serve_session(
    stream: ByteStream,
    decide: Decide,
    wait_s: float,
    *,
    local_peer: ID,
    remote_peer: ID,
    approval: Approval | None = None,
    confirm: Confirm | None = None,
    opened_wait_s: float | None = None,
) -> Established | None:
    """Run the provider's side on an inbound stream; returns the session, or None if refused.

    ``wait_s`` bounds each step; ``opened_wait_s`` (default ``wait_s``) the
    wait for Opened, which in chain mode includes the consumer's on-chain
    open. A consumer too slow is a NetworkError (routine, not counted).

    ``local_peer`` is this node's id, ``remote_peer`` the consumer's as the
    stream's connection authenticated it (``stream.muxed_conn.peer_id``).
    A malformed frame gets an Error frame and the RemoteProtocolError is
    re-raised for the node to count.
    """
    machine = ProviderMachine(
        DEFAULT_MAX_FRAME, local_peer=local_peer.to_bytes(), remote_peer=remote_peer.to_bytes()
    )
    try:
        with trio.fail_after(wait_s):
            hello = await next_event(stream, machine)
            if not isinstance(hello, Hello):
                return None  # the consumer gave up (Error or close)
            refusal = decide(hello)
            if refusal is not None:
                await send(stream, machine, machine.reject(refusal))
                return None
            ephemeral = Ephemeral()
            nonce = secrets.token_bytes(NONCE_BYTES)
            signed, expiry = await approval(hello, nonce) if approval is not None else (b"", 0)
            approve = Approve(
                ephemeral=ephemeral.public, nonce=nonce, approval=signed, expiry=expiry
            )
            await send(stream, machine, machine.approve(ephemeral, approve))
        with trio.fail_after(wait_s if opened_wait_s is None else opened_wait_s):
            opened = await next_event(stream, machine)
        if not isinstance(opened, Opened):
            return None
        with trio.fail_after(wait_s):
            if confirm is not None:
                refusal = await confirm(hello, opened.session_id)
            elif not machine.free_mode_session_ok:
                refusal = RejectCode.BAD_SESSION
            if refusal is not None:
                await send(stream, machine, machine.reject(refusal))
                return None
            await send(stream, machine, machine.ready())
    except RemoteProtocolError as exc:
        await close_with_error(stream, machine.send_error(Error.from_exception(exc)))
        raise
    except trio.TooSlowError as exc:
        await close_with_error(
            stream, machine.send_error(Error(code=ErrorCode.TIMEOUT, message="handshake too slow"))
        )
        raise NetworkError("handshake too slow") from exc
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + wait_s):
            await close_quietly(stream)
    assert machine.keys is not None
    return Established(machine.session_id, machine.keys, hello, approve)
