"""The marketplace contracts through web3.py's sync API.

Where a node reads and writes them: docs/architecture.md#where-the-chain-is-read-and-written.

Theory of operation. :class:`Chain` is synchronous: every method may block on
the JSON-RPC node (or run py-evm, for the embedded chain), so the node calls
it from a worker thread through :class:`AsyncChain`, one call at a time (one
nonce sequence per account, and eth-tester is not thread-safe). Writes are
signed locally with the caller's account (never an unlocked node account),
simulated first against the pending block (the one they will be mined in, at
its time) so that a write bound to revert is reported and never sent, and
awaited to their receipt. A revert, simulated or mined, becomes a
:class:`ChainError` whose message names the contract's custom error and its
arguments; a wallet short of ether or tokens, an :class:`Unfunded` naming both
balances; a node that does not answer, one short line naming its URL.

Chain time. The contracts' clock is the time of the block a transaction lands
in. On a chain that mines on demand (anvil's default) or rarely, the latest
block can be minutes old while the next one will carry the wall clock's time;
on a dev chain whose clock was moved forward, both are ahead of the wall
clock. :meth:`Chain.next_block_time` (the pending block's time) is what a
deadline must be measured against, never :meth:`Chain.now`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import TransactionFailed
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from eth_utils.exceptions import ValidationError as EthValidationError
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    Web3Exception,
    Web3RPCError,
)
from web3.logs import DISCARD

from p2pnode.chain.failures import (
    Reasons,
    Unfunded,
    revert_data,
    rpc_message,
    rpc_text,
    unreachable,
)
from p2pnode.chain.units import format_amount
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
# anvil's chain id, which `p2pnode devchain` keeps: its wallets are funded with
# `p2pnode devchain --fund ADDRESS`.
ANVIL_CHAIN_ID = 31337

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


@dataclass(frozen=True, slots=True)
class MarketEvents:
    """What the marketplace's events say changed over a range of blocks."""

    closed: tuple[bytes, ...] = ()  # sessions closed (claimed, or closed by anyone)
    # Providers (checksummed) that posted or re-priced a bid, registered or left:
    # their live bids may have changed.
    bidders: frozenset[str] = frozenset()
    withdrawn: frozenset[bytes] = frozenset()  # bids deleted (the event names no provider)


class Chain:
    """The token and marketplace contracts on one chain (blocking calls)."""

    def __init__(self, w3: Web3, deployment: Deployment) -> None:
        self.w3 = w3
        self.deployment = deployment
        # What messages call the node: the URL web3 talks to (``--chain`` may
        # override the deployment file's).
        self.url: str = str(
            getattr(w3.provider, "endpoint_uri", None) or deployment.rpc_url or "the embedded chain"
        )
        self.token: Contract = w3.eth.contract(
            address=to_checksum_address(deployment.token), abi=artifact("ComputeToken")["abi"]
        )
        self.market: Contract = w3.eth.contract(
            address=to_checksum_address(deployment.marketplace), abi=artifact("Marketplace")["abi"]
        )
        self._reasons = Reasons(artifact("Marketplace")["abi"] + artifact("ComputeToken")["abi"])
        # topic -> event name, for the events follow() reads (see events_since).
        self._followed = _event_topics(artifact("Marketplace")["abi"], _FOLLOWED_EVENTS)
        self._decimals: int | None = None
        self._lock = threading.Lock()

    # --- reading ---------------------------------------------------------------

    def now(self) -> int:
        """The latest block's timestamp: the contracts' clock when that block was mined.

        It stands still while no block is mined: for a deadline, see
        :meth:`next_block_time`.
        """
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def next_block_time(self) -> int:
        """The time the next block will carry: what a transaction sent now meets as
        ``block.timestamp``, and what approvals, ends and claim windows are measured by.

        The pending block's timestamp: anvil, geth and eth-tester build it at the
        time it would be mined (anvil: the wall clock plus any offset the chain's
        clock was moved by), however long ago the latest block was mined. Never
        before the latest block's: a node that keeps no pending block (or serves
        the latest as pending) answers with that. Two RPC calls.
        """
        latest = self.now()
        try:
            pending = int(self.w3.eth.get_block("pending")["timestamp"])
        except Exception:  # noqa: BLE001 - any odd pending block: the latest's time stands
            return latest
        return max(latest, pending)

    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

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

    def events_since(self, from_block: int, max_blocks: int = 5_000) -> tuple[MarketEvents, int]:
        """What changed from ``from_block`` on, and the next block to ask.

        One ``eth_getLogs`` for every session and bid at once: how a provider
        learns that a consumer closed early, and that its bids were posted,
        re-priced or deleted while it runs. At most ``max_blocks`` blocks a
        call: RPC nodes refuse wide ranges, and after an outage the gap is
        caught up in steps.
        """
        latest = int(self.w3.eth.block_number)
        if latest < from_block:
            return MarketEvents(), from_block
        span = max_blocks
        while True:
            last = min(latest, from_block + span - 1)
            try:
                logs = self.w3.eth.get_logs(
                    {
                        "address": self.market.address,
                        "fromBlock": from_block,
                        "toBlock": last,
                        "topics": [["0x" + topic for topic in self._followed]],  # any one
                    }
                )
                break
            except (Web3Exception, ValueError, OSError):
                # RPC nodes cap a call's logs (or its range): anyone can fill a
                # range with events for gas alone. Halve it rather than fail on
                # the same range for ever.
                if last == from_block:
                    raise
                span = max(1, (last - from_block + 1) // 2)
        closed: list[bytes] = []
        bidders: set[str] = set()
        withdrawn: set[bytes] = set()
        for log in logs:
            # Everything needed is an indexed topic: no ABI decoding of what
            # may be thousands of other providers' events.
            topics = [bytes(t) for t in log["topics"]]
            name = self._followed.get(topics[0].hex()) if topics else None
            if name is None or len(topics) < (3 if name == "BidPosted" else 2):
                continue
            if name == "SessionClosed":
                closed.append(topics[1])
            elif name == "BidDeleted":
                withdrawn.add(topics[1])
            else:  # ProviderRegistered/Deregistered: topic 1; BidPosted: topic 2
                provider = topics[2] if name == "BidPosted" else topics[1]
                bidders.add(to_checksum_address(provider[-20:]))
        return MarketEvents(tuple(closed), frozenset(bidders), frozenset(withdrawn)), last + 1

    # --- approvals -------------------------------------------------------------

    def sign_approval(
        self, provider: LocalAccount, bid_id: bytes, consumer: str, expiry: int, nonce: bytes
    ) -> bytes:
        """The provider's EIP-712 approval of one session (checked by ``openSession``)."""
        signed = Account.sign_typed_data(
            provider.key,
            domain_data=self.domain(),
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

    def domain(self) -> dict[str, Any]:
        """The EIP-712 domain of this deployment's Marketplace."""
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
            domain_data=self.domain(),
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
            domain_data=self.domain(),
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
        """Simulate, sign, send and await ``call`` (a contract function call).

        The simulation runs against the pending block, so at the time the
        transaction will be mined at, not the latest block's: after an idle
        spell the two differ by minutes, and an approval's expiry or a
        session's end may lie between them. A call bound to revert raises
        here, unsent (no gas spent). One that reverts all the same once mined
        (the chain moved on between the two) is replayed at its block to name
        the reason. Raises :class:`Unfunded` if the wallet lacks ether for gas
        or the tokens the call moves, :class:`ChainError` otherwise.
        """
        with self._lock:
            simulated = {"from": account.address}
            try:
                params: dict[str, Any] = {
                    "from": account.address,
                    "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
                    "chainId": self.deployment.chain_id,
                }
                if self.deployment.rpc_url is None:
                    # py-evm estimates gas by a binary search (~13 executions,
                    # 2/3 of an open's time): one call shows a revert, and the
                    # embedded chain's gas costs nothing.
                    call.call(simulated, block_identifier="pending")
                    params["gas"] = EMBEDDED_GAS_LIMIT
                else:
                    # Mined a second or more after the pending block's time,
                    # closeSession may pay the provider too (one more transfer
                    # than estimated): a margin, or it runs out of gas (seen on
                    # anvil). Only the gas used is paid for.
                    estimate = int(call.estimate_gas(simulated, block_identifier="pending"))
                    params["gas"] = estimate * 5 // 4 + GAS_MARGIN
                tx = call.build_transaction(params)
                signed = account.sign_transaction(tx)
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
                receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
            except (ContractCustomError, ContractLogicError, TransactionFailed) as exc:
                # TransactionFailed: the embedded chain's way of reverting
                raise self._reverted(account, what, exc) from exc
            except Web3RPCError as exc:  # the node refused it (funds, nonce, fees)
                raise self._refused(account, what, exc) from exc
            except EthValidationError as exc:  # the embedded chain's refusals
                raise self._refused(account, what, exc) from exc
            except Web3Exception as exc:
                raise ChainError(f"{what}: {exc}") from exc
            except OSError as exc:  # requests' connection errors and timeouts
                raise ChainError(f"{what}: {unreachable(self.url, exc)}") from exc
            except ValueError as exc:  # JSON-RPC errors of older web3 versions
                raise self._refused(account, what, exc) from exc
            if receipt["status"] != 1:
                raise self._mined_revert(account, call, params["gas"], receipt, what)
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
        if not unlimited and self.balance(account.address) < amount:
            raise self.unfunded(account.address, "approve", tokens_needed=amount)
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

    def unfunded(self, address: str, what: str, *, tokens_needed: int | None = None) -> Unfunded:
        """The error for a wallet that cannot pay: its balances, read now, and how to fund it.

        ``tokens_needed``: the tokens the call moves (None: it lacked ether for gas).
        """
        try:
            ether: int | None = self.eth_balance(address)
            tokens: int | None = self.balance(address)
            decimals = self._token_decimals()
        except (Web3Exception, OSError, ValueError):
            ether = tokens = None
            decimals = 18
        if ether is None or tokens is None:
            has = f"wallet {address} cannot pay (its balances could not be read)"
        else:
            has = (
                f"wallet {address} has {format_amount(ether)} ether and "
                f"{format_amount(tokens, decimals=decimals)} tokens"
            )
        lacks = []
        if tokens_needed is None or not ether:
            lacks.append("ether for gas")
        if tokens_needed is not None:
            lacks.append(f"{format_amount(tokens_needed, decimals=decimals)} tokens")
        needs = " and ".join(lacks)
        if self.deployment.chain_id == ANVIL_CHAIN_ID:
            how = f"fund it (p2pnode devchain --fund {address})"
        else:
            how = f"send it {needs} on chain {self.deployment.chain_id}"
        return Unfunded(
            f"{what}: {has}, needs {needs}: {how}",
            address=address,
            ether=ether,
            tokens=tokens,
        )

    def _token_decimals(self) -> int:
        if self._decimals is None:
            self._decimals = int(self.token.functions.decimals().call())
        return self._decimals

    def _reverted(self, account: LocalAccount, what: str, exc: Exception) -> ChainError:
        """The error for a revert: the contract's reason; a wallet short of tokens (the
        token's ``ERC20InsufficientBalance`` for ``account``) as :class:`Unfunded`."""
        data = revert_data(exc)
        decoded = self._reasons.decode(data)
        if decoded is not None and decoded[0] == "ERC20InsufficientBalance" and decoded[1]:
            args = decoded[1]
            if str(args["sender"]).lower() == account.address.lower():
                return self.unfunded(account.address, what, tokens_needed=int(args["needed"]))
        return ChainError(f"{what}: {self.revert_reason(exc)}")

    def revert_reason(self, exc: BaseException) -> str:
        """``Name(arg=value, ...)`` of the contracts' custom error a revert carries (a
        web3 ``ContractLogicError`` or eth-tester ``TransactionFailed``), else its text."""
        return self._reasons.reason(revert_data(exc), exc)

    def _refused(self, account: LocalAccount, what: str, exc: Exception) -> ChainError:
        """The error for a transaction the node refused (a JSON-RPC error answer)."""
        message = rpc_message(exc)
        text = message.lower()
        # geth, anvil: "insufficient funds for gas * price + value"; py-evm:
        # "cannot afford txn gas", "does not have enough balance".
        if any(s in text for s in ("insufficient funds", "cannot afford", "enough balance")):
            return self.unfunded(account.address, what)
        return ChainError(f"{what}: {message}")

    def _mined_revert(
        self, account: LocalAccount, call: Any, gas: int, receipt: Any, what: str
    ) -> ChainError:
        """The error for a transaction mined reverted: its reason, replayed at its block.

        ``eth_call`` at the receipt's block runs on that block's state and
        time; the reverted transaction changed nothing there (but its nonce
        and gas), so the call meets the condition it met, unless a later
        transaction of the same block changed it.
        """
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        block, used = int(receipt["blockNumber"]), int(receipt["gasUsed"])
        spent = f"reverted in transaction {tx_hash}, block {block}, {used} gas spent"
        try:
            call.call({"from": account.address, "gas": gas}, block_identifier=block)
        except (ContractCustomError, ContractLogicError, TransactionFailed) as exc:
            reason = str(self._reverted(account, what, exc))
        except (Web3Exception, OSError, ValueError) as exc:
            reason = f"{what}: {rpc_message(exc)}"
        else:
            reason = f"{what}: " + ("out of gas" if used >= gas else "reason not replayable")
        return ChainError(f"{reason} ({spent})")


# The Marketplace events a provider follows (ProviderMarket.follow).
_FOLLOWED_EVENTS = (
    "SessionClosed",
    "BidPosted",
    "BidDeleted",
    "ProviderRegistered",
    "ProviderDeregistered",
)


def _event_topics(abi: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, str]:
    """topic 0 (hex, no prefix) -> name, for the events ``names`` of ``abi``."""
    topics = {}
    for item in abi:
        if item.get("type") == "event" and item["name"] in names:
            types = ",".join(i["type"] for i in item["inputs"])
            topics[keccak(text=f"{item['name']}({types})").hex()] = item["name"]
    return topics


def _sha_hex(sha: bytes) -> str | None:
    return sha.hex() if any(sha) else None


def deploy(
    w3: Web3,
    deployer: LocalAccount,
    min_provider_stake: int,
    rpc_url: str | None,
    *,
    token: str | None = None,
    told: Callable[[str], None] = lambda _note: None,
) -> Chain:
    """Deploy the marketplace, priced and paid in ``token`` (an ERC-20 on that chain),
    or in a dev token deployed first, which the deployer owns and can mint.

    ``told`` hears each contract once its receipt is in (``p2pnode deploy``'s
    progress). Raises ChainError if a deployment fails, or if ``token`` is not
    an ERC-20 contract there.
    """
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
        address = str(receipt["contractAddress"])
        told(f"{name} at {address} (block {receipt['blockNumber']}, gas {receipt['gasUsed']})")
        return address

    if token is None:
        token = create("ComputeToken", deployer.address)
    else:
        token, symbol = _erc20(w3, token)
        told(f"token {token}: an ERC-20 ({symbol})")
    market = create("Marketplace", token, min_provider_stake)
    return Chain(
        w3, Deployment(chain_id=chain_id, token=token, marketplace=market, rpc_url=rpc_url)
    )


def _erc20(w3: Web3, address: str) -> tuple[str, str]:
    """``address`` checksummed, and its symbol, once it answers as an ERC-20 would."""
    try:
        checked = to_checksum_address(address)
    except ValueError as exc:
        raise ConfigError(f"not an address: {address!r}") from exc
    if not w3.eth.get_code(checked):
        raise ChainError(f"no contract at {checked} on this chain")
    erc20 = w3.eth.contract(address=checked, abi=artifact("ComputeToken")["abi"])
    try:
        erc20.functions.totalSupply().call()
        erc20.functions.balanceOf(checked).call()
        decimals = int(erc20.functions.decimals().call())
    except (Web3Exception, ValueError) as exc:
        raise ChainError(f"{checked} does not answer as an ERC-20: {rpc_message(exc)}") from exc
    if decimals != 18:
        # Every amount p2pnode reads or shows (stakes, prices, limits) is in
        # 18-decimal units (chain/units.py): another token would be off by powers of ten.
        raise ConfigError(f"{checked} has {decimals} decimals; p2pnode prices in 18-decimal tokens")
    try:
        symbol = str(erc20.functions.symbol().call())
    except (Web3Exception, ValueError):
        symbol = "no symbol"  # optional in ERC-20
    return str(checked), symbol


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
        except (ContractLogicError, TransactionFailed) as exc:  # a read that reverted
            what = getattr(fn, "__name__", "chain call")
            raise ChainError(f"{what}: {self.sync.revert_reason(exc)}") from exc
        except OSError as exc:  # requests' connection errors and timeouts
            raise ChainError(unreachable(self.sync.url, exc)) from exc
        except _CHAIN_FAILURES as exc:
            raise ChainError(f"chain unavailable: {rpc_text(exc)}") from exc
        except Exception as exc:
            # A chain answer our code could not handle: most likely a node
            # that lies or a library we do not know well enough, possibly
            # our bug. Loud, but it stays a failed chain call.
            logger.exception("unexpected failure of a chain call %s", getattr(fn, "__name__", fn))
            raise ChainError(f"chain call failed: {type(exc).__name__}") from exc

    # Typed calls (each is :meth:`run` of the Chain method of the same name).

    async def now(self) -> int:
        return await self.run(self.sync.now)

    async def next_block_time(self) -> int:
        return await self.run(self.sync.next_block_time)

    async def block_number(self) -> int:
        return await self.run(self.sync.block_number)

    async def claim_window(self) -> int:
        return await self.run(self.sync.claim_window)

    async def balance(self, address: str) -> int:
        return await self.run(self.sync.balance, address)

    async def eth_balance(self, address: str) -> int:
        return await self.run(self.sync.eth_balance, address)

    async def bid(self, bid_id: bytes) -> OnChainBid:
        return await self.run(self.sync.bid, bid_id)

    async def live_bid(self, provider: str, model_id: str) -> bytes | None:
        return await self.run(self.sync.live_bid, provider, model_id)

    async def session(self, session_id: bytes) -> OnChainSession:
        return await self.run(self.sync.session, session_id)

    async def events_since(self, from_block: int) -> tuple[MarketEvents, int]:
        return await self.run(self.sync.events_since, from_block)

    async def unfunded(
        self, address: str, what: str, *, tokens_needed: int | None = None
    ) -> Unfunded:
        return await self.run(
            partial(self.sync.unfunded, tokens_needed=tokens_needed), address, what
        )

    async def approve_token(
        self, account: LocalAccount, amount: int, *, unlimited: bool = False
    ) -> Tx | None:
        return await self.run(
            partial(self.sync.approve_token, unlimited=unlimited), account, amount
        )

    async def open_session(
        self,
        account: LocalAccount,
        bid_id: bytes,
        stake: int,
        max_price_per_s: int,
        expiry: int,
        nonce: bytes,
        approval: bytes,
    ) -> Tx:
        return await self.run(
            self.sync.open_session, account, bid_id, stake, max_price_per_s, expiry, nonce, approval
        )

    async def claim_session(
        self, account: LocalAccount, session_id: bytes, used_until: int, signature: bytes
    ) -> Tx:
        return await self.run(self.sync.claim_session, account, session_id, used_until, signature)

    async def close_session(self, account: LocalAccount, session_id: bytes) -> Tx:
        return await self.run(self.sync.close_session, account, session_id)


# requests' errors are OSErrors; web3 raises its own family, and JSON-RPC
# error answers arrive as ValueError (web3 7+) or its subclasses.
_CHAIN_FAILURES = (OSError, TimeoutError, ValueError, Web3Exception, TransactionFailed)


__all__ = [
    "ANVIL_CHAIN_ID",
    "CLAIM_WINDOW_S",
    "AsyncChain",
    "Chain",
    "Deployment",
    "MarketEvents",
    "OnChainBid",
    "OnChainSession",
    "Tx",
    "Unfunded",
    "deploy",
    "model_key",
    "send_ether",
    "unreachable",
]
