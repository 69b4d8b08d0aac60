"""The client side of the control socket (``p2p/control.py`` serves it): blocking, no trio.

``p2pnode status``, ``offers`` and ``peers`` ask one question and print the
answer; importing trio alone would cost them ~0.15 s of a 0.3 s start-up
budget (README, "Benchmarks": ``bench cli``), and a blocking socket with a
deadline does the same job.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from p2pnode.errors import NetworkError

# Bound on a client's whole exchange with the node (a live node answers in ~1 ms).
CLIENT_TIMEOUT_S = 10.0


def ask(
    path: Path, request: dict[str, Any], *, bound_s: float = CLIENT_TIMEOUT_S
) -> dict[str, Any]:
    """Send one request to the node whose control socket is ``path``; return its answer.

    Blocks at most ``bound_s`` in all. Raises :class:`NetworkError` if no node
    answers there, it answers too slowly, or it refuses (``{"error": ...}``).
    """
    deadline = time.monotonic() + bound_s
    data = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(bound_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError as exc:
        raise NetworkError(f"no node is running with this home (no {path})") from exc
    except ConnectionRefusedError as exc:
        raise NetworkError(
            f"no node is running with this home ({path} is left from one that did not stop)"
        ) from exc
    except TimeoutError as exc:
        raise NetworkError(f"the node at {path} did not answer") from exc
    except OSError as exc:
        raise NetworkError(f"cannot reach the node at {path}: {exc.strerror}") from exc
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise NetworkError("the node sent a malformed answer") from exc
    if not isinstance(answer, dict):
        raise NetworkError("the node sent a malformed answer")
    if "error" in answer:
        raise NetworkError(f"the node refused: {answer['error']}")
    return answer


__all__ = ["CLIENT_TIMEOUT_S", "ask"]
