"""The session handshake, consumer and provider machines piped into each other."""

from __future__ import annotations

import secrets

import pytest

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols.session.crypto import Ephemeral, Opener, Sealer
from p2pnode.protocols.session.machine import ConsumerMachine, ProviderMachine, State
from p2pnode.protocols.session.messages import (
    CODEC,
    Approve,
    Hello,
    Opened,
    Ready,
    Reject,
    RejectCode,
)
from p2pnode.protocols.wire import NEED_DATA, encode_frame
from p2pnode.protocols.wire import Error as WireError

MAX = 64 * 1024
NOW = 1_800_000_000.0
# Peer ids as the machines take them (libp2p ID bytes; any non-empty bytes do).
CONSUMER_ID = b"\x00\x24consumer"
PROVIDER_ID = b"\x00\x24provider"


def _consumer(eph: Ephemeral, provider: bytes = PROVIDER_ID) -> ConsumerMachine:
    return ConsumerMachine(MAX, eph, local_peer=CONSUMER_ID, remote_peer=provider)


def _provider(consumer: bytes = CONSUMER_ID) -> ProviderMachine:
    return ProviderMachine(MAX, local_peer=PROVIDER_ID, remote_peer=consumer)


def _hello(eph: Ephemeral) -> Hello:
    return Hello(model_id="m", ephemeral=eph.public, nonce=secrets.token_bytes(16), timestamp=NOW)


def _approve(eph: Ephemeral) -> Approve:
    return Approve(ephemeral=eph.public, nonce=secrets.token_bytes(16))


def _through_approve() -> tuple[ConsumerMachine, ProviderMachine]:
    c_eph, p_eph = Ephemeral(), Ephemeral()
    consumer, provider = _consumer(c_eph), _provider()
    provider.receive_data(consumer.send_hello(_hello(c_eph)))
    hello = provider.next_event()
    assert isinstance(hello, Hello)
    assert provider.state is State.DECIDING
    consumer.receive_data(provider.approve(p_eph, _approve(p_eph)))
    assert isinstance(consumer.next_event(), Approve)
    return consumer, provider


def test_free_mode_handshake_agrees_on_keys_and_session() -> None:
    consumer, provider = _through_approve()
    assert consumer.keys == provider.keys
    assert consumer.keys is not None
    provider.receive_data(consumer.send_opened())
    opened = provider.next_event()
    assert isinstance(opened, Opened)
    assert provider.free_mode_session_ok
    consumer.receive_data(provider.ready())
    ready = consumer.next_event()
    assert isinstance(ready, Ready)
    assert consumer.state is provider.state is State.READY
    assert consumer.session_id == provider.session_id == consumer.transcript
    # The keys work end to end, in the right direction.
    sealed = Sealer(consumer.keys.consumer_to_provider, consumer.session_id, 1).seal(b"prompt")
    assert Opener(provider.keys.consumer_to_provider, provider.session_id, 1).open(sealed) == (
        b"prompt"
    )


def test_chain_mode_session_id_is_checked_by_the_adapter() -> None:
    consumer, provider = _through_approve()
    provider.receive_data(consumer.send_opened(b"\x07" * 32))
    provider.next_event()
    assert not provider.free_mode_session_ok  # the adapter reads the chain instead
    consumer.receive_data(provider.ready())
    assert isinstance(consumer.next_event(), Ready)


def test_provider_rejects_hello() -> None:
    c_eph = Ephemeral()
    consumer, provider = _consumer(c_eph), _provider()
    provider.receive_data(consumer.send_hello(_hello(c_eph)))
    provider.next_event()
    consumer.receive_data(provider.reject(RejectCode.BUSY, "all slots busy"))
    event = consumer.next_event()
    assert event == Reject(code=RejectCode.BUSY, reason="all slots busy")
    assert consumer.state is provider.state is State.REJECTED
    assert consumer.keys is None


def test_provider_rejects_a_session_that_does_not_check_out() -> None:
    consumer, provider = _through_approve()
    provider.receive_data(consumer.send_opened(b"forged"))
    provider.next_event()
    assert not provider.free_mode_session_ok
    consumer.receive_data(provider.reject(RejectCode.BAD_SESSION))
    assert isinstance(consumer.next_event(), Reject)


def test_ready_for_another_session_is_refused() -> None:
    consumer, provider = _through_approve()
    consumer.send_opened()
    consumer.receive_data(CODEC.encode(Ready(session_id=b"other")))
    with pytest.raises(RemoteProtocolError, match=": Ready names another session$") as info:
        consumer.next_event()
    assert info.value.code is ErrorCode.BAD_FIELD


def test_wrong_key_sizes_are_bad_fields() -> None:
    provider = _provider()
    bad = Hello(model_id="m", ephemeral=b"\x01" * 31, nonce=b"n" * 16, timestamp=NOW)
    provider.receive_data(CODEC.encode(bad))
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.BAD_FIELD,
        "ephemeral key or nonce of the wrong size",
    )
    assert provider.state is State.ERROR
    with pytest.raises(LocalProtocolError, match=": no event expected in error$") as after:
        provider.next_event()
    assert after.value.code is ErrorCode.UNEXPECTED


def test_messages_out_of_place_are_unexpected() -> None:
    provider = _provider()
    provider.receive_data(CODEC.encode(Opened(session_id=b"x")))
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.UNEXPECTED,
        "session.opened in await_hello",
    )

    c_eph = Ephemeral()
    consumer = _consumer(c_eph)
    consumer.send_hello(_hello(c_eph))
    consumer.receive_data(CODEC.encode(Ready(session_id=b"x")))
    with pytest.raises(RemoteProtocolError) as info:
        consumer.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.UNEXPECTED,
        "session.ready in await_approve",
    )
    assert consumer.state is State.ERROR
    with pytest.raises(LocalProtocolError, match=": no event expected in error$") as after:
        consumer.next_event()
    assert after.value.code is ErrorCode.UNEXPECTED


def test_hello_arriving_byte_by_byte() -> None:
    c_eph = Ephemeral()
    consumer, provider = _consumer(c_eph), _provider()
    data = consumer.send_hello(_hello(c_eph))
    for i in range(len(data) - 1):
        provider.receive_data(data[i : i + 1])
        assert provider.next_event() is NEED_DATA
    provider.receive_data(data[-1:])
    assert isinstance(provider.next_event(), Hello)


def test_eof_during_the_handshake_is_truncation() -> None:
    provider = _provider()
    provider.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert (info.value.code, info.value.detail) == (
        ErrorCode.TRUNCATED,
        "closed during the handshake",
    )


def test_local_misuse() -> None:
    c_eph = Ephemeral()
    consumer = _consumer(c_eph)
    with pytest.raises(LocalProtocolError, match=": cannot send Opened in state idle$"):
        consumer.send_opened()  # before any Approve
    with pytest.raises(LocalProtocolError, match=": Hello must carry our ephemeral key$"):
        consumer.send_hello(_hello(Ephemeral()))
    consumer.send_hello(_hello(c_eph))
    with pytest.raises(
        LocalProtocolError, match=": cannot send Hello in state await_approve$"
    ) as info:
        consumer.send_hello(_hello(c_eph))
    assert info.value.code is ErrorCode.UNEXPECTED
    provider = _provider()
    with pytest.raises(LocalProtocolError):
        provider.ready()
    # Nothing to reject before a Hello, nor after the session is ready.
    with pytest.raises(LocalProtocolError, match=": cannot reject in await_hello$") as raised:
        provider.reject(RejectCode.BUSY)
    assert raised.value.code is ErrorCode.UNEXPECTED


def test_a_reject_reason_is_cut_to_200_characters() -> None:
    c_eph = Ephemeral()
    consumer, provider = _consumer(c_eph), _provider()
    provider.receive_data(consumer.send_hello(_hello(c_eph)))
    provider.next_event()
    consumer.receive_data(provider.reject(RejectCode.BUSY, "z" * 500))
    assert consumer.next_event() == Reject(code=RejectCode.BUSY, reason="z" * 200)


# --- both peer ids are in the transcript -------------------------------------

MALLORY_ID = b"\x00\x24mallory"
ON_CHAIN_ID = b"\x07" * 32


def _relayed_through_mallory() -> tuple[ConsumerMachine, ProviderMachine]:
    """C dialled M, M dialled P, and M copies each handshake byte across unchanged.

    Each end names the peer its stream authenticated: C's provider is M, P's
    consumer is M. M holds neither ephemeral private key.
    """
    c_eph, p_eph = Ephemeral(), Ephemeral()
    consumer, provider = _consumer(c_eph, provider=MALLORY_ID), _provider(consumer=MALLORY_ID)
    provider.receive_data(consumer.send_hello(_hello(c_eph)))
    assert isinstance(provider.next_event(), Hello)
    consumer.receive_data(provider.approve(p_eph, _approve(p_eph)))
    assert isinstance(consumer.next_event(), Approve)
    return consumer, provider


def test_a_relayed_handshake_gives_the_two_ends_different_keys() -> None:
    """Chain mode (the adapter confirms the on-chain id): Ready comes, but the keys differ.

    So the provider's first sealed frame fails authentication at the
    consumer, and the consumer's Request fails at the provider: M cannot
    pass P's service off as its own.
    """
    consumer, provider = _relayed_through_mallory()
    assert consumer.keys is not None
    assert provider.keys is not None
    assert consumer.transcript != provider.transcript
    assert consumer.keys != provider.keys
    provider.receive_data(consumer.send_opened(ON_CHAIN_ID))
    assert isinstance(provider.next_event(), Opened)
    consumer.receive_data(provider.ready())
    assert isinstance(consumer.next_event(), Ready)

    first = Sealer(provider.keys.provider_to_consumer, provider.session_id, 1).seal(b"token")
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        Opener(consumer.keys.provider_to_consumer, consumer.session_id, 1).open(first)
    request = Sealer(consumer.keys.consumer_to_provider, consumer.session_id, 1).seal(b"prompt")
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        Opener(provider.keys.consumer_to_provider, provider.session_id, 1).open(request)


def test_a_relayed_free_mode_handshake_is_refused_at_opened() -> None:
    """Free mode: the id C names is C's transcript hash, which is not P's."""
    consumer, provider = _relayed_through_mallory()
    provider.receive_data(consumer.send_opened())
    assert isinstance(provider.next_event(), Opened)
    assert not provider.free_mode_session_ok


def test_a_machine_without_peer_ids_is_our_bug() -> None:
    with pytest.raises(LocalProtocolError, match=": a handshake needs both peer ids$"):
        ConsumerMachine(MAX, Ephemeral(), local_peer=b"", remote_peer=PROVIDER_ID)
    with pytest.raises(LocalProtocolError, match="peer ids"):
        ProviderMachine(MAX, local_peer=PROVIDER_ID, remote_peer=b"")


def test_nothing_is_known_before_the_handshake_says_it() -> None:
    consumer, provider = _consumer(Ephemeral()), _provider()
    for side in (consumer, provider):
        assert (side.session_id, side.transcript, side.keys) == (b"", b"", None)
    assert provider.hello is None


def test_provider_misuse_names_the_call() -> None:
    c_eph, p_eph = Ephemeral(), Ephemeral()
    consumer, provider = _consumer(c_eph), _provider()
    with pytest.raises(LocalProtocolError, match=": cannot approve in state await_hello$"):
        provider.approve(p_eph, _approve(p_eph))
    with pytest.raises(LocalProtocolError, match=": cannot say Ready in state await_hello$"):
        provider.ready()
    provider.receive_data(consumer.send_hello(_hello(c_eph)))
    provider.next_event()
    with pytest.raises(LocalProtocolError, match=": Approve must carry our ephemeral key$") as info:
        provider.approve(p_eph, _approve(Ephemeral()))
    assert info.value.code is ErrorCode.BAD_FIELD


def test_an_error_from_the_consumer_ends_the_handshake() -> None:
    provider = _provider()
    provider.receive_data(encode_frame(CODEC.encode_body(WireError(code=7, message="bye"))))
    assert provider.next_event() == WireError(code=7, message="bye")
    assert provider.state is State.REJECTED
