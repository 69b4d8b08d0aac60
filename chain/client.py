"""The marketplace contracts through web3.py's sync API (ARCHITECTURE §7).

Theory of operation. :class:`Chain` is synchronous: every method may block on
the JSON-RPC node (or run py-evm, for the embedded chain), so the node calls
it from a worker thread through :class:`AsyncChain`, one call at a time (one
nonce sequence per account, and eth-tester is not thread-safe). Writes are
signed locally with the caller's account (never an unlocked node account),
estimated first so that a revert is reported before anything is sent, and
awaited to their receipt. A revert becomes a :class:`ChainError` whose message
names the contract's custom error and its arguments.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from eth_abi.abi import decode as abi_decode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError, Web3Exception
from web3.logs import DISCARD

from p2pnode.contracts import artifact
from p2pnode.errors import ChainError, ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

DOMAIN_NAME = "p2pnode Marketplace"
EMBEDDED_GAS_LIMIT = 2_000_000
GAS_MARGIN = 30_000
DOMAIN_VERSION = "1"
# Marketplace.CLAIM_WINDOW: after a session's end its provider has this long to
# claim it; from then on anyone closes it, paying 0 (see the contract).
CLAIM_WINDOW_S = 15 * 60

_USAGE_TYPES = {
    "Usage": [
        {"name": "sessionId", "type": "bytes32"},
        {"name": "usedUntil", "type": "uint64"},
    ]
}


def model_key(model_id: str) -> bytes:
    """The bytes32 a model id is registered under: keccak256 of its UTF-8 name."""
    return keccak(text=model_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    """Where the contracts are: what ``--deployment FILE`` holds."""

    chain_id: int
    token: str
    marketplace: str
    rpc_url: str | None = None  # None: the embedded chain

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Deployment:
        try:
            data = json.loads(path.read_text())
            return cls(
                chain_id=int(data["chain_id"]),
                token=to_checksum_address(data["token"]),
                marketplace=to_checksum_address(data["marketplace"]),
                rpc_url=data.get("rpc_url"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a deployment file: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Tx:
    """A mined transaction: its hash, gas and what it produced (the receipt, or a value
    read from its events)."""

    tx_hash: str
    gas_used: int
    value: Any = None


@dataclass(frozen=True, slots=True)
class OnChainSession:
    session_id: bytes
    consumer: str
    provider: str
    bid_id: bytes
    price_per_s: int
    stake: int
    opened_at: int
    ends_at: int
    open: bool


@dataclass(frozen=True, slots=True)
class OnChainBid:
    bid_id: bytes
    provider: str
    model: bytes
    price_per_s: int
    live: bool  # may open sessions: not withdrawn, and its provider's registration is current
    gguf_sha256: str | None = None  # hex; the file its provider declared (None: no claim)


class Chain:
    """The token and marketplace contracts on one chain (blocking calls)."""

    def __init__(self, w3: Web3, deployment: Deployment) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.token: Contract = w3.eth.contract(
            address=to_checksum_address(deployment.token), abi=artifact("ComputeToken")["abi"]
        )
        self.market: Contract = w3.eth.contract(
            address=to_checksum_address(deployment.marketplace), abi=artifact("Marketplace")["abi"]
        )
        self._errors = _error_table(
            artifact("Marketplace")["abi"] + artifact("ComputeToken")["abi"]
        )
        self._lock = threading.Lock()

    # --- reading ---------------------------------------------------------------

    def now(self) -> int:
        """The latest block's timestamp (the contracts' clock)."""
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def balance(self, address: str) -> int:
        return int(self.token.functions.balanceOf(to_checksum_address(address)).call())

    def eth_balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(to_checksum_address(address)))

    def min_provider_stake(self) -> int:
        return int(self.market.functions.minProviderStake().call())

    def provider(self, address: str) -> tuple[str, int, int, bool]:
        """(peer id, stake, open sessions, registered)."""
        p = self.market.functions.getProvider(to_checksum_address(address)).call()
        return str(p[0]), int(p[1]), int(p[2]), bool(p[3])

    def bid(self, bid_id: bytes) -> OnChainBid:
        provider, model, gguf, price, _registration, live = self.market.functions.getBid(
            bid_id
        ).call()
        return OnChainBid(
            bid_id, str(provider), bytes(model), int(price), bool(live), _sha_hex(bytes(gguf))
        )

    def max_session_seconds(self) -> int:
        """The longest session one stake may buy (a longer one reverts SessionTooLong)."""
        return int(self.market.functions.MAX_SESSION_SECONDS().call())

    def live_bid(self, provider: str, model_id: str) -> bytes | None:
        """The provider's live bid for the model (None: none, or its registration ended)."""
        bid_id = bytes(
            self.market.functions.liveBid(to_checksum_address(provider), model_key(model_id)).call()
        )
        return None if bid_id == bytes(32) else bid_id

    def session(self, session_id: bytes) -> OnChainSession:
        s = self.market.functions.getSession(session_id).call()
        return OnChainSession(
            session_id, str(s[0]), str(s[1]), bytes(s[2]), int(s[3]), int(s[4]), int(s[5]),
            int(s[6]), bool(s[7]),
        )  # fmt: skip

    def totals(self) -> tuple[int, int, int]:
        """(escrowed, paid, refunded) over the contract's life."""
        f = self.market.functions
        return (
            int(f.totalEscrowed().call()),
            int(f.totalPaid().call()),
            int(f.totalRefunded().call()),
        )

    def session_id_of(self, bid_id: bytes, consumer: str, nonce: bytes) -> bytes:
        return bytes(
            self.market.functions.sessionIdOf(bid_id, to_checksum_address(consumer), nonce).call()
        )

    def sessions_of(self, address: str, from_block: int = 0) -> list[bytes]:
        """Ids of sessions ``address`` opened or serves, oldest first (from events)."""
        who = to_checksum_address(address)
        found: list[bytes] = []
        for args in ({"consumer": who}, {"provider": who}):
            logs = self.market.events.SessionOpened().get_logs(
                from_block=from_block, argument_filters=args
            )
            found.extend(bytes(log["args"]["sessionId"]) for log in logs)
        return list(dict.fromkeys(found))

    def closed_since(self, from_block: int, max_blocks: int = 5_000) -> tuple[list[bytes], int]:
        """Ids of sessions closed from ``from_block`` on, and the next block to ask.

        One ``eth_getLogs`` for every session at once: how a provider learns
        that a consumer closed early. At most ``max_blocks`` blocks a call:
        RPC nodes refuse wide ranges, and after an outage the gap is caught
        up in steps.
        """
        latest = int(self.w3.eth.block_number)
        if latest < from_block:
            return [], from_block
        last = min(latest, from_block + max_blocks - 1)
        logs = self.market.events.SessionClosed().get_logs(from_block=from_block, to_block=last)
        return [bytes(log["args"]["sessionId"]) for log in logs], last + 1

    # --- approvals -------------------------------------------------------------

    def sign_approval(
        self, provider: LocalAccount, bid_id: bytes, consumer: str, expiry: int, nonce: bytes
    ) -> bytes:
        """The provider's EIP-712 approval of one session (checked by ``openSession``)."""
        signed = Account.sign_typed_data(
            provider.key,
            domain_data=self._domain(),
            message_types={
                "Approval": [
                    {"name": "bidId", "type": "bytes32"},
                    {"name": "consumer", "type": "address"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "expiry", "type": "uint64"},
                    {"name": "nonce", "type": "bytes32"},
                ]
            },
            message_data={
                "bidId": bid_id,
                "consumer": to_checksum_address(consumer),
                "chainId": self.deployment.chain_id,
                "expiry": expiry,
                "nonce": nonce,
            },
        )
        return bytes(signed.signature)

    def _domain(self) -> dict[str, Any]:
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.deployment.chain_id,
            "verifyingContract": self.market.address,
        }

    def sign_usage(self, consumer: LocalAccount, session_id: bytes, used_until: int) -> bytes:
        """The consumer's EIP-712 acknowledgement that it used the session until
        ``used_until`` (chain time): what ``claimSession`` pays the provider by.

        Local: no RPC (the consumer signs one with every answer's Ack)."""
        signed = Account.sign_typed_data(
            consumer.key,
            domain_data=self._domain(),
            message_types=_USAGE_TYPES,
            message_data={"sessionId": session_id, "usedUntil": used_until},
        )
        return bytes(signed.signature)

    def usage_signer(self, session_id: bytes, used_until: int, signature: bytes) -> str | None:
        """The wallet that signed this acknowledgement (None: not a signature at all).

        Local: no RPC. The same digest as the contract's ``usageDigest``."""
        if not 0 <= used_until < 2**64 or len(session_id) != 32:
            return None
        message = encode_typed_data(
            domain_data=self._domain(),
            message_types=_USAGE_TYPES,
            message_data={"sessionId": session_id, "usedUntil": used_until},
        )
        try:
            return str(Account.recover_message(message, signature=signature))
        except Exception:  # noqa: BLE001 - eth-account raises several kinds on bad input
            return None

    def usage_digest(self, session_id: bytes, used_until: int) -> bytes:
        """The contract's own ``usageDigest`` (an RPC read; tests compare the local one)."""
        return bytes(self.market.functions.usageDigest(session_id, used_until).call())

    def claim_window(self) -> int:
        """The contract's ``CLAIM_WINDOW`` in seconds (an RPC read)."""
        return int(self.market.functions.CLAIM_WINDOW().call())

    # --- writing ---------------------------------------------------------------

    def transact(self, account: LocalAccount, call: Any, what: str) -> Tx:
        """Estimate, sign, send and await ``call`` (a contract function call)."""
        with self._lock:
            params: dict[str, Any] = {
                "from": account.address,
                "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
                "chainId": self.deployment.chain_id,
            }
            try:
                if self.deployment.rpc_url is None:
                    # py-evm estimates gas by a binary search (~13 executions,
                    # 2/3 of an open's time): one call shows a revert, and the
                    # embedded chain's gas costs nothing.
                    call.call({"from": account.address})
                    params["gas"] = EMBEDDED_GAS_LIMIT
                else:
                    # The estimate runs at the last block's time; mined later,
                    # closeSession may pay the provider too (one more transfer
                    # than estimated): a margin, or it runs out of gas (seen on
                    # anvil). Only the gas used is paid for.
                    estimate = int(call.estimate_gas({"from": account.address}))
                    params["gas"] = estimate * 5 // 4 + GAS_MARGIN
                tx = call.build_transaction(params)
                signed = account.sign_transaction(tx)
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
                receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
            except (ContractCustomError, ContractLogicError) as exc:
                data = exc.data if isinstance(exc.data, str) else _tester_revert_data(exc)
                raise ChainError(f"{what}: {self._revert_reason(data, exc)}") from exc
            except TransactionFailed as exc:  # the embedded chain's way of reverting
                data = _tester_revert_data(exc)
                raise ChainError(f"{what}: {self._revert_reason(data, exc)}") from exc
            except Web3Exception as exc:
                raise ChainError(f"{what}: {exc}") from exc
            except (
                ValueError
            ) as exc:  # JSON-RPC errors (insufficient funds, nonce) arrive as ValueError
                raise ChainError(f"{what}: {_rpc_message(exc)}") from exc
            if receipt["status"] != 1:
                raise ChainError(f"{what}: reverted in transaction {tx_hash.hex()}")
            return Tx("0x" + bytes(tx_hash).hex(), int(receipt["gasUsed"]), receipt)

    def approve_token(
        self, account: LocalAccount, amount: int, *, unlimited: bool = False
    ) -> Tx | None:
        """Allow the marketplace to take ``amount`` (skipped if the allowance suffices).

        ``unlimited``: allow any amount, once, so that opening a session is one
        transaction, not two. Safe with this contract: it only ever pulls tokens
        from ``msg.sender``, so it moves nothing the account did not itself ask for.
        """
        allowance = self.token.functions.allowance(account.address, self.market.address).call()
        if int(allowance) >= amount:
            return None
        # A one-off approval is for a payment about to be made: say early that
        # the balance cannot cover it. An unlimited one (at a consumer's start)
        # pays nothing yet, so a balance below the spend limit is no reason to stop.
        if not unlimited and (balance := self.balance(account.address)) < amount:
            raise ChainError(f"insufficient token balance: {balance} < {amount}")
        allow = 2**256 - 1 if unlimited else amount
        return self.transact(
            account, self.token.functions.approve(self.market.address, allow), "approve"
        )

    def register_provider(self, account: LocalAccount, peer_id: str, stake: int) -> Tx:
        self.approve_token(account, stake)
        call = self.market.functions.registerProvider(peer_id, stake)
        return self.transact(account, call, "register provider")

    def update_provider(self, account: LocalAccount, peer_id: str, add_stake: int = 0) -> Tx:
        if add_stake:
            self.approve_token(account, add_stake)
        call = self.market.functions.updateProvider(peer_id, add_stake)
        return self.transact(account, call, "update provider")

    def deregister_provider(self, account: LocalAccount) -> Tx:
        return self.transact(
            account, self.market.functions.deregisterProvider(), "deregister provider"
        )

    def register_model(self, account: LocalAccount, model_id: str, gguf_sha256: str | None) -> Tx:
        """Name the model if nobody has yet, and declare the GGUF file (sha256, hex; None:
        no claim) that ``account`` serves it from. Its bids posted from now on carry it.

        Anyone may, for any name, any number of times: the name gives no rights, and
        a declaration is ``account``'s alone (see the Marketplace contract)."""
        sha = bytes.fromhex(gguf_sha256) if gguf_sha256 else bytes(32)
        call = self.market.functions.registerModel(model_id, sha)
        return self.transact(account, call, "register model")

    def model_registered(self, model_id: str) -> bool:
        """Whether anyone has named the model on chain (bids for it may be posted)."""
        _name, registered_by = self.market.functions.getModel(model_key(model_id)).call()
        return int(registered_by, 16) != 0

    def declared_gguf(self, provider: str, model_id: str) -> str | None:
        """The sha256 (hex) of the GGUF file ``provider`` declared for the model (None: none)."""
        sha = self.market.functions.ggufOf(to_checksum_address(provider), model_key(model_id))
        return _sha_hex(bytes(sha.call()))

    def post_bid(self, account: LocalAccount, model_id: str, price_per_s: int) -> Tx:
        """Post or re-price; ``Tx.value`` is the bid id.

        The bid carries the GGUF file ``account`` declared for the model (``register_model``);
        a declaration changed since the live bid was posted makes a new bid id."""
        call = self.market.functions.postBid(model_key(model_id), price_per_s)
        tx = self.transact(account, call, "post bid")
        (event,) = self.market.events.BidPosted().process_receipt(tx.value, errors=DISCARD)
        return Tx(tx.tx_hash, tx.gas_used, bytes(event["args"]["bidId"]))

    def delete_bid(self, account: LocalAccount, bid_id: bytes) -> Tx:
        return self.transact(account, self.market.functions.deleteBid(bid_id), "delete bid")

    def open_session(
        self,
        account: LocalAccount,
        bid_id: bytes,
        stake: int,
        max_price_per_s: int,
        expiry: int,
        nonce: bytes,
        approval: bytes,
    ) -> Tx:
        """Open a session (approving the stake first if needed).

        ``Tx.value`` is (session id, the chain time it ends).
        """
        self.approve_token(account, stake)
        call = self.market.functions.openSession(
            bid_id, stake, max_price_per_s, expiry, nonce, approval
        )
        tx = self.transact(account, call, "open session")
        (event,) = self.market.events.SessionOpened().process_receipt(tx.value, errors=DISCARD)
        args = event["args"]
        return Tx(tx.tx_hash, tx.gas_used, (bytes(args["sessionId"]), int(args["endsAt"])))

    def close_session(self, account: LocalAccount, session_id: bytes) -> Tx:
        """Settle a session without an acknowledgement; ``Tx.value`` is (paid, refunded).

        Its consumer, before its end: the provider is paid for the elapsed seconds.
        Anyone, from ``CLAIM_WINDOW_S`` after its end: the provider did not claim it
        and is paid 0. Otherwise it reverts (``ProviderMustClaim``, ``NotClosableYet``).
        """
        call = self.market.functions.closeSession(session_id)
        return self._settled(self.transact(account, call, "close session"))

    def claim_session(
        self, account: LocalAccount, session_id: bytes, used_until: int, signature: bytes
    ) -> Tx:
        """The provider settles a session with the consumer's acknowledgement (``used_until``
        and its ``sign_usage`` signature; 0 and b"" for none, which pays 0).

        Paid price x (min(used_until, end, now) - opened); ``Tx.value`` is (paid, refunded).
        """
        call = self.market.functions.claimSession(session_id, used_until, signature)
        return self._settled(self.transact(account, call, "claim session"))

    def _settled(self, tx: Tx) -> Tx:
        (event,) = self.market.events.SessionClosed().process_receipt(tx.value, errors=DISCARD)
        paid, refunded = int(event["args"]["paid"]), int(event["args"]["refunded"])
        return Tx(tx.tx_hash, tx.gas_used, (paid, refunded))

    def mint(self, owner: LocalAccount, to: str, amount: int) -> Tx:
        return self.transact(
            owner, self.token.functions.mint(to_checksum_address(to), amount), "mint"
        )

    # --- errors ----------------------------------------------------------------

    def _revert_reason(self, data: str | None, exc: Exception) -> str:
        """``Name(arg=value, ...)`` of the contract's custom error in ``data``."""
        if data and data.startswith("0x") and len(data) >= 10:
            decoded = self._errors.get(data[2:10])
            if decoded is not None:
                name, names, types = decoded
                try:
                    values = abi_decode(types, bytes.fromhex(data[10:]))
                except Exception:  # noqa: BLE001 - eth_abi raises several kinds
                    return f"{name} (undecodable arguments)"
                args = ", ".join(f"{n}={_show(v)}" for n, v in zip(names, values, strict=True))
                return f"{name}({args})"
        return str(getattr(exc, "message", None) or exc)


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


def _error_table(abi: list[dict[str, Any]]) -> dict[str, tuple[str, list[str], list[str]]]:
    table = {}
    for item in abi:
        if item.get("type") != "error":
            continue
        types = [i["type"] for i in item["inputs"]]
        selector = keccak(text=f"{item['name']}({','.join(types)})")[:4].hex()
        table[selector] = (item["name"], [i["name"] for i in item["inputs"]], types)
    return table


def _sha_hex(sha: bytes) -> str | None:
    return sha.hex() if any(sha) else None


def _show(value: Any) -> str:
    return "0x" + value.hex() if isinstance(value, bytes) else str(value)


def _rpc_message(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    if isinstance(arg, dict) and "message" in arg:
        return str(arg["message"])
    return str(arg)


def deploy(w3: Web3, deployer: LocalAccount, min_provider_stake: int, rpc_url: str | None) -> Chain:
    """Deploy the token and the marketplace; the deployer owns the token (dev chains)."""
    chain_id = int(w3.eth.chain_id)

    def create(name: str, *args: Any) -> str:
        data = artifact(name)
        factory = w3.eth.contract(abi=data["abi"], bytecode=data["bytecode"])
        tx = factory.constructor(*args).build_transaction(
            {
                "from": deployer.address,
                "nonce": w3.eth.get_transaction_count(deployer.address, "pending"),
                "chainId": chain_id,
            }
        )
        tx_hash = w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction)
        receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise ChainError(f"deploying {name} failed")
        return str(receipt["contractAddress"])

    token = create("ComputeToken", deployer.address)
    market = create("Marketplace", token, min_provider_stake)
    return Chain(
        w3, Deployment(chain_id=chain_id, token=token, marketplace=market, rpc_url=rpc_url)
    )


def send_ether(w3: Web3, sender: LocalAccount, to: str, amount: int) -> None:
    """Send ether (for gas) from ``sender``."""
    tx: dict[str, Any] = {
        "from": sender.address,
        "to": to_checksum_address(to),
        "value": amount,
        "nonce": w3.eth.get_transaction_count(sender.address, "pending"),
        "chainId": int(w3.eth.chain_id),
        "gas": 21_000,
        "gasPrice": int(w3.eth.gas_price),
    }
    tx_hash = w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
    w3.eth.wait_for_transaction_receipt(tx_hash, timeout=60)


class AsyncChain:
    """:class:`Chain` for trio code: each call runs in a worker thread, one at a time."""

    def __init__(self, chain: Chain) -> None:
        self.sync = chain
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a method of ``self.sync``) in a worker thread.

        The boundary with the chain: whatever the RPC node, the network or
        the libraries under web3 raise arrives here as :class:`ChainError`
        (a dropped connection, a timeout, a malformed answer), so that one
        blip costs the call that met it, never the task that made it.
        """
        try:
            return await trio.to_thread.run_sync(partial(fn, *args), limiter=self._limiter)
        except ChainError:
            raise
        except _CHAIN_FAILURES as exc:
            raise ChainError(f"chain unavailable: {_rpc_text(exc)}") from exc
        except Exception as exc:
            # A chain answer our code could not handle: most likely a node
            # that lies or a library we do not know well enough, possibly
            # our bug. Loud, but it stays a failed chain call.
            logger.exception("unexpected failure of a chain call %s", getattr(fn, "__name__", fn))
            raise ChainError(f"chain call failed: {type(exc).__name__}") from exc


# requests' errors are OSErrors; web3 raises its own family, and JSON-RPC
# error answers arrive as ValueError (web3 7+) or its subclasses.
_CHAIN_FAILURES = (OSError, TimeoutError, ValueError, Web3Exception, TransactionFailed)


def _rpc_text(exc: BaseException) -> str:
    """A short, single-line account of a chain failure."""
    text = _rpc_message(exc) if isinstance(exc, ValueError) else str(exc)
    text = " ".join(text.split())
    return text[:200] or type(exc).__name__
