"""The local control path: a Unix socket that ``p2pnode offers`` and ``p2pnode peers`` use.

A Unix socket in the node's home directory (mode 0600, in a 0700 directory)
reaches only processes of the same user on the same machine, and adds no
network surface: the OpenAI shim stays the only HTTP endpoint
(docs/architecture.md#the-openai-shim). One JSON request line in, one JSON
answer line out, then the connection closes. Requests: ``{"op": "offers",
"model": <id or null>}``, ``{"op": "peers"}``, ``{"op": "status"}``, and
``{"op": "dashboard"}`` (a new login link, when the shim runs). Errors come back as
``{"error": "..."}``. The client is ``p2p/control_client.py`` (blocking, so
that the commands asking start without trio).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost

from p2pnode.errors import ConfigError
from p2pnode.p2p import relay as relaylib
from p2pnode.p2p.audit import Record as AuditRecord
from p2pnode.p2p.reputation import Reputation, Standing
from p2pnode.protocols import offers
from p2pnode.protocols.status import StatusResponse

# trio.TaskStatus exists, but the trio-stubs that py-libp2p pulls in (trio-typing)
# predate it and shadow trio's own types for mypy.
TaskStatus = Any


logger = logging.getLogger(__name__)

# A request is one short JSON line; anything longer is not ours.
MAX_REQUEST = 4096
# A local client that sends nothing for this long is gone.
REQUEST_TIMEOUT_S = 5.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


async def serve(
    path: Path, handle: Handler, *, task_status: TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the control socket at ``path`` until cancelled; removes it on exit.

    Raises :class:`ConfigError` if another live node already serves that path.
    """
    sock = await _bind(path)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_answer, stream, handle)
    finally:
        listener.socket.close()
        # Shielded: we get here by cancellation, and the file must still go.
        with trio.CancelScope(shield=True), contextlib.suppress(OSError):
            await trio.Path(path).unlink()


async def _bind(path: Path) -> trio.socket.SocketType:
    if await trio.Path(path).exists():
        if await _is_live(path):
            raise ConfigError(f"another node is running with this home ({path} answers)")
        await trio.Path(path).unlink()  # left behind by a node that did not stop cleanly
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: no window where others could connect
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create control socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(16)
    return sock


async def _is_live(path: Path) -> bool:
    try:
        stream = await trio.open_unix_socket(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ConfigError(f"cannot check control socket {path}: {exc.strerror}") from exc
    await stream.aclose()
    return True


async def _answer(stream: trio.SocketStream, handle: Handler) -> None:
    async with stream:
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                request = json.loads(await _read_line(stream))
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            answer = handle(request)
        except (ValueError, trio.TooSlowError) as exc:
            answer = {"error": f"bad request: {exc}"}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(answer).encode() + b"\n")


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


class Answers:
    """Answers to the control requests, from what the node holds right now.

    ``status()`` is the node's own status answer; ``paid`` whether this node
    pays for sessions (an offer without a bid is then unpayable here, not
    free).
    """

    def __init__(
        self,
        host: IHost,
        book: offers.OfferBook,
        reputation: Reputation,
        status: Callable[[], StatusResponse],
        *,
        paid: bool,
        audits: Callable[[str], AuditRecord | None] = lambda _peer: None,
        audit_summary: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self._host = host
        self._book = book
        self._reputation = reputation
        self._audits = audits
        self._audit_summary = audit_summary
        self._status = status
        self._paid = paid
        # Ops of the parts around the node (the shim's dashboard links), by name.
        self.more: dict[str, Handler] = {}

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if isinstance(op, str) and op in self.more:
            return self.more[op](request)
        if op == "offers":
            model = request.get("model")
            if model is not None and not isinstance(model, str):
                return {"error": "model must be a string"}
            return self._offers(model)
        if op == "peers":
            return self._peers()
        if op == "status":
            answer = self._status().to_wire()
            del answer["offer"]  # JSON carries no bytes; the signed offer is for remote askers
            # Ours alone (a remote asker gets none): what our audits found.
            answer["audits"] = self._audit_summary()
            return answer
        return {"error": f"unknown op {op!r}"}

    def _offers(self, model: str | None) -> dict[str, Any]:
        now, clock = time.time(), trio.current_time()
        return {
            "offers": [
                describe_offer(
                    o,
                    now,
                    self._reputation.standing(o.peer_id, clock),
                    self._audits(o.peer_id),
                )
                for o in self._book.offers(model)
            ],
            "paid": self._paid,
        }

    def _peers(self) -> dict[str, Any]:
        peerstore = self._host.get_peerstore()
        return {
            "peers": [
                {
                    "peer_id": str(p),
                    "addrs": [str(a) for a in peerstore.addrs(p)],
                    "connections": [
                        "relayed" if relaylib.is_relayed(c) else "direct"
                        for c in relaylib.connections(self._host, p)
                    ],
                }
                for p in self._host.get_connected_peers()
            ]
        }


def describe_offer(
    offer: offers.Offer,
    now: float,
    standing: Standing | None = None,
    audits: AuditRecord | None = None,
) -> dict[str, Any]:
    """An Offer as JSON for people and scripts (age instead of raw timestamps).

    ``standing``: what this node remembers of the provider's behaviour
    (its misbehaviour score, offences by kind, requests served); ``audits``:
    what audits of its answers found (docs/architecture.md#audits).
    """
    return {
        "audits": {
            "audits": audits.audits if audits else 0,
            "passed": audits.passed if audits else 0,
            "caught": audits.caught if audits else "",
        },
        "score": standing.score if standing else 0.0,
        "banned": standing.banned if standing else False,
        "offences": standing.offences if standing else {},
        "served": standing.served if standing else 0,
        "peer_id": offer.peer_id,
        "addrs": list(offer.addrs),
        "wallet": offer.wallet,
        "models": [
            {
                "model_id": m.model_id,
                "gguf_sha256": m.gguf_sha256,
                "context_length": m.context_length,
                "price_per_s": m.price_per_s,
                "bid_id": m.bid_id,
                "tokens_per_s": m.tokens_per_s,
            }
            for m in offer.models
        ],
        "slots_free": offer.slots_free,
        "queue_len": offer.queue_len,
        "seq": offer.seq,
        "age_s": round(max(0.0, now - offer.timestamp), 1),
    }
