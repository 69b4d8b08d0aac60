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
from p2pnode.protocols.wire import NEED_DATA

MAX = 64 * 1024
NOW = 1_800_000_000.0


def _hello(eph: Ephemeral) -> Hello:
    return Hello(model_id="m", ephemeral=eph.public, nonce=secrets.token_bytes(16), timestamp=NOW)


def _approve(eph: Ephemeral) -> Approve:
    return Approve(ephemeral=eph.public, nonce=secrets.token_bytes(16))


def _through_approve() -> tuple[ConsumerMachine, ProviderMachine]:
    c_eph, p_eph = Ephemeral(), Ephemeral()
    consumer, provider = ConsumerMachine(MAX, c_eph), ProviderMachine(MAX)
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
    consumer, provider = ConsumerMachine(MAX, c_eph), ProviderMachine(MAX)
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
    with pytest.raises(RemoteProtocolError, match="another session"):
        consumer.next_event()


def test_wrong_key_sizes_are_bad_fields() -> None:
    provider = ProviderMachine(MAX)
    bad = Hello(model_id="m", ephemeral=b"\x01" * 31, nonce=b"n" * 16, timestamp=NOW)
    provider.receive_data(CODEC.encode(bad))
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert info.value.code is ErrorCode.BAD_FIELD
    assert provider.state is State.ERROR


def test_messages_out_of_place_are_unexpected() -> None:
    provider = ProviderMachine(MAX)
    provider.receive_data(CODEC.encode(Opened(session_id=b"x")))
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert info.value.code is ErrorCode.UNEXPECTED

    c_eph = Ephemeral()
    consumer = ConsumerMachine(MAX, c_eph)
    consumer.send_hello(_hello(c_eph))
    consumer.receive_data(CODEC.encode(Ready(session_id=b"x")))
    with pytest.raises(RemoteProtocolError):
        consumer.next_event()


def test_hello_arriving_byte_by_byte() -> None:
    c_eph = Ephemeral()
    consumer, provider = ConsumerMachine(MAX, c_eph), ProviderMachine(MAX)
    data = consumer.send_hello(_hello(c_eph))
    for i in range(len(data) - 1):
        provider.receive_data(data[i : i + 1])
        assert provider.next_event() is NEED_DATA
    provider.receive_data(data[-1:])
    assert isinstance(provider.next_event(), Hello)


def test_eof_during_the_handshake_is_truncation() -> None:
    provider = ProviderMachine(MAX)
    provider.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        provider.next_event()
    assert info.value.code is ErrorCode.TRUNCATED


def test_local_misuse() -> None:
    c_eph = Ephemeral()
    consumer = ConsumerMachine(MAX, c_eph)
    with pytest.raises(LocalProtocolError):
        consumer.send_opened()  # before any Approve
    with pytest.raises(LocalProtocolError, match="our ephemeral key"):
        consumer.send_hello(_hello(Ephemeral()))
    provider = ProviderMachine(MAX)
    with pytest.raises(LocalProtocolError):
        provider.ready()
