"""What the chain's failures mean, in one line a person can act on.

The boundary between web3 (and requests, urllib3, eth-tester under it) and
p2pnode's :class:`ChainError`: a revert's custom error decoded with its
arguments (:class:`Reasons`), a JSON-RPC error answer reduced to the node's
own message (:func:`rpc_message`), a node that does not answer reduced to
``no chain answers at URL (connection refused)`` (:func:`unreachable`), and
a wallet that cannot pay (:class:`Unfunded`, built by
``Chain.unfunded``, which reads the balances).
"""

from __future__ import annotations

import ast
import contextlib
import socket
from typing import Any
from urllib.parse import urlsplit

import requests
from eth_abi.abi import decode as abi_decode
from eth_utils.crypto import keccak

from p2pnode.errors import ChainError


class Unfunded(ChainError):
    """A wallet lacks the ether (for gas) or the tokens a transaction needs.

    The message names the wallet, both balances and how to fund it;
    ``ether`` and ``tokens`` are the balances read when it failed, in the
    smallest units (None: they could not be read).
    """

    def __init__(
        self, message: str, *, address: str, ether: int | None, tokens: int | None
    ) -> None:
        super().__init__(message)
        self.address = address
        self.ether = ether
        self.tokens = tokens


class Reasons:
    """The custom errors of some contracts (from their ABIs), by selector."""

    def __init__(self, abi: list[dict[str, Any]]) -> None:
        self._errors: dict[str, tuple[str, list[str], list[str]]] = {}
        for item in abi:
            if item.get("type") != "error":
                continue
            types = [i["type"] for i in item["inputs"]]
            selector = keccak(text=f"{item['name']}({','.join(types)})")[:4].hex()
            self._errors[selector] = (item["name"], [i["name"] for i in item["inputs"]], types)

    def decode(self, data: str | None) -> tuple[str, dict[str, Any] | None] | None:
        """(name, arguments) of the custom error in revert ``data`` (hex); None: not one
        of ours; arguments None: not decodable."""
        if not data or not data.startswith("0x") or len(data) < 10:
            return None
        known = self._errors.get(data[2:10])
        if known is None:
            return None
        name, names, types = known
        try:
            values = abi_decode(types, bytes.fromhex(data[10:]))
        except Exception:  # noqa: BLE001 - eth_abi raises several kinds
            return name, None
        return name, dict(zip(names, values, strict=True))

    def reason(self, data: str | None, exc: BaseException) -> str:
        """``Name(arg=value, ...)`` of the custom error in ``data``, else ``exc``'s text."""
        decoded = self.decode(data)
        if decoded is None:
            return str(getattr(exc, "message", None) or exc)
        name, args = decoded
        if args is None:
            return f"{name} (undecodable arguments)"
        return f"{name}({', '.join(f'{n}={_show(v)}' for n, v in args.items())})"


def revert_data(exc: BaseException) -> str | None:
    """The revert bytes (hex) a web3 or eth-tester revert carries."""
    data = getattr(exc, "data", None)
    return data if isinstance(data, str) else _tester_revert_data(exc)


def _tester_revert_data(exc: BaseException) -> str | None:
    """The revert bytes eth-tester carried (web3 re-raises them as text)."""
    seen: BaseException | None = exc
    while seen is not None:
        first = seen.args[0] if seen.args else None
        if isinstance(first, str) and first[:2] in ("b'", 'b"'):
            with contextlib.suppress(ValueError, SyntaxError):
                first = ast.literal_eval(first)  # eth_call's reverts arrive as a bytes repr
        if isinstance(first, bytes):
            return "0x" + first.hex()
        seen = seen.__context__
    return None


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


def rpc_message(exc: BaseException) -> str:
    """The node's own message in a JSON-RPC error answer (web3 8 keeps the answer;
    older versions put the error dict in ``args``), else the exception's text."""
    response = getattr(exc, "rpc_response", None)
    if isinstance(response, dict) and isinstance(response.get("error"), dict):
        return str(response["error"].get("message", response["error"]))
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, dict) and "message" in arg:
        return str(arg["message"])
    return str(arg)


def rpc_text(exc: BaseException) -> str:
    """A short, single-line account of a chain failure."""
    text = rpc_message(exc) if isinstance(exc, ValueError) else str(exc)
    text = " ".join(text.split())
    return text[:200] or type(exc).__name__


def unreachable(url: str, exc: BaseException) -> str:
    """One line for a chain node that did not answer: ``no chain answers at URL (why)``,
    why being what the socket said (connection refused, timed out, unknown host), not
    the account urllib3 and requests wrap around it."""
    return f"no chain answers at {public_url(url)} ({_network_reason(exc)})"


def public_url(url: str) -> str:
    """``scheme://host[:port]`` of an RPC URL: hosted RPC URLs carry their API key in
    the path, the query or a ``user:password@`` part, and messages reach logs and
    the shim's error bodies."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "the chain's RPC URL"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _network_reason(exc: BaseException) -> str:
    # requests wraps urllib3's MaxRetryError, whose .reason wraps the socket's
    # error as __cause__ (urllib3 2): look through all of them for the first
    # that says what happened.
    fallback: str | None = None
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "unknown host"
        if isinstance(e, TimeoutError | requests.Timeout):
            return "timed out"
        if isinstance(e, requests.HTTPError) and e.response is not None:
            return f"HTTP {e.response.status_code}"
        if isinstance(e, OSError) and e.strerror and fallback is None:
            fallback = e.strerror.lower()
        todo.extend(a for a in e.args if isinstance(a, BaseException))
        todo.extend(
            x
            for x in (getattr(e, "reason", None), e.__cause__, e.__context__)
            if isinstance(x, BaseException)
        )
    return fallback or type(exc).__name__
