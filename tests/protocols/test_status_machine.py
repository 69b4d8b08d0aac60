"""Client and server machines piped into each other, as h11's ConnectionPair."""

from __future__ import annotations

import pytest

from p2pnode.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from p2pnode.protocols import offers, status
from p2pnode.protocols.wire import NEED_DATA, PEER_CLOSED, Error, encode_frame, encode_varint

MAX = status.Config().max_frame
ANSWER = status.StatusResponse(
    peer_id="12D3KooWtest",
    version="0.1.0",
    addrs=("/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWtest",),
    connected_peers=3,
    uptime_s=12.5,
    models=(offers.ModelOffer(model_id="smollm2", context_length=2048),),
    load=status.Load(slots_total=2, slots_free=1, queue_len=0),
)


def test_one_exchange() -> None:
    client, server = status.ClientMachine(MAX), status.ServerMachine(MAX)
    assert server.next_event() is NEED_DATA
    server.receive_data(client.send_request(status.StatusRequest()))
    assert client.state is status.State.AWAITING
    assert server.next_event() == status.StatusRequest()
    assert server.state is status.State.ANSWERING
    assert client.next_event() is NEED_DATA
    client.receive_data(server.send_response(ANSWER))
    assert client.next_event() == ANSWER
    assert client.state is server.state is status.State.DONE


def test_answer_split_at_every_byte() -> None:
    client, server = status.ClientMachine(MAX), status.ServerMachine(MAX)
    server.receive_data(client.send_request(status.StatusRequest()))
    server.next_event()
    data = server.send_response(ANSWER)
    for i in range(len(data) - 1):
        client.receive_data(data[i : i + 1])
        assert client.next_event() is NEED_DATA
    client.receive_data(data[-1:])
    assert client.next_event() == ANSWER


def test_server_error_reaches_the_client_as_an_event() -> None:
    client, server = status.ClientMachine(MAX), status.ServerMachine(MAX)
    client.send_request(status.StatusRequest())
    client.receive_data(server.send_error(Error(code=ErrorCode.INTERNAL)))
    assert client.next_event() == Error(code=ErrorCode.INTERNAL)


def test_client_closing_without_asking_is_a_clean_end() -> None:
    server = status.ServerMachine(MAX)
    server.receive_data(b"")
    assert server.next_event() is PEER_CLOSED
    assert server.state is status.State.DONE


def test_server_closing_without_answer_is_truncation() -> None:
    client = status.ClientMachine(MAX)
    client.send_request(status.StatusRequest())
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code is ErrorCode.TRUNCATED
    assert client.state is status.State.ERROR


def test_garbage_puts_the_server_in_error_and_it_can_still_say_why() -> None:
    server = status.ServerMachine(MAX)
    server.receive_data(encode_frame(b"\xc1garbage"))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.MALFORMED
    assert server.state is status.State.ERROR
    frame = server.send_error(Error.from_exception(info.value))
    client = status.ClientMachine(MAX)
    client.send_request(status.StatusRequest())
    client.receive_data(frame)
    assert client.next_event() == Error(code=ErrorCode.MALFORMED, message=info.value.detail)


def test_oversized_request_is_refused() -> None:
    server = status.ServerMachine(MAX)
    server.receive_data(encode_varint(MAX + 1))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.OVERSIZE


def test_a_response_sent_to_a_server_is_unexpected() -> None:
    server = status.ServerMachine(MAX)
    server.receive_data(status.CODEC.encode(ANSWER))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.code is ErrorCode.UNEXPECTED


def test_a_request_sent_to_a_client_is_unexpected() -> None:
    client = status.ClientMachine(MAX)
    client.send_request(status.StatusRequest())
    client.receive_data(status.CODEC.encode(status.StatusRequest()))
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code is ErrorCode.UNEXPECTED


def test_local_misuse_is_a_local_error() -> None:
    client, server = status.ClientMachine(MAX), status.ServerMachine(MAX)
    client.send_request(status.StatusRequest())
    with pytest.raises(LocalProtocolError):
        client.send_request(status.StatusRequest())
    with pytest.raises(LocalProtocolError):
        server.send_response(ANSWER)  # nothing asked yet


def test_failed_send_moves_to_error() -> None:
    client = status.ClientMachine(MAX)
    client.send_request(status.StatusRequest())
    client.send_failed()
    assert client.state is status.State.ERROR
