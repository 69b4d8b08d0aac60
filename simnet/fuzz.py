"""A network fuzzer: real peers send generated, mutated and truncated frames to one node.

Theory of operation. :func:`fuzz` connects ``attackers`` bare libp2p hosts to a
running node (real TCP, Noise and yamux on 127.0.0.1, built by ``p2p/host.py``
as every node's host is) and spends a frame budget on every protocol the node
speaks: status, session, infer and dial-back (msgpack frames, ``protocols/``),
offers (signed offers published through a real gossipsub), gossip (raw
gossipsub RPCs on the node's ``/meshsub/1.1.0`` handler), kad (Kademlia
protobufs) and circuit relay v2 HOP and STOP (protobufs). Each protocol gets a
share of the budget and a pool of workers; a worker picks an attack *kind*
(seeded), opens a stream and sends frames built from the real message classes,
then mutated: fields of the wrong type, huge and negative integers, NaN,
byte strings of the wrong length, unknown tags, extra and missing fields,
random msgpack, truncated frames, length prefixes above the cap, bit flips of a
real session's sealed frames, replays. Protocols that read many frames per
stream (kad, relay HOP, gossipsub) get pipelined batches; the others one stream
per exchange, many streams at once; once per run a burst holds a few hundred
half-sent streams open while status must still answer.

Counting is honest: a frame counts once the node has reacted to it (answered
it, answered a later frame on the same stream, closed or reset the stream), or,
for gossip, where the node never answers on the stream, once it was written
whole on a stream the node accepted; offers count when published (what the
node made of them is ``offers_judged``, its OfferBook's verdicts). Streams the
node refused (a ban, a limit, an unserved protocol, a budget that answers
before reading) carry no frames. A banned attacker, or one killed by what the
node sent it, is replaced by a fresh identity.

Attackers run in this process, or in worker processes (``processes``): the
node's side stays here. On loopback the node's py-libp2p stack is the limit
(a stream costs ~7 ms of CPU, both ends counted), hence the pipelining.

Alongside, a watcher declares the node dead when ``open_node``'s nursery dies,
when the caller's ``died`` event is set (:func:`open_target` sets it when an
exception escapes ``open_node``), or when status goes unanswered for
``unresponsive_s``; the attack stops then instead of hanging. Errors the node
logs as its own bugs are collected with their tracebacks. Afterwards the node
must answer status and serve an honest chat, and its memory (RSS, and the
sizes of its peer-keyed tables) is compared with before.

:func:`campaign` is the reproducible full run (``p2pnode simnet --scenario fuzz``):
when its node dies it starts a fresh one, replays the recently sent kinds one at
a time until one kills it again (the crash's minimal reproduction), skips that
kind and spends the rest of the budget on a new node.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import math
import multiprocessing
import random
import re
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Final

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.pb import kademlia_pb2 as kad_pb
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX
from libp2p.relay.circuit_v2.pb import circuit_pb2
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from p2pnode.errors import ErrorCode, P2PNodeError
from p2pnode.inference.engine import ChatMessage, Engine, Params
from p2pnode.inference.engine import Request as EngineRequest
from p2pnode.inference.synthetic import SyntheticEngine
from p2pnode.p2p import host as hostlib
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p import reputation as reputationlib
from p2pnode.p2p.discovery import RELAY_KEY, dht_key
from p2pnode.p2p.node import Node, NodeConfig, open_node
from p2pnode.protocols import dialback, infer, offers, session, status
from p2pnode.protocols.infer.machine import CLEAR, SEALED
from p2pnode.protocols.infer.machine import ConsumerMachine as InferConsumer
from p2pnode.protocols.infer.messages import (
    CLEAR_CODEC,
    SEALED_CODEC,
    Ack,
    Chunk,
    Done,
    InferOpen,
    Turn,
)
from p2pnode.protocols.infer.messages import Request as InferRequest
from p2pnode.protocols.session.crypto import (
    Ephemeral,
    Sealer,
    SessionKeys,
    handshake_transcript,
)
from p2pnode.protocols.session.machine import NONCE_BYTES
from p2pnode.protocols.session.machine import ConsumerMachine as SessionConsumer
from p2pnode.protocols.session.messages import Approve, Hello, Opened, Ready
from p2pnode.protocols.status import service as status_service
from p2pnode.protocols.stream import READ_SIZE, next_event
from p2pnode.protocols.wire import (
    DEFAULT_MAX_FRAME,
    PEER_CLOSED,
    PROMPT_MAX_FRAME,
    Codec,
    Error,
    FrameDecoder,
    Message,
    Sentinel,
    encode_frame,
    encode_varint,
)
from p2pnode.simnet.harness import rss_mb

logger = logging.getLogger(__name__)

# trio.TaskStatus is shadowed by the trio-typing stubs py-libp2p pulls in.
TaskStatus = Any

PROTOCOLS: Final = (
    "status",
    "dialback",
    "session",
    "infer",
    "offers",
    "gossip",
    "kad",
    "relay_hop",
    "relay_stop",
)
"""Report keys, one per protocol the node speaks (offers: through a real pubsub;
gossip: raw RPCs on the node's gossipsub stream handler)."""

FUZZ_MODEL: Final = "fuzz/model"
"""Model id the attackers' own offers announce."""

# Bounds on one attack (an exchange or a batch on one stream), on opening a
# stream, and on waiting for the node's reaction. A dial-back request may make
# the node dial 4 addresses for 3 s each.
ATTACK_S: Final = 25.0
OPEN_S: Final = 5.0
REPLY_S: Final = 5.0
# A worker whose attacks made no frame this many times in a row gives up on
# its protocol (the node does not serve it, or turns every stream away).
STALL_LIMIT: Final = 40
# Unanswered resets of one attacker's streams taken for a ban, where the node's
# own scores cannot be read (a worker process).
BAN_RESETS: Final = 3
# No frame at all for this long ends an attack (something waits without a bound).
STALL_S: Final = 120.0


# --- the report -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Issue:
    """Something the node did wrong, with what triggered it.

    ``frame_hex`` is the frame (at most 2 KiB of it) the attack sent last on
    ``protocol`` before the issue showed; ``reproduced`` says whether a
    sequential replay (one kind at a time) triggered it again, which makes that
    frame the minimal reproduction.
    """

    key: str
    protocol: str
    kind: str
    summary: str
    message: str = ""
    frame_hex: str = ""
    detail: str = ""
    reproduced: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "kind": self.kind,
            "summary": self.summary,
            "message": self.message,
            "frame_hex": self.frame_hex,
            "detail": self.detail,
            "reproduced": self.reproduced,
        }


@dataclass(kw_only=True)
class FuzzReport:
    """What one fuzzing run sent and what the node did (see :meth:`to_json`)."""

    attackers: int = 0
    seed: int = 0
    engine: str = ""
    frames: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 0))
    kinds: dict[str, int] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 0))
    refused_streams: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 0))
    unanswered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROTOCOLS, 0))
    unserved: list[str] = field(default_factory=list)
    seconds: float = 0.0  # attacking, over every node fuzzed
    wall_seconds: float = 0.0  # the whole run: start-up, triage and checks too
    node_exits: int = 0
    # The time bound ended the attack before its frame budget was spent.
    cut_short: bool = False
    exit_reasons: list[str] = field(default_factory=list)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    rss_samples_mb: list[tuple[int, float]] = field(default_factory=list)
    tables_before: dict[str, int] = field(default_factory=dict)
    tables_after: dict[str, int] = field(default_factory=dict)
    status_ok: bool = False
    chat_ok: bool | None = None
    chat_text: str = ""
    offers_judged: dict[str, int] = field(default_factory=dict)
    protocol_errors: int = 0
    attackers_rotated: int = 0
    logged_errors: dict[str, int] = field(default_factory=dict)
    harness_exceptions: dict[str, int] = field(default_factory=dict)
    issues: list[Issue] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    recent_kinds: list[str] = field(default_factory=list)

    @property
    def total_frames(self) -> int:
        return sum(self.frames.values())

    @property
    def rss_growth_mb(self) -> float:
        return round(self.rss_after_mb - self.rss_before_mb, 1)

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready report (``fuzz_frames``, ``fuzz_node_exits``, ``rss_growth_mb``...)."""
        seconds = max(self.seconds, 1e-9)
        return {
            "scenario": "fuzz",
            "fuzz_frames": self.total_frames,
            "fuzz_node_exits": self.node_exits,
            "cut_short": self.cut_short,
            "frames_per_protocol": dict(self.frames),
            "rss_growth_mb": self.rss_growth_mb,
            "errors": list(self.errors),
            "seconds": round(self.seconds, 1),
            "wall_seconds": round(max(self.wall_seconds, self.seconds), 1),
            "frames_per_s": round(self.total_frames / seconds),
            "attackers": self.attackers,
            "seed": self.seed,
            "engine": self.engine,
            "streams_per_protocol": dict(self.streams),
            "refused_streams_per_protocol": dict(self.refused_streams),
            "unanswered_per_protocol": dict(self.unanswered),
            "unserved_protocols": list(self.unserved),
            "frames_per_kind": dict(sorted(self.kinds.items())),
            "exit_reasons": list(self.exit_reasons),
            "rss_before_mb": round(self.rss_before_mb, 1),
            "rss_after_mb": round(self.rss_after_mb, 1),
            "rss_samples_mb": [[n, round(mb, 1)] for n, mb in self.rss_samples_mb],
            "tables_before": dict(self.tables_before),
            "tables_after": dict(self.tables_after),
            "status_ok": self.status_ok,
            "chat_ok": self.chat_ok,
            "chat_text": self.chat_text,
            "offers_judged": dict(self.offers_judged),
            "protocol_errors_counted": self.protocol_errors,
            "attackers_rotated": self.attackers_rotated,
            "logged_errors": dict(self.logged_errors),
            "harness_exceptions": dict(self.harness_exceptions),
            "issues": [i.to_json() for i in self.issues],
        }


# --- hostile values, maps and frames -------------------------------------------

_INTS: Final = (0, -1, 1, 2**31 - 1, -(2**31), 2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1)
_FLOATS: Final = (math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324)
_JUNK_ADDRS: Final = (
    "",
    "not-a-multiaddr",
    "/ip4/300.1.2.3/tcp/1",
    "/ip4/127.0.0.1/tcp/99999",
    "/p2p-circuit",
    "/ip4/127.0.0.1/tcp/1/p2p/not-a-peer-id",
    "/dns4/" + "a" * 300 + "/tcp/1",
    "/ip4/127.0.0.1/udp/1/quic-v1/webtransport/certhash/zz",
    "/unix/%2Ftmp%2Fx",
    "\x00/ip4/1.2.3.4/tcp/1",
)
_TEXTS: Final = (
    "",
    " ",
    "\x00",
    "%s%n%x",
    "../../etc/passwd",
    "\u202e\ufeff",
    "é" * 100,
    "A" * 5000,
    "t",
    "status.request",
    *_JUNK_ADDRS[1:4],
)
# Raw msgpack the packer would never write: invalid UTF-8 in a str, integer map
# keys, containers whose headers claim 2**32 - 1 entries, an ext type, the
# reserved byte, deep nesting, two objects in one body.
_RAW_MSGPACK: Final = (
    b"\x81\xa1t\xa4\xff\xfe\xfd\xfc",
    b"\x82\x01\x02\xa1t\xa1x",
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xffabc",
    b"\xc6\xff\xff\xff\xffabc",
    b"\xd4\x01\x00",
    b"\xc1",
    b"\x91" * 3000 + b"\xc0",
    b"\x81\xa1t\xa1x\x81\xa1t\xa1x",
    b"",
)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Hostile:
    """Hostile values, message maps and frames from one seeded random source."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, weights: dict[str, int], allowed: Callable[[str], bool]) -> str | None:
        """A weighted choice among the names ``allowed`` accepts (None if none)."""
        names = [n for n in weights if allowed(n)]
        if not names:
            return None
        return self.rng.choices(names, [weights[n] for n in names])[0]

    def text(self) -> str:
        if self.chance(0.3):
            return "".join(
                chr(self.rng.randrange(32, 0x3000)) for _ in range(self.rng.randrange(40))
            )
        return self.rng.choice(_TEXTS)

    def blob(self) -> bytes:
        return self.rng.randbytes(self.rng.choice((0, 1, 15, 16, 17, 31, 32, 33, 64, 1000)))

    def number(self) -> int | float:
        return self.rng.choice(_INTS) if self.chance(0.6) else self.rng.choice(_FLOATS)

    def value(self, depth: int = 0) -> Any:
        """Any msgpack-packable value, biased to the hostile ones."""
        r = self.rng.randrange(11 if depth < 2 else 7)
        if r == 0:
            return self.rng.choice(_INTS)
        if r == 1:
            return self.rng.choice(_FLOATS)
        if r == 2:
            return self.text()
        if r == 3:
            return self.blob()
        if r == 4:
            return self.rng.choice((True, False))
        if r == 5:
            return None
        if r == 6:
            return self.rng.randrange(-1000, 1000)
        if r == 7:
            return [self.value(depth + 1) for _ in range(self.rng.randrange(5))]
        if r == 8:
            return {self.text()[:20]: self.value(depth + 1) for _ in range(self.rng.randrange(4))}
        if r == 9:  # a long list of small items: cheap to send, costly to decode
            return [self.rng.choice((0, "", None, {}))] * self.rng.choice((1000, 6000))
        return {"t": self.text()[:20], "x": self.value(depth + 1)}

    def mutate(self, wire: dict[str, Any], tags: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
        """A copy of a message map with 1-3 hostile changes, and what they were."""
        out = dict(wire)
        done: list[str] = []
        for _ in range(self.rng.randint(1, 3)):
            names = [k for k in out if k != "t"]
            op = self.rng.randrange(7)
            if op == 0 and names:
                name = self.rng.choice(names)
                out[name] = self.value()
                done.append(f"{name}={_short(out[name])}")
            elif op == 1 and names:
                name = self.rng.choice(names)
                del out[name]
                done.append(f"-{name}")
            elif op == 2:
                name = self.text()[:30] or "extra"
                out[name] = self.value()
                done.append(f"+{name!r}")
            elif op == 3:
                out["t"] = self.rng.choice([*tags, self.text(), 7, None, b"t", ["t"]])
                done.append(f"t={_short(out['t'])}")
            elif op == 4 and names:
                name = self.rng.choice(names)
                out[name] = self.number()
                done.append(f"{name}={out[name]!r}")
            elif op == 5 and names:
                name = self.rng.choice(names)
                inner = out[name]
                if isinstance(inner, dict):
                    out[name], what = self.mutate(inner)
                    done.append(f"{name}.{{{what}}}")
                elif isinstance(inner, list) and inner and isinstance(inner[0], dict):
                    first, what = self.mutate(inner[0])
                    out[name] = [first, *inner[1:]]
                    done.append(f"{name}[0].{{{what}}}")
                elif isinstance(inner, str | bytes | int | float | bool) or inner is None:
                    # A scalar repeated, up to ~100 KB: above every frame cap,
                    # never so big that building it stalls the loop.
                    size = len(inner) if isinstance(inner, str | bytes) else 8
                    count = min(500, max(2, 100_000 // (size + 1)))
                    out[name] = [inner] * self.rng.choice((2, count))
                    done.append(f"{name}=[{_short(inner, 20)}, ...]")
            elif op == 6:
                out = {k: out[k] for k in reversed(list(out))}  # order must not matter
                out["t"] = out.get("t")
                done.append("reordered")
        return out, "; ".join(done)

    def pack(self, obj: Any) -> bytes:
        try:
            return bytes(msgpack.packb(obj, use_bin_type=True))
        except (ValueError, TypeError, OverflowError):
            return self.garbage()

    def garbage(self) -> bytes:
        """Bytes that are not a message: random, or msgpack no packer writes."""
        if self.chance(0.5):
            return self.rng.randbytes(self.rng.randrange(1, 300))
        return self.rng.choice(_RAW_MSGPACK)

    def flip(self, data: bytes, start: int = 0) -> bytes:
        """``data`` with 1-4 bits flipped at or after ``start``."""
        if len(data) <= start:
            return data + b"\x00"
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(start, len(out))
            out[i] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def framing(self, body: bytes, cap: int) -> tuple[str, bytes]:
        """A malformed frame around ``body`` (the stream is closed right after)."""
        frame = encode_frame(body)
        variant = self.rng.choice(
            (
                "truncated",
                "oversize",
                "huge_prefix",
                "long_varint",
                "nonminimal",
                "empty_body",
                "short_body",
                "flipped",
                "two_frames",
                "no_prefix",
            )
        )
        data: bytes
        if variant == "truncated":
            data = frame[: self.rng.randrange(1, max(2, len(frame)))]
        elif variant == "oversize":
            data = encode_varint(cap + 1 + self.rng.randrange(1 << 20)) + body[:64]
        elif variant == "huge_prefix":
            data = encode_varint(2**62) + b"x"
        elif variant == "long_varint":
            data = b"\xff" * 10 + b"\x01"
        elif variant == "nonminimal":
            data = bytes([0x80 | (len(body) & 0x7F), 0x00]) + body
        elif variant == "empty_body":
            data = b"\x00"
        elif variant == "short_body":
            data = encode_varint(len(body) + 1 + self.rng.randrange(100)) + body
        elif variant == "flipped":
            data = self.flip(frame)
        elif variant == "two_frames":
            data = frame + frame
        else:
            data = body or b"\x01"
        return variant, data


# --- attackers --------------------------------------------------------------------


@dataclass(eq=False)
class _Session:
    """A real session an attacker opened, and the frames that opened it."""

    session_id: bytes
    keys: SessionKeys
    hello_frame: bytes
    opened_frame: bytes
    next_stream: int = 1
    served_stream: int | None = None  # a stream id the node answered on


@dataclass(eq=False)
class Attacker:
    """A bare libp2p host that attacks (and its gossipsub, when it has one)."""

    host: IHost
    key_pair: KeyPair
    addr: str
    pubsub: Pubsub | None = None
    session: _Session | None = None
    seq: int = field(default_factory=lambda: int(time.time() * 1000))
    retired: bool = False
    # Streams the node reset without a word (see _Run.banned).
    resets: int = 0
    # Why its host stopped, if it died (what the node sent it can kill it).
    death: str | None = None

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    def sign(self, data: bytes) -> bytes:
        return bytes(self.key_pair.private_key.sign(data))

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


async def _stop_handler(stream: INetStream) -> None:
    """Answer a relay's STOP as a willing destination would (to see whether it relays)."""
    with contextlib.suppress(Exception), trio.move_on_after(REPLY_S):
        await _Frames(stream).next()
        reply = circuit_pb2.StopMessage(type=circuit_pb2.StopMessage.STATUS, status=circuit_pb2.OK)
        await stream.write(encode_frame(reply.SerializeToString()))
        await trio.sleep(0.2)
    await _reset(stream)


async def _start_attacker(crew: trio.Nursery, *, gossip: bool) -> Attacker:
    """A new attacker, running in ``crew`` until it is cancelled or dies.

    Its death is recorded (``death``, and it is ``retired``), not raised:
    what the node sends its peers can kill a py-libp2p host too.
    """
    attacker: Attacker = await crew.start(_run_attacker, gossip)
    return attacker


async def _run_attacker(
    gossip: bool, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    attacker: Attacker | None = None
    try:
        async with AsyncExitStack() as stack:
            key_pair = create_new_key_pair()
            host = hostlib.build(key_pair, hostlib.Config())
            addrs = await stack.enter_async_context(hostlib.running(host, hostlib.Config()))
            host.set_stream_handler(TProtocol(STOP_PROTOCOL_ID), _stop_handler)
            pubsub = None
            if gossip:
                # Spam protection off: it would cap this publisher at 10 messages/s.
                router = GossipSub(
                    protocols=[PROTOCOL_ID_V11],
                    degree=6,
                    degree_low=4,
                    degree_high=12,
                    heartbeat_interval=1,
                    spam_protection_enabled=False,
                )
                pubsub = Pubsub(host, router, strict_signing=True)
                await stack.enter_async_context(background_trio_service(pubsub))
                await stack.enter_async_context(background_trio_service(router))
                await pubsub.wait_until_ready()
            # Runs first on the way out: py-libp2p's close can leave sockets open
            # (and unread: the node's writes to them would then block).
            stack.callback(_close_sockets, host)
            attacker = Attacker(host, key_pair, addrs[0], pubsub)
            task_status.started(attacker)
            await trio.sleep_forever()
    except BaseException as exc:  # an attacker's death is a finding, not the harness's end
        if attacker is None or _only_cancelled(exc):
            raise
        attacker.retired = True
        attacker.death = "".join(traceback.format_exception(exc))[-4000:]


def _close_sockets(host: IHost) -> None:
    """Close the TCP sockets under every connection of ``host``, whatever state it is in."""
    for conns in list(host.get_network().connections.values()):
        for conn in conns if isinstance(conns, list) else [conns]:
            layer: object = conn
            # SwarmConn > Yamux > SecureSession > Noise read-writer > RawConnection
            # > TrioTCPStream > trio.SocketStream (py-libp2p 0.8.1).
            for name in ("muxed_conn", "secured_conn", "conn", "conn", "stream", "stream"):
                layer = getattr(layer, name, None)
                if isinstance(layer, trio.SocketStream):
                    layer.socket.close()
                    break


async def _reset(stream: INetStream) -> None:
    """Reset a stream, within a second even when cancelled.

    The deadline is on the shielded scope itself: a deadline outside a shield
    never reaches inside it (docs/libp2p-traps.md#reset-can-block).
    """
    with trio.move_on_after(1.0) as scope, contextlib.suppress(*_QUIET):
        scope.shield = True
        await stream.reset()


def _dial_addr(node: Node) -> str:
    """A direct TCP multiaddr (with /p2p/) where ``node`` listens."""
    candidates = [
        a
        for a in [*node.relay_keeping.direct_addrs, *node.addrs]
        if "/tcp/" in a and "/ws" not in a
    ]
    if not candidates:
        raise P2PNodeError(f"node {node.peer_id} has no direct TCP address to fuzz")
    return next(a for a in candidates if not relaylib.is_circuit(a))


# --- one run's state ------------------------------------------------------------


@dataclass(eq=False)
class _Sample:
    kind: str
    frame: bytes
    what: str


@dataclass(eq=False)
class _Run:
    """What the workers of one run share: the node, the attackers, the counts.

    ``node`` is None in a worker process (the node runs in the parent).
    """

    node: Node | None
    peer: ID
    addr: str
    attackers: list[Attacker]
    crew: trio.Nursery  # where the attackers run
    seed: int
    quota: dict[str, int]
    skip: frozenset[str]
    report: FuzzReport
    model_id: str | None
    rng: random.Random
    last: dict[str, _Sample] = field(default_factory=dict)
    recent: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    sequential: bool = False  # triage: one attack at a time, every kind allowed
    # Frames counted so far by each worker process (their progress reports).
    remote: dict[int, int] = field(default_factory=dict)
    # Attackers replaced (banned, or killed by what the node sent them).
    fallen: list[Attacker] = field(default_factory=list)

    def progress(self) -> int:
        """Frames sent so far, by this process and by the worker processes."""
        return self.report.total_frames + sum(self.remote.values())

    def remaining(self, protocol: str) -> int:
        if self.sequential:
            return 1 << 30
        return self.quota.get(protocol, 0) - self.report.frames[protocol]

    def allowed(self, protocol: str) -> Callable[[str], bool]:
        return lambda kind: f"{protocol}/{kind}" not in self.skip

    def sent(self, protocol: str, kind: str, frames: int, frame: bytes, what: str = "") -> None:
        """Count ``frames`` the node reacted to; keep the last one for reports."""
        if frames <= 0:
            return
        self.report.frames[protocol] += frames
        name = f"{protocol}/{kind}"
        self.report.kinds[name] = self.report.kinds.get(name, 0) + frames
        self.last[protocol] = _Sample(kind, frame[:2048], what[:400])
        self.recent.pop(name, None)
        self.recent[name] = None
        while len(self.recent) > 128:
            self.recent.popitem(last=False)

    def unanswered(self, protocol: str) -> None:
        self.report.unanswered[protocol] += 1

    def issue(self, key: str, protocol: str, kind: str, summary: str, detail: str = "") -> None:
        """Record a finding once (``key`` dedupes), with the last frame of ``protocol``."""
        if any(i.key == key for i in self.report.issues):
            return
        sample = self.last.get(protocol)
        self.report.issues.append(
            Issue(
                key=key,
                protocol=protocol,
                kind=kind,
                summary=summary,
                message=sample.what if sample else "",
                frame_hex=sample.frame.hex() if sample else "",
                detail=detail,
                reproduced=self.sequential,
            )
        )

    def other_peer(self, att: Attacker) -> ID:
        others = [a for a in self.attackers if a is not att]
        return self.rng.choice(others).peer_id if others else att.peer_id

    def banned(self, att: Attacker) -> bool:
        """Whether the node bans ``att`` now, asked after a stream it reset unanswered.

        In a worker process the node's scores are out of reach: there three
        such resets in a row of one attacker count as a ban (a node resets a
        stream unanswered only when it refuses the peer outright).
        """
        reputation = getattr(self.node, "reputation", None)
        if reputation is None:
            att.resets += 1
            return att.resets >= BAN_RESETS
        return bool(reputation.banned(str(att.peer_id), trio.current_time()))

    async def rotate(self, att: Attacker) -> None:
        """Replace a banned or dead attacker by a fresh identity (a Sybil, as a real
        attacker would)."""
        if att not in self.attackers:
            return  # another worker replaced it already
        self.attackers.remove(att)
        self.fallen.append(att)
        att.retired = True
        fresh = await _start_attacker(self.crew, gossip=att.pubsub is not None)
        await hostlib.connect(fresh.host, hostlib.parse_peer_addr(self.addr), OPEN_S)
        self.attackers.append(fresh)
        self.report.attackers_rotated += 1


# --- stream helpers ------------------------------------------------------------------

_QUIET: Final = (
    BaseLibp2pError,
    OSError,
    EOFError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


async def _open(run: _Run, att: Attacker, protocol: str, protocol_id: str) -> INetStream | None:
    """A new stream to the node, or None (counted as refused)."""
    try:
        with trio.fail_after(OPEN_S):
            stream = await att.host.new_stream(run.peer, [TProtocol(protocol_id)])
    except (trio.TooSlowError, *_QUIET) as exc:
        run.report.refused_streams[protocol] += 1
        unserved = "not supported" in str(exc).lower()
        if unserved and not run.report.frames[protocol] and protocol not in run.report.unserved:
            run.report.unserved.append(protocol)
        return None
    run.report.streams[protocol] += 1
    return stream


async def _send(stream: INetStream, data: bytes, *, close: bool = True) -> bool:
    """Write and (by default) half-close; False if the node had already cut the stream
    or did not take the bytes within ``REPLY_S``.

    Bounded: a node that stops reading a stream leaves its yamux window shut, and
    an unbounded write then waits for ever (seen: every attack task of a worker
    parked behind one such write, the attack stalled for STALL_S).
    """
    try:
        with trio.fail_after(REPLY_S):
            if data:
                await stream.write(data)
            if close:
                await stream.close()  # yamux: a half-close (FIN); reading goes on
    except trio.TooSlowError:
        await _reset(stream)
        return False
    except _QUIET:
        return False
    return True


async def _drain(
    stream: INetStream, *, limit: int = 256 * 1024, wait_s: float = REPLY_S
) -> tuple[bytes, bool]:
    """What the node sends until it closes or resets the stream, ``limit`` bytes or ``wait_s``.

    Returns the bytes and whether the stream ended (closed or reset by the node).
    """
    got = bytearray()
    ended = False
    with trio.move_on_after(wait_s):
        try:
            while len(got) < limit:
                data = await stream.read(READ_SIZE)
                if not data:
                    ended = True
                    break
                got += data
        except _QUIET:
            ended = True
    return bytes(got), ended


def _frames(data: bytes, cap: int = PROMPT_MAX_FRAME) -> list[bytes]:
    """The complete frame bodies at the start of ``data``."""
    decoder = FrameDecoder(cap)
    decoder.receive_data(data)
    out = []
    with contextlib.suppress(P2PNodeError):
        while not isinstance(body := decoder.next_frame(), Sentinel):
            out.append(body)
    return out


class _Frames:
    """Varint-prefixed bodies read from a stream in large chunks (protobuf protocols).

    py-libp2p's own reader takes a length prefix one byte per read, and each
    read of a yamux stream may send a window update: reading 64 KiB at a time
    keeps the attacker's share of the CPU small.
    """

    def __init__(self, stream: INetStream, cap: int = 1 << 20) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(cap)

    async def next(self) -> bytes:
        """The next body; EOFError when the stream ends (between frames or not)."""
        while True:
            body = self._decoder.next_frame()
            if isinstance(body, bytes):
                return body
            if body is PEER_CLOSED:
                raise EOFError("stream ended")
            data = await self._stream.read(READ_SIZE)
            self._decoder.receive_data(data)


async def _pipelined(
    stream: INetStream, batch: Sequence[tuple[bytes, bool, bool]], wait_s: float
) -> tuple[int, int]:
    """Write every frame at once, then read the node's answers in order.

    ``batch`` holds (frame, whether the node answers it, whether it ends the
    stream). Returns how many frames the node read and how many answers came:
    every frame up to the last one answered, and the next if it was meant to
    end the stream and the stream ended there.
    """
    await _send(stream, b"".join(frame for frame, _, _ in batch))
    answered_at = [i for i, (_, answers, _) in enumerate(batch) if answers]
    answers = 0
    ended = False
    reader = _Frames(stream)
    with trio.move_on_after(wait_s):
        try:
            while answers < len(answered_at):
                await reader.next()
                answers += 1
            await reader.next()  # nothing more is due: only the end can come
        except (P2PNodeError, *_QUIET):
            ended = True
    consumed = answered_at[answers - 1] + 1 if answers else 0
    if ended and consumed < len(batch) and batch[consumed][2]:
        consumed += 1
    elif ended and answers == len(answered_at):
        consumed = len(batch)
    return consumed, answers


# --- status and dial-back (one request per stream) -------------------------------


_UNARY_KINDS: Final = {
    "valid": 4,
    "mutated": 6,
    "wrong_message": 2,
    "garbage": 3,
    "framing": 4,
    "slow": 1,
}


async def _unary(
    run: _Run,
    att: Attacker,
    h: Hostile,
    force: str | None,
    *,
    protocol: str,
    protocol_id: str,
    codec: Codec,
    valid: Message,
    wrong: Sequence[Message],
    answer: type[Message],
    wait_s: float = REPLY_S,
    refusals: frozenset[int] = frozenset(),
) -> None:
    kind = force or h.pick(_UNARY_KINDS, run.allowed(protocol))
    if kind is None:
        return
    body = codec.encode_body(valid)
    what = _short(valid.to_wire(), 300)
    if kind == "valid":
        data = encode_frame(body)
    elif kind == "mutated":
        wire, what = h.mutate(valid.to_wire(), [type(m).TYPE for m in wrong])
        data = encode_frame(h.pack(wire))
    elif kind == "wrong_message":
        msg = h.rng.choice(wrong)
        what = _short(msg.to_wire(), 300)
        data = codec.encode(msg)
    elif kind == "garbage":
        raw = h.garbage()
        what = f"garbage {_short(raw)}"
        data = encode_frame(raw)
    elif kind == "framing":
        what, data = h.framing(body, DEFAULT_MAX_FRAME)
    else:  # slow: half a frame, a pause, the rest (the node must wait, bounded)
        data = encode_frame(body)
    stream = await _open(run, att, protocol, protocol_id)
    if stream is None:
        return
    try:
        if kind == "slow":
            cut = max(1, len(data) // 2)
            await _send(stream, data[:cut], close=False)
            await trio.sleep(h.rng.uniform(0.2, 2.0))
            await _send(stream, data[cut:])
        else:
            await _send(stream, data)
        reply, ended = await _drain(stream, wait_s=wait_s)
    finally:
        await _reset(stream)
    if not reply and not ended:
        run.unanswered(protocol)
        return
    if not reply and run.banned(att):
        await run.rotate(att)
        return
    first = _decode_first(codec, reply)
    if isinstance(first, Error) and first.code in refusals:
        run.report.refused_streams[protocol] += 1  # turned away before it was read
        return
    run.sent(protocol, kind, 1, data, what)
    if kind in ("valid", "slow"):
        bodies = _frames(reply)
        try:
            got = codec.decode(bodies[0]) if bodies else None
        except P2PNodeError:
            got = None
        if not isinstance(got, answer | Error):
            run.issue(
                f"{protocol}-no-answer",
                protocol,
                kind,
                f"a valid {valid.TYPE} got no {answer.TYPE} (got {_short(reply)})",
            )


async def _status(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    await _unary(
        run,
        att,
        h,
        force,
        protocol="status",
        protocol_id=status.PROTOCOL_ID,
        codec=status.CODEC,
        valid=status.StatusRequest(),
        wrong=[
            status.StatusResponse(
                peer_id=str(run.peer),
                version="0",
                addrs=(run.addr,),
                connected_peers=1,
                uptime_s=1.0,
            ),
            Error(code=1, message="x"),
        ],
        answer=status.StatusResponse,
    )


def _hostile_addrs(run: _Run, att: Attacker, h: Hostile) -> tuple[str, ...]:
    own = att.addr.split("/p2p/")[0]
    pool = [
        *_JUNK_ADDRS,
        own,
        own + "/ws",
        "/ip4/127.0.0.1/tcp/1",
        "/ip4/10.0.0.1/tcp/4001",
        "/ip6/::1/tcp/1",
        run.addr.split("/p2p/")[0],
    ]
    count = h.rng.choice((0, 1, 2, 4, 5, 64))
    return tuple(h.rng.choice(pool) for _ in range(count))


async def _dialback(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    request = dialback.DialBackRequest(addrs=_hostile_addrs(run, att, h))
    await _unary(
        run,
        att,
        h,
        force,
        protocol="dialback",
        protocol_id=dialback.PROTOCOL_ID,
        codec=dialback.CODEC,
        valid=request,
        wrong=[dialback.DialBackResponse(reachable=("x",)), Error(code=2)],
        answer=dialback.DialBackResponse,
        wait_s=ATTACK_S - 2,
        # The helper's budgets answer these before reading the request.
        refusals=frozenset({ErrorCode.UNSUPPORTED, ErrorCode.BUSY, ErrorCode.RATE_LIMITED}),
    )


# --- session handshakes -----------------------------------------------------------

_SESSION_KINDS: Final = {
    "handshake": 3,
    "hello": 6,
    "opened": 3,
    "replay": 3,
    "order": 2,
    "garbage": 2,
    "framing": 3,
}


def _hello(run: _Run) -> tuple[Hello, Ephemeral]:
    ephemeral = Ephemeral()
    hello = Hello(
        model_id=run.model_id or FUZZ_MODEL,
        ephemeral=ephemeral.public,
        nonce=secrets.token_bytes(NONCE_BYTES),
        timestamp=time.time(),
    )
    return hello, ephemeral


def _session_machine(run: _Run, att: Attacker, ephemeral: Ephemeral) -> SessionConsumer:
    return SessionConsumer(
        DEFAULT_MAX_FRAME,
        ephemeral,
        local_peer=att.peer_id.to_bytes(),
        remote_peer=run.peer.to_bytes(),
    )


async def _handshake(run: _Run, att: Attacker) -> _Session | None:
    """Open a real session the way a consumer does, recording its frames."""
    stream = await _open(run, att, "session", session.PROTOCOL_ID)
    if stream is None:
        return None
    hello, ephemeral = _hello(run)
    machine = _session_machine(run, att, ephemeral)
    hello_frame = machine.send_hello(hello)
    try:
        with trio.fail_after(REPLY_S * 2):
            await stream.write(hello_frame)
            approve = await next_event(stream, machine)
            run.sent("session", "handshake", 1, hello_frame, _short(hello.to_wire(), 300))
            if not isinstance(approve, Approve):
                return None
            opened_frame = machine.send_opened()
            await stream.write(opened_frame)
            ready = await next_event(stream, machine)
            run.sent("session", "handshake", 1, opened_frame, "Opened (transcript id)")
    except (trio.TooSlowError, P2PNodeError, *_QUIET):
        return None
    finally:
        await _reset(stream)
    if not isinstance(ready, Ready) or machine.keys is None:
        return None
    return _Session(machine.session_id, machine.keys, hello_frame, opened_frame)


async def _session(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    kind = force or h.pick(_SESSION_KINDS, run.allowed("session"))
    if kind is None:
        return
    if kind == "handshake":
        recorded = await _handshake(run, att)
        if recorded is not None:
            att.session = recorded
        return
    hello, ephemeral = _hello(run)
    hello_body = session.CODEC.encode_body(hello)
    first = encode_frame(hello_body)
    what = _short(hello.to_wire(), 300)
    # The second frame, given the Approve body (None: the exchange ends at one).
    then: Callable[[bytes], bytes] | None = None
    if kind == "hello":
        wire, what = h.mutate(hello.to_wire(), ["session.opened", "session.ready"])
        if h.chance(0.3):  # a non-finite clock: does the staleness check still hold?
            wire["timestamp"] = h.rng.choice((math.nan, math.inf, -math.inf))
            what = f"timestamp={wire['timestamp']!r}"
        hello_body = h.pack(wire)
        first = encode_frame(hello_body)
        then = partial(_opened_for, run, att, hello_body)
    elif kind == "opened":
        opened = Opened(session_id=h.blob())
        wire, opened_what = h.mutate(opened.to_wire(), ["session.hello", "session.ready"])
        second = h.rng.choice(
            (
                encode_frame(h.pack(wire)),
                session.CODEC.encode(opened),
                h.framing(session.CODEC.encode_body(opened), DEFAULT_MAX_FRAME)[1],
            )
        )
        what = f"valid Hello, then Opened {opened_what}"
        then = partial(_constant, second)
    elif kind == "replay":
        recorded = att.session
        if recorded is None:
            return
        if h.chance(0.5):
            first = h.flip(recorded.hello_frame, start=1)
            what = "bit flips of a recorded Hello"
        else:
            first = recorded.hello_frame
            what = "a recorded Hello and Opened, replayed"
            then = partial(_constant, recorded.opened_frame)
    elif kind == "order":
        msg = h.rng.choice(
            (
                Opened(session_id=h.blob()),
                Ready(session_id=b"x" * 32),
                Approve(ephemeral=b"\x00" * 32, nonce=b"\x00" * 16),
                Error(code=5, message="consumer error"),
            )
        )
        first = session.CODEC.encode(msg)
        what = _short(msg.to_wire(), 300)
    elif kind == "garbage":
        raw = h.garbage()
        first = encode_frame(raw)
        what = f"garbage {_short(raw)}"
    else:
        what, first = h.framing(hello_body, DEFAULT_MAX_FRAME)
    stream = await _open(run, att, "session", session.PROTOCOL_ID)
    if stream is None:
        return
    try:
        await _send(stream, first, close=then is None)
        reply, ended = await _drain_first(stream)
        if not reply and not ended:
            run.unanswered("session")
            return
        if not reply and run.banned(att):
            await run.rotate(att)
            return
        run.sent("session", kind, 1, first, what)
        got = _decode_first(session.CODEC, reply)
        if not isinstance(got, Approve) or then is None:
            return
        if kind == "hello" and "timestamp=" in what and "nan" in what.lower():
            run.issue(
                "session-nan-timestamp",
                "session",
                kind,
                "a Hello whose timestamp is NaN was approved (the staleness check compares "
                "false with NaN, so the replay bound does not hold)",
            )
        second = then(_approve_body(reply))
        await _send(stream, second)
        reply2, ended2 = await _drain(stream)
        if reply2 or ended2:
            run.sent("session", kind, 1, second, f"{what} (second frame)")
        if kind == "replay" and isinstance(_decode_first(session.CODEC, reply2), Ready):
            run.issue(
                "session-replayed-opened",
                "session",
                kind,
                "a replayed Opened (an old session id) was accepted",
            )
    finally:
        await _reset(stream)


def _opened_for(run: _Run, att: Attacker, hello_body: bytes, approve_body: bytes) -> bytes:
    """The Opened an honest consumer would send after this (hostile) Hello was approved."""
    transcript = handshake_transcript(
        consumer=att.peer_id.to_bytes(),
        provider=run.peer.to_bytes(),
        hello=hello_body,
        approve=approve_body,
    )
    return session.CODEC.encode(Opened(session_id=transcript))


def _constant(frame: bytes, _approve_body: bytes) -> bytes:
    return frame


async def _drain_first(stream: INetStream) -> tuple[bytes, bool]:
    """Read until one whole frame arrived, or the stream ended, or the bound passed."""
    got = bytearray()
    with trio.move_on_after(REPLY_S):
        try:
            while not _frames(bytes(got), DEFAULT_MAX_FRAME):
                data = await stream.read(READ_SIZE)
                if not data:
                    return bytes(got), True
                got += data
        except _QUIET:
            return bytes(got), True
    return bytes(got), False


def _decode_first(codec: Codec, data: bytes) -> Message | None:
    bodies = _frames(data, DEFAULT_MAX_FRAME)
    if not bodies:
        return None
    try:
        return codec.decode(bodies[0])
    except P2PNodeError:
        return None


def _approve_body(data: bytes) -> bytes:
    bodies = _frames(data, DEFAULT_MAX_FRAME)
    return bodies[0] if bodies else b""


# --- inference streams -------------------------------------------------------------

_INFER_KINDS: Final = {
    "valid": 4,
    "request": 6,
    "open": 4,
    "flip": 3,
    "replay": 2,
    "clear": 3,
    "ack": 3,
    "midstream": 2,
    "framing": 3,
    "garbage": 2,
}


def _infer_request(run: _Run, max_tokens: int) -> InferRequest:
    return InferRequest(
        request_id=secrets.token_hex(8),
        model_id=run.model_id or FUZZ_MODEL,
        kind="chat",
        messages=(Turn(role="user", content="Say hello."),),
        max_tokens=max_tokens,
        temperature=0.0,
    )


def _sealed_frame(recorded: _Session, stream_id: int, counter: int, body: bytes) -> bytes:
    sealer = Sealer(recorded.keys.consumer_to_provider, recorded.session_id, stream_id)
    for _ in range(counter):
        sealer.seal(b"")
    return encode_frame(bytes([SEALED]) + sealer.seal(body))


def _clear_frame(msg: Message | dict[str, Any], h: Hostile) -> bytes:
    body = CLEAR_CODEC.encode_body(msg) if isinstance(msg, Message) else h.pack(msg)
    return encode_frame(bytes([CLEAR]) + body)


async def _session_for(run: _Run, att: Attacker) -> _Session:
    """The attacker's recorded session; a fake one if the node will not open one."""
    if att.session is None:
        att.session = await _handshake(run, att)
    if att.session is None:
        keys = SessionKeys(secrets.token_bytes(32), secrets.token_bytes(32))
        att.session = _Session(secrets.token_bytes(32), keys, b"", b"")
    return att.session


async def _infer(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    kind = force or h.pick(_INFER_KINDS, run.allowed("infer"))
    if kind is None:
        return
    recorded = await _session_for(run, att)
    stream_id = recorded.next_stream
    recorded.next_stream += 1
    if kind in ("valid", "ack", "replay"):
        if kind == "replay":
            if recorded.served_stream is None:
                return
            stream_id = recorded.served_stream
        await _infer_exchange(run, att, h, recorded, stream_id, kind)
        return
    opened = InferOpen(session_id=recorded.session_id, stream_id=stream_id)
    request = _infer_request(run, h.rng.randint(1, 4))
    head = _clear_frame(opened, h)
    sealed = _sealed_frame(recorded, stream_id, 0, SEALED_CODEC.encode_body(request))
    what = f"InferOpen(stream {stream_id}) + sealed {_short(request.to_wire(), 200)}"
    if kind == "request":
        wire, what = h.mutate(request.to_wire(), ["infer.chunk", "infer.ack", "infer.done"])
        if h.chance(0.3):
            wire["max_tokens"] = h.rng.choice((2**31, 2**62, -1, 0))
            what = f"max_tokens={wire['max_tokens']}"
        sealed = _sealed_frame(recorded, stream_id, 0, h.pack(wire))
        what = f"sealed Request {what}"
    elif kind == "open":
        wire, what = h.mutate(opened.to_wire(), ["infer.request", "error"])
        if h.chance(0.4):
            wire["stream_id"] = h.rng.choice((-1, 2**32, 2**63 - 1, -(2**63)))
            what = f"stream_id={wire['stream_id']}"
        head = _clear_frame(wire, h)
        what = f"InferOpen {what}"
    elif kind == "flip":
        sealed = h.flip(sealed, start=2)
        what = f"bit flips in the sealed Request of stream {stream_id}"
    elif kind == "clear":
        variant = h.rng.randrange(5)
        if variant == 0:
            sealed = _clear_frame(request.to_wire(), h)
            what = "the Request in the clear"
        elif variant == 1:
            sealed = encode_frame(b"")
            what = "an empty frame"
        elif variant == 2:
            sealed = encode_frame(bytes([h.rng.randrange(2, 256)]) + h.blob())
            what = "an unknown frame kind"
        elif variant == 3:
            sealed = encode_frame(bytes([SEALED]) + h.rng.randbytes(h.rng.randrange(16)))
            what = "a sealed frame shorter than its tag"
        else:
            head = encode_frame(bytes([SEALED]) + h.blob())
            what = "a sealed frame before InferOpen"
    elif kind == "midstream":
        request = _infer_request(run, 10_000)
        sealed = _sealed_frame(recorded, stream_id, 0, SEALED_CODEC.encode_body(request))
        what = "a long request, then a sealed junk frame mid-stream"
    elif kind == "framing":
        what, head = h.framing(CLEAR_CODEC.encode_body(opened), DEFAULT_MAX_FRAME)
        sealed = b""
    else:
        raw = h.garbage()
        head, sealed, what = encode_frame(raw), b"", f"garbage {_short(raw)}"
    stream = await _open(run, att, "infer", infer.PROTOCOL_ID)
    if stream is None:
        return
    try:
        await _send(stream, head + sealed, close=kind != "midstream")
        if kind == "midstream":
            reply, ended = await _drain_first(stream)
            junk = _sealed_frame(recorded, stream_id, 1, h.pack(h.value()))
            await _send(stream, junk)
            more, ended = await _drain(stream, limit=64 * 1024, wait_s=2.0)
            reply += more
            frames = 3 if reply else 0
        else:
            reply, ended = await _drain(stream, limit=64 * 1024, wait_s=REPLY_S)
            # A clear Error first: the node refused the stream after InferOpen
            # (unknown session, rate limit) and never read what followed.
            bodies = _frames(reply)
            refused = bool(bodies) and bodies[0][:1] == bytes([CLEAR])
            frames = 1 if (refused or not sealed) else 2
    finally:
        await _reset(stream)
    if not reply and not ended:
        run.unanswered("infer")
        return
    if not reply and run.banned(att):
        await run.rotate(att)
        return
    run.sent("infer", kind, frames, head + sealed, what)


async def _infer_exchange(
    run: _Run, att: Attacker, h: Hostile, recorded: _Session, stream_id: int, kind: str
) -> None:
    """A real request (``valid``), then a hostile Ack (``ack``), or a reused stream id."""
    machine = InferConsumer(PROMPT_MAX_FRAME, recorded.keys, recorded.session_id, stream_id)
    request = _infer_request(run, h.rng.randint(1, 6))
    data = machine.open(request)
    stream = await _open(run, att, "infer", infer.PROTOCOL_ID)
    if stream is None:
        return
    frames = 0
    text: list[str] = []
    done: Done | Error | None = None
    what = f"InferOpen(stream {stream_id}) + sealed {_short(request.to_wire(), 200)}"
    try:
        with trio.fail_after(REPLY_S * 3):
            await stream.write(data)
            while True:
                event = await next_event(stream, machine)
                frames = max(frames, 2)
                if isinstance(event, Chunk):
                    text.append(event.text)
                    continue
                if isinstance(event, Done | Error):
                    done = event
                break
        if isinstance(done, Done):
            signature = att.sign(done.receipt.signing_bytes())
            if kind == "ack":
                ack_wire, ack_what = h.mutate(Ack(signature=signature).to_wire())
                ack = h.rng.choice(
                    (
                        _sealed_frame(recorded, stream_id, 1, h.pack(ack_wire)),
                        h.flip(machine.ack(signature), start=2),
                        _clear_frame(Ack(signature=signature).to_wire(), h),
                        machine.ack(b"\x00" * 64) * 2,
                    )
                )
                what = f"{what}; then a hostile Ack ({ack_what})"
            else:
                ack = machine.ack(signature)
            await _send(stream, ack)
            await _drain(stream, wait_s=2.0)
            frames = 3
    except (trio.TooSlowError, P2PNodeError, *_QUIET):
        pass
    finally:
        await _reset(stream)
    if frames == 0:
        if run.banned(att):
            await run.rotate(att)
        else:
            run.unanswered("infer")
        return
    run.sent("infer", kind, frames, data, what)
    if isinstance(done, Error) and done.code == 12 and kind != "replay":
        att.session = None  # evicted or never known: open another next time
    if isinstance(done, Done):
        if kind == "replay":
            run.issue(
                "infer-stream-id-reuse",
                "infer",
                kind,
                f"a second request on stream id {stream_id} of one session was served "
                "(the provider sealed two answers under the same nonces)",
            )
        recorded.served_stream = stream_id


# --- offers: signed offers through a real gossipsub -----------------------------

_OFFER_KINDS: Final = {
    "valid": 2,
    "bad_addrs": 3,
    "hostile_numbers": 4,
    "big_lists": 2,
    "unsigned": 1,
    "forged": 2,
    "stale": 1,
    "future": 1,
    "replayed": 1,
    "oversize": 1,
    "mistyped": 4,
    "garbage": 2,
    "flip": 2,
}


def _offer(run: _Run, att: Attacker, h: Hostile, kind: str) -> tuple[bytes, str]:
    """An offer body of the given kind from ``att``, and what it carries."""
    model = run.model_id if (run.model_id and h.chance(0.3)) else FUZZ_MODEL
    base = offers.Offer(
        peer_id=str(att.peer_id),
        addrs=(att.addr,),
        models=(offers.ModelOffer(model_id=model, context_length=2048),),
        slots_free=1,
        queue_len=0,
        seq=att.next_seq(),
        timestamp=time.time(),
    )
    offer = base
    what = kind
    if kind == "bad_addrs":
        offer = replace(
            base, addrs=tuple(h.rng.choice(_JUNK_ADDRS) for _ in range(h.rng.randint(1, 4)))
        )
        what = f"addrs={offer.addrs!r}"
    elif kind == "hostile_numbers":
        m = offers.ModelOffer(
            model_id=model,
            context_length=int(h.rng.choice(_INTS)),
            price_per_s=int(h.rng.choice(_INTS)),
            tokens_per_s=float(h.rng.choice(_FLOATS)),
        )
        offer = replace(
            base,
            models=(m,),
            slots_free=int(h.rng.choice(_INTS)),
            queue_len=int(h.rng.choice(_INTS)),
            timestamp=base.timestamp if h.chance(0.7) else math.nan,
        )
        what = _short(offer.to_wire(), 300)
    elif kind == "big_lists":
        count = h.rng.choice((20, 60, 120))
        models = tuple(offers.ModelOffer(model_id=h.text()[:24]) for _ in range(count))
        offer = replace(base, models=models, addrs=(att.addr,) * h.rng.choice((1, 30)))
        what = f"{len(models)} models, {len(offer.addrs)} addrs"
    elif kind == "forged":
        offer = replace(base, peer_id=str(run.other_peer(att)))
        what = "signed by one peer, naming another"
    elif kind == "stale":
        offer = replace(base, timestamp=base.timestamp - 3600)
    elif kind == "future":
        offer = replace(base, timestamp=base.timestamp + 3600)
    elif kind == "replayed":
        offer = replace(base, seq=1)
    elif kind == "oversize":
        offer = replace(
            base, models=tuple(offers.ModelOffer(model_id="m" * 200) for _ in range(60))
        )
        what = "an offer above the 8 KiB cap"
    if kind == "unsigned":
        return offers.GOSSIP_CODEC.encode_body(offer), "unsigned"
    signed = replace(offer, signature=att.sign(offer.signing_bytes()))
    body = offers.GOSSIP_CODEC.encode_body(signed)
    if kind == "mistyped":
        wire, what = h.mutate(signed.to_wire(), ["status.request"])
        return h.pack(wire), what
    if kind == "garbage":
        raw = h.garbage()
        return raw, f"garbage {_short(raw)}"
    if kind == "flip":
        return h.flip(body), "bit flips of a signed offer"
    return body, what


async def _gossip_ready(run: _Run, att: Attacker) -> bool:
    """Whether ``att``'s pubsub knows the node is on the offers topic (bounded wait)."""
    pubsub = att.pubsub
    if pubsub is None:
        return False
    with trio.move_on_after(10) as scope:
        # py-libp2p signals no event when a peer's subscription arrives.
        while run.peer not in pubsub.peer_topics.get(offers.TOPIC, set()):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return not scope.cancelled_caught


async def _offers(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    kind = force or h.pick(_OFFER_KINDS, run.allowed("offers"))
    pubsub = att.pubsub
    if kind is None or pubsub is None or run.peer not in pubsub.peer_topics.get(offers.TOPIC, ()):
        await trio.sleep(0.05)
        return
    body, what = _offer(run, att, h, kind)
    try:
        await pubsub.publish(offers.TOPIC, body)
    except _QUIET:
        return
    run.sent("offers", kind, 1, body, what)
    # The publisher's queue holds 32 messages per peer and drops the rest
    # (docs/libp2p-traps.md#gossip-drops).
    await trio.sleep(0.01)


# --- gossip: raw gossipsub RPCs ------------------------------------------------------

_GOSSIP_KINDS: Final = {
    "publish": 10,
    "bad_message": 4,
    "subscribe": 3,
    "control": 4,
    "sender_record": 1,
    "unknown_fields": 2,
}
_GOSSIP_ENDINGS: Final = ("garbage", "truncated", "oversize")


def _pubsub_message(att: Attacker, h: Hostile, data: bytes) -> rpc_pb2.Message:
    msg = rpc_pb2.Message(
        data=data, topicIDs=[offers.TOPIC], from_id=att.peer_id.to_bytes(), seqno=h.rng.randbytes(8)
    )
    msg.signature = att.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    return msg


def _rpc(run: _Run, att: Attacker, h: Hostile, kind: str) -> tuple[str, bytes, str]:
    """One RPC of ``kind`` (publish: of an offer kind) as (kind, body, what)."""
    rpc = rpc_pb2.RPC()
    what = kind
    if kind == "publish":
        offer_kind = h.pick(_OFFER_KINDS, lambda k: f"offers/{k}" not in run.skip) or "valid"
        if f"gossip/publish:{offer_kind}" in run.skip:
            offer_kind = "valid"
        body, what = _offer(run, att, h, offer_kind)
        rpc.publish.append(_pubsub_message(att, h, body))
        kind = f"publish:{offer_kind}"
    elif kind == "bad_message":
        body, _ = _offer(run, att, h, "valid")
        msg = _pubsub_message(att, h, body)
        variant = h.rng.randrange(6)
        if variant == 0:
            msg.signature = h.blob()
        elif variant == 1:
            msg.from_id = h.blob()
        elif variant == 2:
            msg.key = h.blob()
        elif variant == 3:
            msg.topicIDs.extend(h.text()[:40] for _ in range(h.rng.choice((5, 200))))
        elif variant == 4:
            msg.seqno = h.blob()
        else:
            del msg.topicIDs[:]
        what = f"message variant {variant}"
        rpc.publish.append(msg)
    elif kind == "subscribe":
        for _ in range(h.rng.choice((1, 10, 150))):
            topic = offers.TOPIC if h.chance(0.1) else h.text()[:64]
            rpc.subscriptions.append(rpc_pb2.RPC.SubOpts(subscribe=h.chance(0.8), topicid=topic))
        what = f"{len(rpc.subscriptions)} subscriptions"
    elif kind == "control":
        topic = offers.TOPIC if h.chance(0.5) else h.text()[:64]
        ids = [h.blob() for _ in range(h.rng.choice((1, 50, 500)))]
        control = rpc.control
        control.ihave.append(rpc_pb2.ControlIHave(topicID=topic, messageIDs=ids))
        control.iwant.append(rpc_pb2.ControlIWant(messageIDs=ids))
        control.graft.append(rpc_pb2.ControlGraft(topicID=topic))
        control.prune.append(
            rpc_pb2.ControlPrune(
                topicID=topic,
                peers=[rpc_pb2.PeerInfo(peerID=h.blob(), signedPeerRecord=h.blob())],
                backoff=h.rng.choice((0, 2**64 - 1, 1)),
            )
        )
        control.idontwant.append(rpc_pb2.ControlIDontWant(messageIDs=ids))
        what = f"IHAVE/IWANT/IDONTWANT of {len(ids)} ids, GRAFT, PRUNE on {topic[:20]!r}"
    elif kind == "sender_record":
        rpc.senderRecord = h.blob()
    if kind == "unknown_fields":
        body = rpc.SerializeToString() + encode_varint(100_000 << 3 | 2) + encode_frame(h.blob())
        return kind, body, "a field number no version knows"
    return kind, rpc.SerializeToString(), what


async def _gossip(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    size = min(run.remaining("gossip"), h.rng.randint(50, 200))
    batch: list[tuple[str, bytes, str]] = []
    for _ in range(max(1, size)):
        kind = force or h.pick(_GOSSIP_KINDS, run.allowed("gossip"))
        if kind is None:
            return
        if kind in _GOSSIP_ENDINGS:
            break
        batch.append(_rpc(run, att, h, kind))
    ending = force if force in _GOSSIP_ENDINGS else None
    endings = [e for e in _GOSSIP_ENDINGS if run.allowed("gossip")(e)]
    if ending is None and force is None and endings and h.chance(1 / 3):
        ending = h.rng.choice(endings)
    frames = [encode_frame(body) for _, body, _ in batch]
    if ending == "garbage":
        raw = h.garbage()
        batch.append(("garbage", raw, f"garbage {_short(raw)}"))
        frames.append(encode_frame(raw))
    elif ending == "truncated":
        body = rpc_pb2.RPC(publish=[_pubsub_message(att, h, b"x")]).SerializeToString()
        batch.append(("truncated", body, "a truncated RPC"))
        frames.append(encode_frame(body)[: h.rng.randrange(1, len(body))])
    elif ending == "oversize":
        batch.append(("oversize", b"", "a length prefix of 64 MiB"))
        frames.append(encode_varint(64 << 20) + b"\x0a")
    stream = await _open(run, att, "gossip", PROTOCOL_ID_V11)
    if stream is None:
        return
    try:
        # The node answers nothing on this stream: frames count once written
        # whole on it (the node reads them in order, and only the last may end it).
        written = await _send(stream, b"".join(frames))
        await _drain(stream, wait_s=0.2)
    finally:
        await _reset(stream)
    if not written:
        return
    for (kind, body, what), frame in zip(batch, frames, strict=True):
        run.sent("gossip", kind, 1, frame if len(frame) < 2048 else body, what)


# --- kad: Kademlia protobufs, pipelined ---------------------------------------------

_KAD_KINDS: Final = {
    "get_providers": 6,
    "find_node": 4,
    "ping": 2,
    "get_value": 2,
    "add_provider": 3,
    "unknown_type": 2,
    "bad_key": 1,
    "put_value": 1,
    "sender_record": 1,
    "garbage": 1,
    "truncated": 1,
    "oversize": 1,
}
# Kinds after which py-libp2p resets the stream: only ever last in a batch.
_KAD_ENDINGS: Final = frozenset(
    {"bad_key", "put_value", "sender_record", "garbage", "truncated", "oversize"}
)
# py-libp2p answers ADD_PROVIDER 10 times per 10 s per peer, then resets the
# stream: one per batch, last, answered or not.
_KAD_LAST: Final = frozenset({"add_provider"})
_KAD_UNANSWERED: Final = frozenset({"unknown_type"})
_KAD = kad_pb.Message.MessageType


def _kad_key(run: _Run, h: Hostile) -> bytes:
    return h.rng.choice(
        (
            dht_key(run.model_id or FUZZ_MODEL),
            dht_key(FUZZ_MODEL),
            RELAY_KEY,
            h.rng.randbytes(32),
            h.rng.randbytes(h.rng.randint(1, 128)),
        )
    )


def _kad(run: _Run, att: Attacker, h: Hostile, kind: str) -> tuple[bytes, str]:
    """One Kademlia frame of ``kind`` and what it carries."""
    msg = kad_pb.Message()
    if kind == "get_providers":
        msg.type, msg.key = _KAD.GET_PROVIDERS, _kad_key(run, h)
    elif kind == "find_node":
        msg.type = _KAD.FIND_NODE
        msg.key = h.rng.choice(
            (run.peer.to_bytes(), att.peer_id.to_bytes(), h.rng.randbytes(h.rng.randint(2, 50)))
        )
    elif kind == "ping":
        msg.type = _KAD.PING
    elif kind == "get_value":
        msg.type, msg.key = _KAD.GET_VALUE, _kad_key(run, h)
    elif kind == "add_provider":
        msg.type, msg.key = _KAD.ADD_PROVIDER, _kad_key(run, h)[:80]
        for _ in range(h.rng.choice((1, 3, 30))):
            peer = msg.providerPeers.add()
            peer.id = att.peer_id.to_bytes() if h.chance(0.6) else h.blob()
            for _ in range(h.rng.choice((0, 1, 5))):
                peer.addrs.append(
                    Multiaddr(att.addr.split("/p2p/")[0]).to_bytes() if h.chance(0.5) else h.blob()
                )
            if h.chance(0.2):
                peer.signedRecord = h.blob()
    elif kind == "unknown_type":
        msg.type = h.rng.choice((6, 7, 99, 2**31 - 1))  # type: ignore[assignment]
        msg.key = h.blob()
    elif kind == "bad_key":
        msg.type = h.rng.choice((_KAD.GET_PROVIDERS, _KAD.ADD_PROVIDER, _KAD.FIND_NODE))
        msg.key = h.rng.choice((b"", h.rng.randbytes(h.rng.choice((129, 1000)))))
    elif kind == "put_value":
        msg.type, msg.key = _KAD.PUT_VALUE, h.blob()
        if h.chance(0.7):
            msg.record.key, msg.record.value = msg.key, h.blob()
            msg.record.author, msg.record.signature = h.blob(), h.blob()
    elif kind == "sender_record":
        msg.type, msg.key = _KAD.GET_PROVIDERS, _kad_key(run, h)
        msg.senderRecord = h.blob() or b"x"
    elif kind == "garbage":
        raw = h.garbage()
        return encode_frame(raw), f"garbage {_short(raw)}"
    elif kind == "truncated":
        body = kad_pb.Message(type=_KAD.GET_PROVIDERS, key=h.rng.randbytes(32)).SerializeToString()
        return encode_frame(body)[: h.rng.randrange(1, len(body))], "a truncated GET_PROVIDERS"
    else:  # oversize: above py-libp2p's 4 MiB cap
        return encode_varint(5 << 20) + b"\x08\x03", "a length prefix of 5 MiB"
    if h.chance(0.1):
        msg.clusterLevelRaw = h.rng.choice((-1, 2**31 - 1))
    return encode_frame(msg.SerializeToString()), _short(str(msg).replace("\n", " "), 300)


async def _batch(
    run: _Run,
    att: Attacker,
    h: Hostile,
    force: str | None,
    *,
    protocol: str,
    protocol_id: str,
    kinds: dict[str, int],
    endings: frozenset[str],
    unanswered: frozenset[str],
    make: Callable[[_Run, Attacker, Hostile, str], tuple[bytes, str]],
    wait_s: float,
    size: tuple[int, int],
    ending_chance: float = 1 / 3,
) -> None:
    """Pipeline a batch of frames on one stream; one that ends it comes last, if any.

    A batch is ``size`` frames of the kinds that keep the stream open, and
    (with ``ending_chance``) one more of a kind that ends it.
    """
    size_n = min(run.remaining(protocol), h.rng.randint(*size))
    allowed = run.allowed(protocol)
    batch: list[tuple[str, bytes, str]] = []
    if force is None or force not in endings:
        for _ in range(size_n if force is None else max(1, size_n)):
            kind = force or h.pick(kinds, lambda k: k not in endings and allowed(k))
            if kind is None:
                break
            batch.append((kind, *make(run, att, h, kind)))
    ending = force if force in endings else None
    if force is None and (h.chance(ending_chance) or not batch):
        ending = h.pick(kinds, lambda k: k in endings and allowed(k))
    if ending is not None:
        batch.append((ending, *make(run, att, h, ending)))
    if not batch:
        return
    stream = await _open(run, att, protocol, protocol_id)
    if stream is None:
        return
    try:
        consumed, _ = await _pipelined(
            stream,
            [(frame, kind not in unanswered, kind in endings) for kind, frame, _ in batch],
            wait_s,
        )
    finally:
        await _reset(stream)
    if consumed == 0:
        run.unanswered(protocol)
    for kind, frame, what in batch[:consumed]:
        run.sent(protocol, kind, 1, frame, what)


async def _kad_attack(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    await _batch(
        run,
        att,
        h,
        force,
        protocol="kad",
        protocol_id=KAD_PROTOCOL_ID,
        kinds=_KAD_KINDS,
        endings=_KAD_ENDINGS | _KAD_LAST,
        unanswered=_KAD_UNANSWERED | _KAD_ENDINGS,
        make=_kad,
        wait_s=10.0,
        size=(40, 200),
    )


# --- relay: circuit v2 HOP (pipelined) and STOP -------------------------------------

_HOP_KINDS: Final = {
    "reserve": 4,
    "status_type": 3,
    "unknown_type": 3,
    "connect": 2,
    "circuit": 1,
    "sender_record": 1,
    "garbage": 1,
    "truncated": 1,
    "oversize": 1,
}
_HOP_ENDINGS: Final = frozenset(
    {"connect", "circuit", "sender_record", "garbage", "truncated", "oversize"}
)
_HOP = circuit_pb2.HopMessage


def _peer_bytes(run: _Run, att: Attacker, h: Hostile) -> bytes:
    return h.rng.choice(
        (att.peer_id.to_bytes(), run.other_peer(att).to_bytes(), h.blob(), run.peer.to_bytes())
    )


def _hop(run: _Run, att: Attacker, h: Hostile, kind: str) -> tuple[bytes, str]:
    msg = _HOP()
    if kind == "reserve":
        msg.type = _HOP.RESERVE
        if h.chance(0.5):
            msg.peer.id = _peer_bytes(run, att, h)
            msg.peer.addrs.extend(h.blob() for _ in range(h.rng.choice((0, 2, 40))))
        if h.chance(0.3):
            msg.limit.duration = h.rng.choice((0, 1, 2**32 - 1))
            msg.limit.data = h.rng.choice((0, 2**64 - 1))
    elif kind in ("connect", "circuit"):
        msg.type = _HOP.CONNECT
        msg.peer.id = (
            run.other_peer(att).to_bytes() if kind == "circuit" else _peer_bytes(run, att, h)
        )
        if h.chance(0.3):
            msg.reservation.expire, msg.reservation.voucher = 2**63 - 1, h.blob()
    elif kind == "status_type":
        msg.type, msg.status = _HOP.STATUS, circuit_pb2.OK
    elif kind == "unknown_type":
        msg.type = h.rng.choice((3, 77, 2**31 - 1))  # type: ignore[assignment]
    elif kind == "sender_record":
        msg.type, msg.senderRecord = _HOP.RESERVE, h.blob() or b"x"
    elif kind == "garbage":
        raw = h.garbage()
        return encode_frame(raw), f"garbage {_short(raw)}"
    elif kind == "truncated":
        body = _HOP(type=_HOP.RESERVE, peer=circuit_pb2.PeerId(id=b"x" * 38)).SerializeToString()
        return encode_frame(body)[: h.rng.randrange(1, len(body))], "a truncated RESERVE"
    else:  # oversize: above py-libp2p's 64 KiB relay message cap
        return encode_varint(1 << 20) + b"\x08\x00", "a length prefix of 1 MiB"
    return encode_frame(msg.SerializeToString()), _short(str(msg).replace("\n", " "), 300)


async def _relay_hop(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    await _batch(
        run,
        att,
        h,
        force,
        protocol="relay_hop",
        protocol_id=HOP_PROTOCOL_ID,
        kinds=_HOP_KINDS,
        endings=_HOP_ENDINGS,
        unanswered=frozenset({"sender_record"}),
        make=_hop,
        wait_s=10.0,
        # py-libp2p's handler reads HOP messages in a loop; p2pnode's (circuit.py)
        # serves one per stream: short batches reach the endings either way.
        size=(0, 2),
        ending_chance=0.4,
    )


_STOP_KINDS: Final = {
    "connect": 4,
    "status_type": 2,
    "unknown_type": 2,
    "garbage": 1,
    "truncated": 1,
    "oversize": 1,
}


async def _relay_stop(run: _Run, att: Attacker, h: Hostile, force: str | None) -> None:
    kind = force or h.pick(_STOP_KINDS, run.allowed("relay_stop"))
    if kind is None:
        return
    msg = circuit_pb2.StopMessage()
    after = b""
    if kind == "connect":
        msg.type = circuit_pb2.StopMessage.CONNECT
        msg.peer.id = _peer_bytes(run, att, h)
        # The node then runs a connection upgrade (Noise) over this stream.
        after = h.rng.choice((b"", h.garbage(), b"\x00\x20" + h.rng.randbytes(32)))
    elif kind == "status_type":
        msg.type, msg.status = circuit_pb2.StopMessage.STATUS, circuit_pb2.OK
    elif kind == "unknown_type":
        msg.type = h.rng.choice((2, 99))  # type: ignore[assignment]
    frame = encode_frame(msg.SerializeToString())
    what = _short(str(msg).replace("\n", " "), 300)
    if kind == "garbage":
        raw = h.garbage()
        frame, what = encode_frame(raw), f"garbage {_short(raw)}"
    elif kind == "truncated":
        frame, what = frame[: max(1, len(frame) - 1)], "a truncated STOP"
    elif kind == "oversize":
        frame, what = encode_varint(1 << 20) + b"\x08\x00", "a length prefix of 1 MiB"
    stream = await _open(run, att, "relay_stop", STOP_PROTOCOL_ID)
    if stream is None:
        return
    try:
        await _send(stream, frame + after)
        reply, ended = await _drain(stream, wait_s=REPLY_S)
    finally:
        await _reset(stream)
    if not reply and not ended:
        run.unanswered("relay_stop")
        return
    run.sent("relay_stop", kind, 1, frame, what)


# --- the attack table ----------------------------------------------------------------

Attack = Callable[[_Run, Attacker, Hostile, str | None], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Pool:
    share: float  # of the frame budget
    workers: int  # attacks in flight at once
    attack: Attack
    kinds: tuple[str, ...]


def _names(*tables: dict[str, int] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for table in tables for name in table)


# Shares lean on the protocols that read many frames per stream: a stream costs
# py-libp2p ~7 ms of CPU on loopback (multistream-select reads byte by byte,
# each read may send a yamux window update), a pipelined frame far less. Every
# protocol still gets thousands of frames in a 100,000-frame run. kad stays
# under py-libp2p's 12 inbound DHT streams, session under the provider's 2
# handshakes per peer; relay HOP waits (py-libp2p sleeps 0.1-0.5 s after
# some answers), so it gets many workers.
POOLS: Final[dict[str, _Pool]] = {
    "status": _Pool(0.03, 6, _status, _names(_UNARY_KINDS)),
    "dialback": _Pool(0.015, 4, _dialback, _names(_UNARY_KINDS)),
    "session": _Pool(0.025, 4, _session, _names(_SESSION_KINDS)),
    "infer": _Pool(0.03, 6, _infer, _names(_INFER_KINDS)),
    "offers": _Pool(0.02, 2, _offers, _names(_OFFER_KINDS)),
    "gossip": _Pool(0.30, 3, _gossip, _names(_GOSSIP_KINDS, _GOSSIP_ENDINGS)),
    "kad": _Pool(0.49, 4, _kad_attack, _names(_KAD_KINDS)),
    "relay_hop": _Pool(0.07, 16, _relay_hop, _names(_HOP_KINDS)),
    "relay_stop": _Pool(0.02, 6, _relay_stop, _names(_STOP_KINDS)),
}


# --- worker processes ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Spec:
    """What a worker process needs to attack (plain, picklable data)."""

    index: int
    addr: str
    model_id: str | None
    attackers: int
    seed: int
    quota: dict[str, int]
    skip: frozenset[str]


def _worker_process(spec: _Spec, results: Connection, control: Connection) -> None:
    """A worker process's entry: attack as ``spec`` says, send the counts back on ``results``.

    Sends ``("progress", frames)`` every half second and ``("done", counts)``
    once; stops early when anything arrives on ``control``.
    """
    # Its import resets its logger: quiet it after (docs/libp2p-traps.md#logger-reset-on-import).
    import libp2p  # noqa: F401

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger("p2pnode").setLevel(logging.CRITICAL)
    trio.run(_worker_main, spec, results, control)


async def _worker_main(spec: _Spec, results: Connection, control: Connection) -> None:
    info = hostlib.parse_peer_addr(spec.addr)
    report = FuzzReport(attackers=spec.attackers, seed=spec.seed)
    hosts: list[Attacker] = []
    run: _Run | None = None
    async with trio.open_nursery() as crew:
        with contextlib.suppress(P2PNodeError):
            hosts = [
                await _start_attacker(crew, gossip=i < min(2, spec.attackers))
                for i in range(spec.attackers)
            ]
            for att in hosts:
                await hostlib.connect(att.host, info, OPEN_S * 2)
            run = _Run(
                node=None,
                peer=info.peer_id,
                addr=spec.addr,
                attackers=hosts,
                crew=crew,
                seed=spec.seed,
                quota=spec.quota,
                skip=spec.skip,
                report=report,
                model_id=spec.model_id,
                rng=random.Random(spec.seed),  # noqa: S311 - reproducible attacks
            )
            for att in hosts:
                att.session = await _handshake(run, att)
                if att.pubsub is not None:
                    await _gossip_ready(run, att)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_told, control, nursery.cancel_scope)
                nursery.start_soon(_tell_progress, results, report, run)
                await _attack(run, 0)
                nursery.cancel_scope.cancel()
        crew.cancel_scope.cancel()
    if run is not None:
        _report_deaths(run, [*run.attackers, *run.fallen])
    await trio.to_thread.run_sync(results.send, ("done", _counts(report, run)))


def _counts(report: FuzzReport, run: _Run | None) -> dict[str, Any]:
    """What a worker process tells the parent (plain data)."""
    return {
        "frames": report.frames,
        "kinds": report.kinds,
        "streams": report.streams,
        "refused": report.refused_streams,
        "unanswered": report.unanswered,
        "harness": report.harness_exceptions,
        "unserved": report.unserved,
        "issues": report.issues,
        "errors": report.errors,
        "recent": list(run.recent) if run else [],
        "last": {p: (x.kind, x.frame, x.what) for p, x in (run.last if run else {}).items()},
        "rotated": report.attackers_rotated,
    }


async def _until_told(control: Connection, scope: trio.CancelScope) -> None:
    # Polls, so cancelling never leaves a thread blocked on the pipe.
    while not await trio.to_thread.run_sync(control.poll, 0.2):
        pass
    scope.cancel()


async def _tell_progress(results: Connection, report: FuzzReport, run: _Run) -> None:
    """Send the counts so far every half second (all of them: a stuck worker is killed)."""
    last, since = -1, trio.current_time()
    while True:
        await trio.sleep(0.5)
        if report.total_frames != last:
            last, since = report.total_frames, trio.current_time()
        elif trio.current_time() - since > STALL_S / 2 and not report.errors:
            report.errors.append(f"worker stalled; here:\n{task_dump()}")
        await trio.to_thread.run_sync(results.send, ("progress", _counts(report, run)))


def _receive(conn: Connection, wait_s: float) -> tuple[str, Any] | None:
    """The next message within ``wait_s`` (None if none came); EOFError if the peer left."""
    if not conn.poll(wait_s):
        return None
    message: tuple[str, Any] = conn.recv()
    return message


async def _remote(run: _Run, spec: _Spec) -> None:
    """Run one worker process and take in its counts, even when cancelled (node dead)."""
    ctx = multiprocessing.get_context("spawn")
    results, results_child = ctx.Pipe(duplex=False)
    control_child, control = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_worker_process,
        args=(spec, results_child, control_child),
        name=f"p2pnode-fuzz-{spec.index}",
        daemon=True,
    )
    process.start()
    results_child.close()
    control_child.close()
    latest: dict[str, Any] = {}
    done = False
    try:
        done = await _collect(run, spec, results, latest)
    finally:
        # Shielded with its own deadline: the counts matter most when the node died.
        with trio.move_on_after(30) as scope:
            scope.shield = True
            if not done:
                with contextlib.suppress(OSError):
                    control.send("stop")
                done = await _collect(run, spec, results, latest)
            await trio.to_thread.run_sync(process.join, 10)
        if process.is_alive():
            process.kill()
        results.close()
        control.close()
        if not done:
            run.report.errors.append(f"worker process {spec.index} did not finish: killed")
            if latest:
                _absorb(run, spec.index, latest)


async def _collect(run: _Run, spec: _Spec, results: Connection, latest: dict[str, Any]) -> bool:
    """Read a worker's messages until its final counts arrive (True) or it is gone (False).

    ``latest`` keeps the last counts it reported, for a worker that never finishes.
    """
    while True:
        try:
            message = await trio.to_thread.run_sync(_receive, results, 0.2)
        except (EOFError, OSError):
            return False
        if message is None:
            continue
        kind, counts = message
        if kind == "progress":
            latest.clear()
            latest.update(counts)
            run.remote[spec.index] = sum(counts["frames"].values())
            continue
        _absorb(run, spec.index, counts)
        return True


def _absorb(run: _Run, index: int, counts: dict[str, Any]) -> None:
    """Add a worker process's counts to this run's report."""
    report = run.report
    run.remote.pop(index, None)
    for name, table in (
        ("frames", report.frames),
        ("streams", report.streams),
        ("refused", report.refused_streams),
        ("unanswered", report.unanswered),
        ("kinds", report.kinds),
        ("harness", report.harness_exceptions),
    ):
        for key, n in counts[name].items():
            table[key] = table.get(key, 0) + n
    report.unserved.extend(p for p in counts["unserved"] if p not in report.unserved)
    report.errors.extend(f"worker {index}: {e}" for e in counts["errors"])
    known = {i.key for i in report.issues}
    report.issues.extend(i for i in counts["issues"] if i.key not in known)
    report.attackers_rotated += counts["rotated"]
    for name in counts["recent"]:
        run.recent.pop(name, None)
        run.recent[name] = None
    for protocol, (kind, frame, what) in counts["last"].items():
        run.last[protocol] = _Sample(kind, frame, what)


# --- watching the node -------------------------------------------------------------


# How long after the fuzzing the fuzzed node has to answer a status request.
AFTER_FUZZ_S = 30.0


async def _status_ok(host: IHost, peer: ID, wait_s: float = 5.0, within_s: float = 0.0) -> bool:
    """Whether ``peer`` answers an honest status request from ``host`` within ``wait_s``,
    asking again (a second apart) until ``within_s`` has passed."""
    deadline = trio.current_time() + within_s
    while True:
        try:
            with trio.fail_after(wait_s):
                stream = await host.new_stream(peer, [TProtocol(status.PROTOCOL_ID)])
                answer = await status_service.request(stream, status.Config(timeout=wait_s))
            return answer.peer_id == str(peer)
        except (trio.TooSlowError, P2PNodeError, *_QUIET):
            if trio.current_time() >= deadline:
                return False
        await trio.sleep(1.0)


class _LogTap(logging.Handler):
    """Counts ERROR records of p2pnode and py-libp2p; keeps each kind's first traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, logging.LogRecord] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = self.signature(record)
        if key not in self.counts and len(self.counts) >= 200:
            key = "(other)"
        self.counts[key] += 1
        self.first.setdefault(key, record)

    @staticmethod
    def signature(record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
            at = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].name}" if where else ""
            return f"{record.name}: {type(exc).__name__}{at}"
        text = record.msg if isinstance(record.msg, str) else repr(record.msg)
        text = re.sub(r"[0-9A-Za-z]{20,}", "<id>", text)
        return f"{record.name}: {re.sub(r'[0-9]+', 'N', text)[:100]}"

    @contextlib.contextmanager
    def attached(self) -> Any:
        loggers = [logging.getLogger("p2pnode"), logging.getLogger("libp2p")]
        for lg in loggers:
            lg.addHandler(self)
        try:
            yield self
        finally:
            for lg in loggers:
                lg.removeHandler(self)


def _bugs(tap: _LogTap) -> list[str]:
    """Signatures of p2pnode's ``logger.exception`` records: p2pnode logs those for its bugs."""
    return [
        key for key, record in tap.first.items() if key.startswith("p2pnode") and record.exc_info
    ]


_PROTOCOL_IDS: Final = {
    status.PROTOCOL_ID: "status",
    dialback.PROTOCOL_ID: "dialback",
    session.PROTOCOL_ID: "session",
    infer.PROTOCOL_ID: "infer",
}


def _bug_protocol(record: logging.LogRecord) -> str:
    args = record.args if isinstance(record.args, tuple) else ()
    for arg in args:
        if isinstance(arg, str) and arg in _PROTOCOL_IDS:
            return _PROTOCOL_IDS[arg]
    text = f"{record.name} {record.getMessage()}"
    if "offer" in text or "discovery" in text:
        return "offers"
    if "relay" in text or "circuit" in text or "hole punch" in text:
        return "relay_hop"
    return "?"


def task_dump(limit: int = 60) -> str:
    """This process's trio tasks and where each waits (the innermost frames), for a stall."""
    lines: list[str] = []
    stack = [(trio.lowlevel.current_root_task(), 0)]
    while stack and len(lines) < limit:
        task, depth = stack.pop()
        frames = []
        coro: Any = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is None:
                break
            frames.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        # Eight frames: the innermost four are trio's own (a lock's park, say);
        # the caller that waits is further out.
        lines.append(f"{'  ' * depth}{task.name[-40:]}: {' > '.join(frames[-8:])}")
        for nursery in task.child_nurseries:
            stack.extend((child, depth + 1) for child in nursery.child_tasks)
    return "\n".join(lines)


def _count_tasks() -> int:
    """trio tasks in this process (the node's handlers among them)."""
    seen = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        seen += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return seen


def _tables(node: Node) -> dict[str, int]:
    """Sizes of the node's tables that peers can grow (read from internals, for diagnosis)."""
    discovery = node.discovery
    probes: dict[str, Callable[[], int]] = {
        "trio_tasks": _count_tasks,
        "peerstore_peers": lambda: len(node.host.get_peerstore().peer_ids()),
        "connected_peers": lambda: len(node.host.get_connected_peers()),
        "offer_book": lambda: len(node.offer_book),
        "provider_sessions": lambda: len(node.provider.sessions) if node.provider else 0,
        "relay_reservations": lambda: len(node.relay.protocol.resource_manager._reservations),
    }
    if discovery is not None:
        probes |= {
            "dht_routing_table": lambda: int(discovery.kademlia.dht.get_routing_table_size()),
            "dht_provider_keys": lambda: len(discovery.kademlia.dht.provider_store.providers),
            "dht_provider_records": lambda: sum(
                len(v) for v in discovery.kademlia.dht.provider_store.providers.values()
            ),
            "pubsub_peers": lambda: len(discovery.pubsub.peers),
            "pubsub_topics": lambda: len(discovery.pubsub.peer_topics),
        }
    out = {}
    for name, probe in probes.items():
        try:
            out[name] = int(probe())
        except Exception:  # noqa: BLE001 - a diagnosis figure; internals differ by version
            out[name] = -1
    return out


def _verdicts(node: Node) -> dict[str, int]:
    return {v.value: n for v, n in node.offer_book.verdicts.items()}


def _offences(node: Node) -> int:
    """Offences the node has recorded against peers (malformed frames among them)."""
    reputation = getattr(node, "reputation", None)
    return int(sum(getattr(reputation, "totals", {}).values()))


# --- the run --------------------------------------------------------------------------


async def fuzz(
    target: Node,
    *,
    attackers: int = 8,
    frames: int = 100_000,
    seed: int = 0,
    died: trio.Event | None = None,
    skip: Collection[str] = (),
    burst: int = 200,
    unresponsive_s: float = 30.0,
    processes: int = 0,
    seconds: float | None = None,
) -> FuzzReport:
    """Fuzz ``target`` with about ``frames`` frames from ``attackers`` hosts; report.

    ``seconds`` bounds the attack itself (the checks after it come on top):
    the report then counts the frames sent until then, and ``cut_short`` says
    so. A caller that cancels :func:`fuzz` instead gets no report at all.

    ``processes`` > 0 runs the attackers in that many worker processes
    (``attackers`` hosts each), so that the node has this process's core to
    itself: on 2 cores, ``processes=1`` about doubles the frame rate. The
    node's side (watching it, the burst, the checks) stays here either way.

    ``target`` must be running (``open_node``; :func:`open_target` records its
    death instead of raising it, and sets ``died``). The budget is split over
    :data:`PROTOCOLS` by :data:`POOLS`' shares; protocols the node does not
    serve are listed in ``unserved``. ``skip`` names ``protocol/kind`` attacks
    not to send (known crashes). ``burst`` streams are held half-sent at once,
    once, at 40% of the budget. A node that dies (nursery cancelled, ``died``
    set, or status unanswered for ``unresponsive_s``) ends the attack at
    once: ``node_exits`` is then 1 and the last frames sent are in
    ``recent_kinds``. Otherwise the node is asked for status and, if it serves
    a model in free mode, for an honest chat (``chat_ok`` is None otherwise).
    Never raises for what the node does; cancelling it stops everything it
    started.
    """
    local = attackers if processes <= 0 else min(2, attackers)
    report = FuzzReport(attackers=local + max(0, processes) * attackers, seed=seed)
    report.engine = ",".join(type(e).__name__ for e in target.offering.engines) or "none"
    models = [m.model_id for e in target.offering.engines for m in e.models()]
    total = sum(p.share for p in POOLS.values())
    quota = {name: max(1, round(frames * p.share / total)) for name, p in POOLS.items()}
    tap = _LogTap()
    started = time.perf_counter()
    addr = _dial_addr(target)
    info = hostlib.parse_peer_addr(addr)
    specs = [
        _Spec(
            index=i,
            addr=addr,
            model_id=models[0] if models else None,
            attackers=attackers,
            seed=seed * 1000 + i + 1,
            quota={p: -(-n // processes) for p, n in quota.items()},
            skip=frozenset(skip),
        )
        for i in range(max(0, processes))
    ]
    with tap.attached():
        async with trio.open_nursery() as crew:
            hosts = [await _start_attacker(crew, gossip=i < min(2, local)) for i in range(local)]
            prober = await _start_attacker(crew, gossip=False)
            for att in [*hosts, prober]:
                await hostlib.connect(att.host, info, OPEN_S * 2)
            run = _Run(
                node=target,
                peer=info.peer_id,
                addr=addr,
                attackers=hosts,
                crew=crew,
                seed=seed,
                quota=quota,
                skip=frozenset(skip),
                report=report,
                model_id=models[0] if models else None,
                rng=random.Random(seed),  # noqa: S311 - reproducible attacks, not secrets
            )
            await _fuzz(
                run,
                prober,
                specs,
                died=died,
                burst=burst,
                unresponsive_s=unresponsive_s,
                seconds=seconds,
            )
            report.seconds = time.perf_counter() - started
            if not report.node_exits:
                await _reproduce_bugs(run, tap)
                # Once the flood stops the node works off what it took in
                # (a hostile run saw one first answer come after 5 s): alive
                # means it answers within AFTER_FUZZ_S.
                report.status_ok = await _status_ok(prober.host, run.peer, within_s=AFTER_FUZZ_S)
                if not report.status_ok:
                    report.errors.append(
                        f"the node did not answer status within {AFTER_FUZZ_S:g} s after fuzzing"
                    )
            crew.cancel_scope.cancel()
    alive = not report.node_exits
    # The honest consumer is a free-mode node: a paid provider would refuse it.
    if alive and run.model_id is not None and target.markets.provider is None:
        report.chat_ok, report.chat_text = await _honest_chat(target, addr, run.model_id)
        if not report.chat_ok:
            report.errors.append(f"no honest chat after fuzzing: {report.chat_text}")
    report.recent_kinds = list(reversed(run.recent))
    report.logged_errors = dict(tap.counts.most_common())
    _report_bugs(run, tap)
    _report_deaths(run, [*run.attackers, *run.fallen, prober])
    for protocol in PROTOCOLS:
        unreached = report.frames[protocol] == 0 and protocol not in report.unserved
        if unreached and alive and not report.cut_short:
            report.errors.append(f"no {protocol} frame reached the node")
    if report.node_exits:
        report.errors.extend(f"node exit: {r.splitlines()[0]}" for r in report.exit_reasons)
    return report


async def _fuzz(
    run: _Run,
    prober: Attacker,
    specs: Sequence[_Spec],
    *,
    died: trio.Event | None,
    burst: int,
    unresponsive_s: float,
    seconds: float | None = None,
) -> None:
    """Measure, attack until the budget or the time is spent or the node dies, measure again."""
    report, target = run.report, run.node
    assert target is not None
    for att in run.attackers:
        att.session = await _handshake(run, att)
        if att.pubsub is not None:
            await _gossip_ready(run, att)
    gc.collect()
    report.rss_before_mb = rss_mb()
    report.tables_before = _tables(target)
    verdicts_before = _verdicts(target)
    offences_before = _offences(target)
    report.rss_samples_mb.append((report.total_frames, report.rss_before_mb))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch, run, prober, died, unresponsive_s, nursery.cancel_scope)
        with trio.move_on_after(math.inf if seconds is None else seconds) as bound:
            await _attack(run, burst, specs)
        report.cut_short = bound.cancelled_caught
        nursery.cancel_scope.cancel()
    if not report.node_exits:
        await trio.sleep(1.0)  # handlers still finishing the last streams
        report.tables_after = _tables(target)
        report.offers_judged = {
            k: n - verdicts_before.get(k, 0) for k, n in _verdicts(target).items()
        }
        report.protocol_errors = _offences(target) - offences_before
    gc.collect()
    report.rss_after_mb = rss_mb()
    report.rss_samples_mb.append((report.total_frames, report.rss_after_mb))


def _report_deaths(run: _Run, attackers: Sequence[Attacker]) -> None:
    """An attacker host that died of what the node sent it: the node can kill its peers."""
    dead = [a for a in attackers if a.death]
    if dead:
        death = dead[0].death or ""
        run.report.issues.append(
            Issue(
                key="peer-death",
                protocol="gossip" if "pubsub" in death else "?",
                kind="reply",
                summary=f"{len(dead)} of the node's peers (attacker hosts) died of what the "
                f"node sent them: {death.strip().splitlines()[-1]}",
                detail=death,
            )
        )


async def _attack(run: _Run, burst: int, specs: Sequence[_Spec] = ()) -> None:
    """Run every pool's workers here, or ``specs``' worker processes; and the burst."""
    workers_done = trio.Event()
    async with trio.open_nursery() as nursery:
        if burst:
            nursery.start_soon(_burst_when_due, run, burst, workers_done)
        async with trio.open_nursery() as workers:
            for spec in specs:
                workers.start_soon(_remote, run, spec)
            for name, pool in POOLS.items():
                for worker in range(pool.workers if not specs else 0):
                    workers.start_soon(_worker, run, name, pool, worker)
        workers_done.set()


async def _worker(run: _Run, protocol: str, pool: _Pool, worker: int) -> None:
    rng = random.Random(f"{run.seed}/{protocol}/{worker}")  # noqa: S311 - reproducible attacks
    h = Hostile(rng)
    idle = 0
    while run.remaining(protocol) > 0:
        if protocol in run.report.unserved:
            return
        for dead in [a for a in run.attackers if a.death is not None]:
            # What the node sent it killed it: carry on with a fresh one.
            with trio.move_on_after(OPEN_S * 3), contextlib.suppress(P2PNodeError, *_QUIET):
                await run.rotate(dead)
        live = [a for a in run.attackers if not a.retired]
        if protocol == "offers":
            live = [a for a in live if a.pubsub is not None]
        if not live:
            return
        att = rng.choice(live)
        before = run.report.frames[protocol]
        await _one(run, pool.attack, att, h, None, protocol)
        idle = 0 if run.report.frames[protocol] > before else idle + 1
        if idle >= STALL_LIMIT:
            if protocol not in run.report.unserved:
                run.report.unserved.append(protocol)
            return
        if idle:
            await trio.sleep(0.05 * idle)


async def _one(
    run: _Run, attack: Attack, att: Attacker, h: Hostile, force: str | None, protocol: str
) -> None:
    """One attack, bounded; the attacker's own failures are counted, never raised."""
    with trio.move_on_after(ATTACK_S):
        try:
            await attack(run, att, h, force)
        except (P2PNodeError, *_QUIET) as exc:
            name = f"{protocol}: {type(exc).__name__}"
            run.report.harness_exceptions[name] = run.report.harness_exceptions.get(name, 0) + 1


async def _burst_when_due(run: _Run, count: int, workers_done: trio.Event) -> None:
    """The burst, once 40% of the budget is spent (never, if the workers finish first)."""
    total = sum(run.quota.values())
    # Sampling: a counter many workers bump has no event of its own.
    while run.progress() < 0.4 * total:  # noqa: ASYNC110
        if workers_done.is_set():
            return
        await trio.sleep(0.2)
    with trio.move_on_after(60):
        await _burst(run, count)
    run.report.rss_samples_mb.append((run.progress(), rss_mb()))


async def _burst(run: _Run, count: int, hold_s: float = 4.0) -> None:
    """Hold ``count`` half-sent streams at once; status must still answer meanwhile.

    Also holds idle Kademlia streams to see whether they lock the DHT out.
    """
    plans = [
        ("status", status.PROTOCOL_ID, status.CODEC.encode(status.StatusRequest())),
        ("session", session.PROTOCOL_ID, session.CODEC.encode(_hello(run)[0])),
        (
            "dialback",
            dialback.PROTOCOL_ID,
            dialback.CODEC.encode(dialback.DialBackRequest(addrs=())),
        ),
        ("infer", infer.PROTOCOL_ID, b"\x05\x00\x81\xa1t"),
    ]
    held: list[tuple[str, INetStream, bytes]] = []
    live = [a for a in run.attackers if not a.retired] or run.attackers

    async def hold(i: int) -> None:
        protocol, protocol_id, frame = plans[i % len(plans)]
        att = live[i % len(live)]
        stream = await _open(run, att, protocol, protocol_id)
        if stream is not None and await _send(
            stream, frame[: max(1, len(frame) // 2)], close=False
        ):
            held.append((protocol, stream, frame))

    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(hold, i)
    status_ok = await _status_ok(live[0].host, run.peer)
    kad_locked = await _kad_lockout(run)
    await trio.sleep(hold_s)
    for protocol, stream, frame in held:
        # The node read the half frame (it sat waiting for the rest).
        run.sent(protocol, "burst", 1, frame, f"half a frame, held with {len(held)} others")
        await _reset(stream)
    if not status_ok:
        run.issue(
            "burst-status",
            "status",
            "burst",
            f"status went unanswered while {len(held)} half-sent streams were held open",
        )
    if kad_locked:
        run.issue(
            "kad-lockout",
            "kad",
            "idle",
            "12 idle DHT streams from one peer take every inbound DHT slot: the node "
            "resets every other peer's DHT query (py-libp2p 0.8.1 reads with no timeout)",
        )


async def _kad_lockout(run: _Run) -> bool:
    """Whether 12 idle DHT streams from one attacker make another's query fail."""
    live = [a for a in run.attackers if not a.retired]
    if len(live) < 2 or "kad" in run.report.unserved:
        return False
    idle: list[INetStream] = []
    try:
        for _ in range(12):
            stream = await _open(run, live[0], "kad", KAD_PROTOCOL_ID)
            if stream is not None:
                await _send(stream, b"\x80", close=False)  # a varint that never ends
                idle.append(stream)
        await trio.sleep(0.5)
        probe = await _open(run, live[1], "kad", KAD_PROTOCOL_ID)
        if probe is None:
            return True
        try:
            query = kad_pb.Message(type=_KAD.PING)
            _, answers = await _pipelined(
                probe, [(encode_frame(query.SerializeToString()), True, False)], 5.0
            )
        finally:
            await _reset(probe)
        return answers == 0
    finally:
        for stream in idle:
            run.sent("kad", "idle", 1, b"\x80", "one byte of a length prefix, then nothing")
            await _reset(stream)


async def _watch(
    run: _Run,
    prober: Attacker,
    died: trio.Event | None,
    unresponsive_s: float,
    attack: trio.CancelScope,
) -> None:
    """Declare the node dead (and stop the attack) on any sign of it.

    Also ends an attack that made no frame for ``STALL_S`` (an unbounded wait
    somewhere): the report then says so, with where this process's tasks wait.
    """
    last_ok = last_log = last_step = trio.current_time()
    last_frames = run.progress()
    reason = ""
    while not reason:
        now = trio.current_time()
        if now - last_log >= 10:
            last_log = now
            logger.info("fuzz: %d frames sent so far", run.progress())
        if run.progress() != last_frames:
            last_frames, last_step = run.progress(), now
        elif now - last_step > STALL_S:
            run.report.errors.append(
                f"the attack stalled: no frame for {STALL_S:g} s; here:\n{task_dump()}"
            )
            attack.cancel()
            return
        if died is not None and died.is_set():
            reason = "an exception escaped open_node"
        elif run.node is not None and not run.node.running:
            reason = "the node's nursery was cancelled (one of its tasks failed)"
        elif await _status_ok(prober.host, run.peer):
            last_ok = trio.current_time()
        elif trio.current_time() - last_ok > unresponsive_s:
            reason = f"status unanswered for {unresponsive_s:g} s"
        if not reason:
            with trio.move_on_after(1.0):
                if died is not None:
                    await died.wait()
                else:
                    await trio.sleep_forever()
    run.report.node_exits = 1
    run.report.exit_reasons.append(reason)
    attack.cancel()


async def _honest_chat(target: Node, addr: str, model_id: str) -> tuple[bool, str]:
    """An honest consumer's chat with ``target``: (whether it was served, the text or why not)."""
    config = NodeConfig(measure_tokens=0, reachability="public", bootstrap=(addr,))
    parts: list[str] = []

    async def deliver(text: str, _tokens: int) -> None:
        parts.append(text)

    request = EngineRequest(
        model_id=model_id,
        kind="chat",
        messages=(ChatMessage(role="user", content="Say hello."),),
        params=Params(max_tokens=8, temperature=0.0),
    )
    try:
        with trio.fail_after(60):
            async with open_node(config, key_pair=create_new_key_pair()) as consumer:
                while consumer.offer_book.get(target.peer_id) is None:
                    with contextlib.suppress(P2PNodeError):
                        await consumer.finder.refresh_offer(target.peer_id)
                    await trio.sleep(0.1)
                outcome = await consumer.generate(request, deliver, only=(target.peer_id,))
    except (trio.TooSlowError, P2PNodeError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    text = "".join(parts)
    ok = outcome.provider == target.peer_id and outcome.completion_tokens > 0 and bool(text)
    return ok, text


async def _reproduce_bugs(run: _Run, tap: _LogTap, budget_s: float = 30.0) -> None:
    """Replay kinds one at a time until each logged bug shows again: its minimal frame."""
    bugs = _bugs(tap)
    if not bugs:
        return
    run.sequential = True
    rng = random.Random(run.seed + 7)  # noqa: S311 - reproducible attacks
    h = Hostile(rng)
    live = [a for a in run.attackers if not a.retired]
    with trio.move_on_after(budget_s):
        for key in bugs:
            protocol = _bug_protocol(tap.first[key])
            candidates = [n for n in reversed(run.recent) if n.startswith(f"{protocol}/")]
            for name in candidates[:12]:
                proto, kind = name.split("/", 1)
                pool = POOLS[proto]
                kind = kind.split(":", 1)[0]
                if kind not in pool.kinds:
                    continue
                before = tap.counts[key]
                for _ in range(15):
                    await _one(run, pool.attack, rng.choice(live), h, kind, proto)
                    await trio.sleep(0.05)
                    if tap.counts[key] > before:
                        record = tap.first[key]
                        run.issue(
                            f"bug:{key}",
                            proto,
                            kind,
                            f"the node logged its own bug: {record.getMessage()}",
                            _format_record(record),
                        )
                        break
                else:
                    continue
                break
    run.sequential = False


def _format_record(record: logging.LogRecord) -> str:
    if record.exc_info and record.exc_info[1] is not None:
        return "".join(traceback.format_exception(record.exc_info[1]))[-4000:]
    return record.getMessage()[:2000]


def _report_bugs(run: _Run, tap: _LogTap) -> None:
    """Every logged bug becomes an issue (reproduced ones already are)."""
    for key in _bugs(tap):
        if any(i.key == f"bug:{key}" for i in run.report.issues):
            continue
        record = tap.first[key]
        protocol = _bug_protocol(record)
        run.issue(
            f"bug:{key}",
            protocol,
            "?",
            f"the node logged its own bug ({tap.counts[key]}x): {record.getMessage()} "
            "(frame: the last one sent on the protocol, not reproduced)",
            _format_record(record),
        )


# --- a target whose death is recorded, and the full run -------------------------------


@dataclass(eq=False)
class Target:
    """A node run for fuzzing: an exception escaping ``open_node`` is recorded in
    ``failure`` (its traceback) and sets ``exited``, instead of propagating."""

    node: Node
    exited: trio.Event
    failure: str | None = None


def target_config() -> NodeConfig:
    """The node :func:`campaign` fuzzes: public, relaying for others, bans off.

    Bans and the dial-back budgets off so that frames reach the parsers (with
    the default ban score a peer is turned away after ~10 malformed frames,
    and :func:`fuzz` then rotates to fresh identities at some cost; the
    dial-back helper answers 6 requests per peer a minute); the relay service
    on so that HOP is served and fuzzed. Every other limit is the default.
    """
    return NodeConfig(
        measure_tokens=0,
        reachability="public",
        relay=relaylib.Config(service=True),
        reputation=reputationlib.Config(ban_score=math.inf),
        dialback=dialback.Config(
            requests_per_peer_per_minute=1_000_000, requests_per_minute=1_000_000, max_concurrent=16
        ),
    )


@asynccontextmanager
async def open_target(
    config: NodeConfig | None = None, engines: Sequence[Engine] | None = None
) -> AsyncIterator[Target]:
    """Run a node to fuzz (default :func:`target_config` and a synthetic engine).

    The node's death does not propagate: see :class:`Target`. Leaving the
    block stops the node.
    """
    served = [SyntheticEngine()] if engines is None else list(engines)
    async with trio.open_nursery() as nursery:
        target: Target = await nursery.start(_serve_target, config or target_config(), served)
        try:
            yield target
        finally:
            nursery.cancel_scope.cancel()


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


async def _serve_target(
    config: NodeConfig,
    engines: Sequence[Engine],
    *,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    exited = trio.Event()
    target: Target | None = None
    try:
        async with open_node(config, key_pair=create_new_key_pair(), engines=engines) as node:
            target = Target(node, exited)
            task_status.started(target)
            await trio.sleep_forever()
    except BaseException as exc:  # the node's death is what this records
        if target is None or _only_cancelled(exc):
            raise
        target.failure = "".join(traceback.format_exception(exc))[-6000:]
    finally:
        exited.set()


# What a crash's traceback names, and the protocols to replay first for it.
_TRIAGE_HINTS: Final = (
    ("discovery", ("offers", "gossip")),
    ("pubsub", ("gossip", "offers")),
    ("kad", ("kad",)),
    ("relay", ("relay_hop", "relay_stop")),
    ("circuit", ("relay_hop", "relay_stop")),
    ("dcutr", ("relay_stop",)),
    ("session", ("session",)),
    ("infer", ("infer",)),
    ("nat", ("dialback",)),
)


async def triage(
    candidates: Sequence[str], failure: str | None, *, seed: int = 0, tries: int = 6
) -> Issue | None:
    """Find which ``protocol/kind`` of ``candidates`` kills a fresh node, sending one at a time.

    Returns the crash as an :class:`Issue` (the killing frame, the traceback),
    or None if no candidate killed the node within ``tries`` attacks each.
    """
    hinted = [p for word, protos in _TRIAGE_HINTS if word in (failure or "") for p in protos]
    order = sorted(
        dict.fromkeys(candidates),
        key=lambda n: hinted.index(n.split("/")[0]) if n.split("/")[0] in hinted else 99,
    )
    async with open_target() as target, trio.open_nursery() as crew:
        found = await _replay_alone(target, crew, order, failure, seed, tries)
        crew.cancel_scope.cancel()
    return found


async def _replay_alone(
    target: Target,
    crew: trio.Nursery,
    order: Sequence[str],
    failure: str | None,
    seed: int,
    tries: int,
) -> Issue | None:
    rng = random.Random(seed)  # noqa: S311 - reproducible attacks
    h = Hostile(rng)
    node = target.node
    att = await _start_attacker(crew, gossip=True)
    other = await _start_attacker(crew, gossip=False)
    addr = _dial_addr(node)
    info = hostlib.parse_peer_addr(addr)
    for a in (att, other):
        await hostlib.connect(a.host, info, OPEN_S * 2)
    models = [m.model_id for e in node.offering.engines for m in e.models()]
    run = _Run(
        node=node,
        peer=info.peer_id,
        addr=addr,
        attackers=[att, other],
        crew=crew,
        seed=seed,
        quota={},
        skip=frozenset(),
        report=FuzzReport(),
        model_id=models[0] if models else None,
        rng=rng,
        sequential=True,
    )
    await _gossip_ready(run, att)
    for name in order:
        protocol, kind = name.split("/", 1)
        pool = POOLS.get(protocol)
        force = kind.split(":", 1)[0]
        if pool is None or force not in pool.kinds:
            continue
        if ":" in kind:
            # One offer kind inside gossip: publish exactly that one.
            offer_kind = kind.split(":", 1)[1]
            run.skip = frozenset(f"offers/{k}" for k in _OFFER_KINDS if k != offer_kind)
        for _ in range(tries):
            await _one(run, pool.attack, att, h, force, protocol)
            with trio.move_on_after(0.2):
                await target.exited.wait()
            if target.exited.is_set() or not node.running:
                with trio.move_on_after(5):
                    await target.exited.wait()
                sample = run.last.get(protocol)
                return Issue(
                    key=f"crash:{name}",
                    protocol=protocol,
                    kind=kind,
                    summary=f"the node died on {name} (replayed alone against a fresh node)",
                    message=sample.what if sample else "",
                    frame_hex=sample.frame.hex() if sample else "",
                    detail=target.failure or failure or "",
                    reproduced=True,
                )
        run.skip = frozenset()
    return None


async def campaign(
    *,
    frames: int = 100_000,
    attackers: int = 8,
    seed: int = 0,
    burst: int = 200,
    restarts: int = 6,
    processes: int = 1,
) -> FuzzReport:
    """The full, reproducible run: :func:`fuzz` a fresh :func:`open_target` node.

    When the node dies, :func:`triage` finds the kind that kills it, the kind
    is skipped, and a fresh node gets the rest of the budget (at most
    ``restarts`` times). The report sums frames and exits over every node;
    memory, tables, status and chat are the last node's. With ``processes``
    worker processes (default 1) the attackers run outside this process, so
    the RSS figures are the node's own and a few hosts' (the prober, the two
    that hold the burst), not the attackers'.
    """
    skip: set[str] = set()
    rounds: list[FuzzReport] = []
    crashes: list[Issue] = []
    started = time.perf_counter()
    while True:
        left = frames - sum(r.total_frames for r in rounds)
        async with open_target() as target:
            report = await fuzz(
                target.node,
                attackers=attackers,
                frames=max(left, 1),
                seed=seed + len(rounds),
                died=target.exited,
                skip=skip,
                burst=burst,
                processes=processes,
            )
            with trio.move_on_after(5):
                if report.node_exits:
                    await target.exited.wait()
            failure = target.failure
        rounds.append(report)
        if not report.node_exits:
            break
        if failure:
            report.exit_reasons[-1] += "\n" + failure
        crash = await triage(report.recent_kinds, failure, seed=seed)
        if crash is None:
            crashes.append(
                Issue(
                    key=f"crash-unreproduced-{len(rounds)}",
                    protocol="?",
                    kind="?",
                    summary="the node died; no single kind replayed alone killed a fresh node",
                    message=", ".join(report.recent_kinds[:20]),
                    detail=failure or report.exit_reasons[-1],
                )
            )
        else:
            crashes.append(crash)
            skip.add(f"{crash.protocol}/{crash.kind}")
            # One offer kind kills through either path: skip it on both.
            if crash.protocol == "offers" or crash.kind.startswith("publish:"):
                offer_kind = crash.kind.split(":", 1)[-1]
                skip |= {f"offers/{offer_kind}", f"gossip/publish:{offer_kind}"}
        if len(rounds) > restarts or sum(r.total_frames for r in rounds) >= frames:
            break
    merged = _merge(rounds, crashes)
    merged.wall_seconds = time.perf_counter() - started
    return merged


def _merge(rounds: Sequence[FuzzReport], crashes: Sequence[Issue]) -> FuzzReport:
    last = rounds[-1]
    merged = replace(
        last,
        frames={p: sum(r.frames[p] for r in rounds) for p in PROTOCOLS},
        streams={p: sum(r.streams[p] for r in rounds) for p in PROTOCOLS},
        refused_streams={p: sum(r.refused_streams[p] for r in rounds) for p in PROTOCOLS},
        unanswered={p: sum(r.unanswered[p] for r in rounds) for p in PROTOCOLS},
        kinds=dict(sum((collections.Counter(r.kinds) for r in rounds), collections.Counter())),
        seconds=sum(r.seconds for r in rounds),
        node_exits=sum(r.node_exits for r in rounds),
        exit_reasons=[e for r in rounds for e in r.exit_reasons],
        logged_errors=dict(
            sum((collections.Counter(r.logged_errors) for r in rounds), collections.Counter())
        ),
        attackers_rotated=sum(r.attackers_rotated for r in rounds),
    )
    issues: dict[str, Issue] = {}
    for issue in [*crashes, *(i for r in rounds for i in r.issues)]:
        issues.setdefault(issue.key, issue)
    merged.issues = list(issues.values())
    merged.errors = [e for r in rounds for e in r.errors]
    return merged


__all__ = [
    "POOLS",
    "PROTOCOLS",
    "Attacker",
    "FuzzReport",
    "Hostile",
    "Issue",
    "Target",
    "fuzz",
    "campaign",
    "open_target",
    "target_config",
    "triage",
]
