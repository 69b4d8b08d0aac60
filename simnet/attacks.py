"""Hostile peers for the hostile scenario: what a stranger can do with a real node.

Each attack drives an attacker's own node (or throwaway identities) through
public interfaces and raw libp2p streams; nothing here reaches into an
honest node. Each returns what the attacker saw; what the honest nodes made
of it the scenario reads from their own counters. Attack code expects to be
refused, reset and banned: every libp2p failure on the attacker's side is an
outcome to count, never an error, and every wait is bounded.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb import kademlia_pb2 as kad_pb
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from p2pnode.errors import NetworkError
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.node import Node
from p2pnode.protocols import offers
from p2pnode.protocols.stream import close_quietly, reset_quietly
from p2pnode.protocols.wire import encode_frame, encode_varint

# Bounds of the attacker's own waits: a target that neither answers nor
# resets costs the attack this long, not the scenario's whole budget. A
# connection (handshakes on a loop that runs every node) gets longer.
CONNECT_S = 15.0
STREAM_S = 5.0
ANSWER_S = 1.0

JUNK_FRAMES: tuple[bytes, ...] = (
    b"\xff" * 12,  # a length prefix that never ends
    encode_varint(1 << 40),  # a length far past every cap, then nothing
    b"\x80\x00",  # a length not minimally encoded
    encode_frame(b"\xc1" * 16),  # neither msgpack nor protobuf
    encode_frame(msgpack.packb({"t": "no.such.message", "x": 1})),
    encode_frame(msgpack.packb([1, 2, 3])),  # not a map
    encode_frame(b"\x01" + bytes(range(64))),  # looks sealed, is not
    b"\x10cut short",  # a frame that EOF truncates
)
"""Malformed frames, each sent once on its own stream, then EOF."""


def made_up_id() -> ID:
    """A peer id nobody holds the key of."""
    return ID.from_pubkey(create_new_key_pair().public_key)


async def connect(node: Node, target: Node) -> bool:
    """Connect to ``target`` at its first address (a circuit one through its relay)."""
    addr = target.addrs[0]
    try:
        with trio.fail_after(CONNECT_S):
            if relaylib.is_circuit(addr):
                await node.relay.dial(addr)
            else:
                await node.dialer.connect(addr)
    except (NetworkError, trio.TooSlowError):
        return False
    return True


async def open_stream(node: Node, peer: str, protocol: str) -> INetStream | None:
    """A stream to ``peer``, or None if it cannot be had (refused, reset, unsupported)."""
    try:
        return await stream_to(node, peer, protocol)
    except NetworkError:  # the attacker counts any refusal the same way
        return None


async def stream_to(node: Node, peer: str, protocol: str, wait_s: float = STREAM_S) -> INetStream:
    """A stream to ``peer``; NetworkError says why there is none."""
    try:
        with trio.fail_after(wait_s):
            return await node.host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
    except Exception as exc:  # noqa: BLE001 - py-libp2p raises many kinds for one refusal
        raise NetworkError(f"no {protocol} stream: {exc!r}"[:300]) from exc


# --- crash attempts: malformed frames ---------------------------------------------


@dataclass
class Junk:
    """Malformed frames an attacker sent, and the streams it could not even open."""

    frames: int = 0
    unopened: int = 0
    unreachable: int = 0  # targets the attacker could not connect to
    protocols: set[str] = field(default_factory=set)


async def junk_on_every_protocol(
    attacker: Node, target: Node, out: Junk, gone: trio.Event | None = None
) -> None:
    """Send each of :data:`JUNK_FRAMES` on every protocol ``target`` serves.

    The protocols are the ones the target's host answers (ours, Kademlia,
    gossipsub, identify, ping, the relay's): one stream per frame, closed
    for writing after it, read for ``ANSWER_S`` (the target's error frame or
    its reset), then reset. Stops early once ``gone`` is set (the target died).
    """
    served = sorted(str(p) for p in target.host.get_mux().get_protocols() if p)
    if not await connect(attacker, target):
        out.unreachable += 1
        return

    async def one(protocol: str, frame: bytes) -> None:
        stream = await open_stream(attacker, target.peer_id, protocol)
        if stream is None:
            out.unopened += 1
            return
        try:
            with trio.move_on_after(ANSWER_S):
                await stream.write(frame)
                out.frames += 1
                out.protocols.add(protocol)
                await stream.close()
                while await stream.read(64 * 1024):
                    pass
        except Exception:  # noqa: BLE001, S110 - a reset is the answer we expect
            pass
        finally:
            await reset_quietly(stream)

    # Ours first, all at once, then the libraries': a frame on another protocol
    # may end the target before ours get theirs.
    ours = [p for p in served if p.startswith("/p2pnode/")]
    for group in (ours, [p for p in served if p not in ours]):
        if gone is not None and gone.is_set():
            out.unopened += len(group) * len(JUNK_FRAMES)
            continue
        async with trio.open_nursery() as nursery:
            for protocol in group:
                for frame in JUNK_FRAMES:
                    nursery.start_soon(one, protocol, frame)


# --- gossip: crash offers and floods ----------------------------------------------


def _signed(node: Node, offer: offers.Offer) -> bytes:
    unsigned = replace(offer, peer_id=node.peer_id, signature=b"")
    signed = replace(unsigned, signature=node.host.get_private_key().sign(unsigned.signing_bytes()))
    return offers.GOSSIP_CODEC.encode_body(signed)


def _offer(node: Node, seq: int, **changes: object) -> offers.Offer:
    base = offers.Offer(
        peer_id=node.peer_id,
        addrs=tuple(node.addrs[:1]),
        models=(offers.ModelOffer(model_id="simnet/bait", context_length=2048),),
        slots_free=1,
        queue_len=0,
        seq=seq,
        timestamp=time.time(),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def crash_offers(node: Node, seq: int) -> list[bytes]:
    """Correctly signed offers whose claims are junk: each must be INVALID, none may crash.

    Earlier versions died on the first (an address that is no multiaddr
    escaped py-libp2p's validator). Each offer is signed by ``node``.
    """
    model = offers.ModelOffer(model_id="simnet/bait", context_length=2048)
    other = made_up_id()
    junk_models: list[offers.ModelOffer] = [
        replace(model, price_per_s=-1),
        replace(model, tokens_per_s=1e300),
        replace(model, context_length=-1),
        replace(model, model_id=""),
        replace(model, gguf_sha256="not a sha256"),
        replace(model, bid_id="zz" * 32),
    ]
    variants: list[dict[str, object]] = [
        {"addrs": ("this is not a multiaddr", "/ip4/127.0.0.1/tcp/1")},
        {"addrs": (f"/ip4/127.0.0.1/tcp/1/p2p/{other}",)},
        {"addrs": ("/ip4/999.1.1.1/tcp/1",)},
        {"addrs": ("\x00" * 200,)},
        {"addrs": tuple(f"/ip4/127.0.0.1/tcp/{p}/p2p/{node.peer_id}" for p in range(1, 40))},
        {"models": (model, model)},
        {"slots_free": -1},
        {"queue_len": 10**12},
        {"seq": -1},
    ]
    variants.extend({"models": (m,)} for m in junk_models)
    return [_signed(node, replace(_offer(node, seq + i), **v)) for i, v in enumerate(variants)]  # type: ignore[arg-type]


def stop_validating_own_offers(node: Node) -> None:
    """The attacker's own node would refuse to publish junk: it runs no validator."""
    assert node.discovery is not None
    node.discovery.pubsub.remove_topic_validator(offers.TOPIC)


async def publish(node: Node, body: bytes) -> None:
    """Publish raw bytes on the offers topic (after :func:`stop_validating_own_offers`)."""
    assert node.discovery is not None
    await node.discovery.pubsub.publish(offers.TOPIC, body)


FLOOD_KINDS = ("junk", "oversized", "unsigned", "forged", "stale", "future", "replayed", "invalid")


async def flood_offers(
    node: Node, someone_elses: bytes, count: int, per_s: float, rng: random.Random
) -> collections.Counter[str]:
    """Publish ``count`` bad offers at ``per_s``, of every kind in :data:`FLOOD_KINDS`.

    ``someone_elses`` is an honest provider's signed offer, published again
    by the attacker (forged: gossip's author is not the offer's). Replays
    are the attacker's own bait offer with older sequence numbers, after the
    bait itself (accepted once, serving a model nobody asks for).
    """
    sent: collections.Counter[str] = collections.Counter()
    seq = int(time.time() * 1000) + 10_000_000
    await publish(node, _signed(node, _offer(node, seq)))
    sent["bait"] += 1
    invalid = crash_offers(node, seq + 1)
    for i in range(count):
        kind = FLOOD_KINDS[i % len(FLOOD_KINDS)]
        if kind == "junk":
            body = rng.randbytes(64)
        elif kind == "oversized":
            body = msgpack.packb({"t": "offer", "pad": rng.randbytes(9 * 1024)})
        elif kind == "unsigned":
            body = offers.GOSSIP_CODEC.encode_body(_offer(node, seq + 100 + i))
        elif kind == "forged":
            body = someone_elses
        elif kind == "stale":
            body = _signed(node, _offer(node, seq + 100 + i, timestamp=time.time() - 3600))
        elif kind == "future":
            body = _signed(node, _offer(node, seq + 100 + i, timestamp=time.time() + 3600))
        elif kind == "replayed":
            body = _signed(node, _offer(node, seq - 1 - i))
        else:
            body = invalid[i % len(invalid)]
        await publish(node, body)
        sent[kind] += 1
        await trio.sleep(1.0 / per_s)
    return sent


# --- Sybils ----------------------------------------------------------------


def claim_speed(node: Node, tokens_per_s: float) -> None:
    """Announce a generation speed the node never delivers."""
    node.offering.set_models(
        tuple(replace(m, tokens_per_s=tokens_per_s) for m in node.offering.models)
    )


# --- relay squatters ---------------------------------------------------------------


async def _hop(node: Node, relay: Node, msg: HopMessage) -> StatusCode | None:
    stream = await open_stream(node, relay.peer_id, str(HOP_PROTOCOL_ID))
    if stream is None:
        return None
    try:
        with trio.fail_after(STREAM_S):
            await write_delimited_msg(stream, msg)
            answer = await read_delimited_msg(stream, HopMessage)
        return StatusCode(answer.status)
    except Exception:  # noqa: BLE001 - reset, timeout or junk: no status
        return None
    finally:
        await reset_quietly(stream)


async def squat_relay(squatters: Sequence[Node], relay: Node) -> collections.Counter[str]:
    """Each squatter reserves on the relay for a made-up peer id, then for itself.

    Counts the relay's answers: ``made_up_<status>`` and ``own_<status>``
    (``none`` when no status came back). The squatters stay connected, so
    every slot they were granted stays taken.
    """
    seen: collections.Counter[str] = collections.Counter()
    for node in squatters:
        if not await connect(node, relay):
            seen["no_connection"] += 1
            continue
        fake = HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=made_up_id().to_bytes()))
        own = HopMessage(type=HopMessage.RESERVE, peer=PeerId(id=node.host.get_id().to_bytes()))
        for label, msg in (("made_up", fake), ("own", own)):
            status = await _hop(node, relay, msg)
            seen[f"{label}_{status.name.lower() if status is not None else 'none'}"] += 1
    return seen


# --- DHT poisoners ------------------------------------------------------------------

# Addresses nobody serves: a closed loopback port, a name that does not resolve.
JUNK_ADDRS = (Multiaddr("/ip4/127.0.0.1/tcp/1"), Multiaddr("/dns4/nowhere.invalid/tcp/4001"))


def _junk_peer(message_peer: kad_pb.Message.Peer, peer: ID, lure: str | None) -> None:
    message_peer.id = peer.to_bytes()
    # First, a good first protocol and then junk: py-libp2p parses lazily,
    # so only reading the rest (printing it, as a relay lookup does with the
    # first address it holds) finds out.
    message_peer.addrs.append(Multiaddr("/ip4/10.9.9.9").to_bytes() + b"\xff\x00junk")
    message_peer.addrs.extend(a.to_bytes() for a in JUNK_ADDRS)
    message_peer.addrs.append(b"\xff\x00junk")  # not a multiaddr at all
    if lure is not None:  # an honest node's address under a junk id: the handshake fails
        message_peer.addrs.append(Multiaddr(lure.split("/p2p/")[0]).to_bytes())


async def add_junk_providers(identity: Node, targets: Sequence[Node], key: bytes) -> int:
    """ADD_PROVIDER for ``key`` at each target: the identity itself at junk addresses,
    and a made-up peer (py-libp2p keeps only records of the sender). Returns messages sent.

    The identity disconnects afterwards: a poisoner needs no connection to
    keep its records, and the targets' connection budgets stay for others.
    """
    sent = 0
    for target in targets:
        if not await connect(identity, target):
            continue
        stream = await open_stream(identity, target.peer_id, str(KAD_PROTOCOL_ID))
        if stream is None:
            continue
        message = kad_pb.Message(type=kad_pb.Message.MessageType.ADD_PROVIDER, key=key)
        _junk_peer(message.providerPeers.add(), identity.host.get_id(), None)
        _junk_peer(message.providerPeers.add(), made_up_id(), target.addrs[0])
        try:
            with trio.fail_after(STREAM_S):
                await stream.write(encode_frame(message.SerializeToString()))
            sent += 1
        except Exception:  # noqa: BLE001, S110 - reset or slow: not sent
            pass
        finally:
            await close_quietly(stream)
        try:
            with trio.fail_after(STREAM_S):
                await identity.host.disconnect(ID.from_base58(target.peer_id))
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
    return sent


@dataclass
class Liar:
    """Kademlia answers of a node that names junk peers for every key."""

    answers: int = 0
    junk_ids: list[ID] = field(default_factory=list)


def answer_with_junk(liar: Node, junk_peers: int, lures: Sequence[str]) -> Liar:
    """Replace ``liar``'s Kademlia handler: every GET_PROVIDERS or FIND_NODE is answered
    with ``junk_peers`` made-up peers (as providers and as closer peers) at junk
    addresses, some with an honest node's address (``lures``) under the junk id."""
    out = Liar(junk_ids=[made_up_id() for _ in range(junk_peers)])

    async def handler(stream: INetStream) -> None:
        try:
            with trio.fail_after(STREAM_S):
                raw = await read_varint_prefixed_bytes_limited(stream, 64 * 1024)
                request = kad_pb.Message()
                request.ParseFromString(raw)
                reply = kad_pb.Message(type=request.type, key=request.key)
                for i, peer in enumerate(out.junk_ids):
                    lure = lures[i % len(lures)] if lures and i % 2 else None
                    if request.type == kad_pb.Message.MessageType.GET_PROVIDERS:
                        _junk_peer(reply.providerPeers.add(), peer, lure)
                    _junk_peer(reply.closerPeers.add(), peer, lure)
                await stream.write(encode_varint_prefixed(reply.SerializeToString()))
                out.answers += 1
        except Exception:  # noqa: BLE001, S110 - the liar does not care who hung up
            pass
        finally:
            await close_quietly(stream)

    liar.host.set_stream_handler(KAD_PROTOCOL_ID, handler)
    return out
