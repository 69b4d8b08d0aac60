// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title Marketplace: providers, models, bids priced per second, escrowed sessions.
/// @notice A provider registers with a minimum stake and its libp2p peer ID (never
///         an address on the internet), posts one live bid per model, and approves
///         each session off chain with an EIP-712 signature. The consumer opens the
///         session with that approval, moving its stake into escrow. Nobody is paid
///         for nothing: the provider is paid only for time the consumer acknowledged
///         (an EIP-712 `Usage` signature, sent with each answer's acknowledgement),
///         or for the time the consumer itself chose to end early. Settling a session
///         pays the provider and refunds the rest in one transaction:
///           - the consumer closes it before its end (closeSession): the provider is
///             paid price x elapsed seconds, as the consumer ended it early;
///           - the provider claims it (claimSession), any time until CLAIM_WINDOW
///             after its end, with the consumer's latest acknowledgement: paid
///             price x (min(usedUntil, endsAt, now) - openedAt); with none, 0;
///           - nobody settled it by then: anyone closes it (closeSession), paying 0,
///             so no stake is ever stranded, and a provider that took a stake and
///             served nothing (so holds no acknowledgement) gets nothing for it.
///         Invariant: escrowed = paid + refunded + the stakes of open sessions.
///
///         Models. A model's id is keccak256 of its name, computed here (never taken
///         from the caller), and the name is all the registry holds about it: naming
///         a model gives no rights over it. Which GGUF file serves a model is each
///         provider's own declaration, and each bid carries its provider's. So
///         nobody can squat a popular name, or poison it with a wrong sha256 for
///         everyone: a wrong declaration stays in its declarer's bids, which
///         consumers can check against the file a provider's offer names. (Keying
///         models by (name, sha256) would stop the poisoning too, but would split
///         one model into an entry per file, while nodes look bids up by name.)
///
///         Registrations. A bid belongs to its provider's registration: leaving
///         kills every bid of the provider for good, at no cost per bid, and
///         registering again starts with none.
contract Marketplace is EIP712, ReentrancyGuard {
    using SafeERC20 for IERC20;
    using SafeCast for uint256;

    struct Provider {
        string peerId;
        uint256 stake;
        uint64 openSessions;
        bool registered;
    }

    struct Model {
        string name;
        address registeredBy; // the first to name it: a record, not an owner
    }

    struct Bid {
        address provider;
        bytes32 modelId;
        bytes32 ggufSha256; // the provider's declared file when it posted (0: no claim)
        uint256 pricePerSecond;
        uint64 registration; // the provider's registration it belongs to
        bool live; // withdrawn or replaced if false; see isLive for the whole rule
    }

    struct Session {
        address consumer;
        address provider;
        bytes32 bidId;
        uint256 pricePerSecond;
        uint256 stake;
        uint64 openedAt;
        uint64 endsAt;
        bool open;
    }

    bytes32 public constant APPROVAL_TYPEHASH =
        keccak256("Approval(bytes32 bidId,address consumer,uint256 chainId,uint64 expiry,bytes32 nonce)");
    /// @notice The consumer's acknowledgement that it used its session until `usedUntil`
    ///         (chain time, seconds): what a provider's claim is paid by. Under the same
    ///         EIP-712 domain as approvals (this contract, this chain); the session id
    ///         names the consumer, the bid and a nonce, and is never reused, so an
    ///         acknowledgement pays for its own session only.
    bytes32 public constant USAGE_TYPEHASH = keccak256("Usage(bytes32 sessionId,uint64 usedUntil)");

    /// @notice How long after a session's end its provider may still claim it. Long
    ///         enough that a provider settling every half minute claims through an RPC
    ///         outage, a congested chain or a restart (nodes claim at the end, well
    ///         inside it); short enough that a consumer whose provider took its stake
    ///         and served nothing has it back a quarter of an hour after the session
    ///         would have ended anyway. From then on anyone closes an unclaimed session,
    ///         paying the provider 0.
    uint64 public constant CLAIM_WINDOW = 15 minutes;

    /// @notice The longest session one stake may buy. Far above any session a node
    ///         opens (minutes), and it keeps every timestamp here within uint64 for
    ///         billions of years; a longer one reverts (SessionTooLong) rather than
    ///         being silently shortened, so that a session always lasts stake / price.
    uint256 public constant MAX_SESSION_SECONDS = 365 days;
    /// @notice A model name's limit in bytes: the offers protocol allows 128
    ///         characters (protocols/offers/config.py), at most 4 bytes each in UTF-8.
    uint256 public constant MAX_MODEL_NAME_BYTES = 512;

    IERC20 public immutable token;
    uint256 public immutable minProviderStake;

    mapping(address => Provider) private _providers;
    /// @notice How many times each address has registered as a provider (never reset).
    mapping(address => uint64) public registrations;
    mapping(bytes32 => Model) private _models;
    /// @notice provider => model id => the sha256 of the GGUF file it serves it from.
    mapping(address => mapping(bytes32 => bytes32)) public ggufOf;
    mapping(bytes32 => Bid) private _bids;
    mapping(address => mapping(bytes32 => bytes32)) private _liveBid;
    mapping(bytes32 => Session) private _sessions;
    mapping(bytes32 => bool) public approvalUsed;
    uint256 public bidCount;

    // Over the contract's life, modulo 2^256 (see _count).
    uint256 public totalEscrowed;
    uint256 public totalPaid;
    uint256 public totalRefunded;

    event ProviderRegistered(address indexed provider, string peerId, uint256 stake);
    event ProviderUpdated(address indexed provider, string peerId, uint256 stake);
    event ProviderDeregistered(address indexed provider, uint256 stakeReturned);
    event ModelRegistered(bytes32 indexed modelId, string name, address registeredBy);
    event ModelDeclared(bytes32 indexed modelId, address indexed provider, bytes32 ggufSha256);
    event BidPosted(
        bytes32 indexed bidId,
        address indexed provider,
        bytes32 indexed modelId,
        bytes32 ggufSha256,
        uint256 pricePerSecond
    );
    event BidDeleted(bytes32 indexed bidId);
    event SessionOpened(
        bytes32 indexed sessionId,
        address indexed consumer,
        address indexed provider,
        bytes32 bidId,
        uint256 stake,
        uint256 pricePerSecond,
        uint64 endsAt
    );
    event SessionClosed(bytes32 indexed sessionId, address closedBy, uint256 paid, uint256 refunded);

    error AlreadyRegistered();
    error NotRegistered();
    error EmptyPeerId();
    error StakeTooLow(uint256 minimum);
    error SessionsOpen(uint64 count);
    error EmptyModelName();
    error ModelNameTooLong(uint256 length, uint256 maximum);
    error UnknownModel();
    error UnknownBid();
    error NotBidOwner();
    error BidNotLive();
    error ZeroPrice();
    error PriceAboveLimit(uint256 price, uint256 limit);
    error ApprovalExpired(uint64 expiry, uint256 now);
    error ApprovalUsed();
    error BadApproval();
    error StakeBelowOneSecond(uint256 price);
    error SessionTooLong(uint256 duration, uint256 maximum);
    error SessionExists();
    error SessionNotOpen();
    error NotClosableYet(uint64 closableAt);
    error ProviderMustClaim();
    error NotProvider();
    error ClaimWindowClosed(uint64 closedAt);
    error BadUsage();

    constructor(IERC20 token_, uint256 minProviderStake_) EIP712("p2pnode Marketplace", "1") {
        token = token_;
        minProviderStake = minProviderStake_;
    }

    // --- providers -------------------------------------------------------------

    function registerProvider(string calldata peerId, uint256 stake) external nonReentrant {
        Provider storage p = _providers[msg.sender];
        if (p.registered) revert AlreadyRegistered();
        if (bytes(peerId).length == 0) revert EmptyPeerId();
        if (stake < minProviderStake) revert StakeTooLow(minProviderStake);
        p.peerId = peerId;
        p.stake = stake;
        p.registered = true;
        registrations[msg.sender] += 1; // the bids of earlier registrations stay dead
        token.safeTransferFrom(msg.sender, address(this), stake);
        emit ProviderRegistered(msg.sender, peerId, stake);
    }

    /// @notice Change the peer ID and/or add stake.
    function updateProvider(string calldata peerId, uint256 addStake) external nonReentrant {
        Provider storage p = _providers[msg.sender];
        if (!p.registered) revert NotRegistered();
        if (bytes(peerId).length == 0) revert EmptyPeerId();
        p.peerId = peerId;
        p.stake += addStake;
        if (addStake > 0) token.safeTransferFrom(msg.sender, address(this), addStake);
        emit ProviderUpdated(msg.sender, peerId, p.stake);
    }

    /// @notice Leave, with the stake back; only with no session open. Every bid of
    ///         the provider dies with its registration (a new one starts with none).
    function deregisterProvider() external nonReentrant {
        Provider storage p = _providers[msg.sender];
        if (!p.registered) revert NotRegistered();
        if (p.openSessions > 0) revert SessionsOpen(p.openSessions);
        uint256 stake = p.stake;
        delete _providers[msg.sender];
        token.safeTransfer(msg.sender, stake);
        emit ProviderDeregistered(msg.sender, stake);
    }

    function getProvider(address provider) external view returns (Provider memory) {
        return _providers[provider];
    }

    // --- models ----------------------------------------------------------------

    /// @notice The id of a model: keccak256 of its name's bytes.
    function modelIdOf(string calldata name) public pure returns (bytes32) {
        return keccak256(bytes(name));
    }

    /// @notice Name a model (if nobody has yet) and declare the GGUF file the caller
    ///         serves it from (0: no claim). Anyone may, any number of times: a
    ///         declaration is the caller's alone, and its next postBid carries it.
    function registerModel(string calldata name, bytes32 ggufSha256) external returns (bytes32 modelId) {
        if (bytes(name).length == 0) revert EmptyModelName();
        if (bytes(name).length > MAX_MODEL_NAME_BYTES) {
            revert ModelNameTooLong(bytes(name).length, MAX_MODEL_NAME_BYTES);
        }
        modelId = modelIdOf(name);
        Model storage m = _models[modelId];
        if (m.registeredBy == address(0)) {
            m.name = name;
            m.registeredBy = msg.sender;
            emit ModelRegistered(modelId, name, msg.sender);
        }
        ggufOf[msg.sender][modelId] = ggufSha256;
        emit ModelDeclared(modelId, msg.sender, ggufSha256);
    }

    function getModel(bytes32 modelId) external view returns (Model memory) {
        return _models[modelId];
    }

    // --- bids ------------------------------------------------------------------

    /// @notice Post (or re-price, at no fee) this provider's one live bid for a model,
    ///         carrying the GGUF file it declared for the model. Open sessions keep
    ///         the price they were opened at. A declaration changed since the live
    ///         bid was posted makes a new bid (and withdraws the old one): a
    ///         consumer's approval names a bid, whose file must not change under it.
    function postBid(bytes32 modelId, uint256 pricePerSecond) external returns (bytes32 bidId) {
        if (!_providers[msg.sender].registered) revert NotRegistered();
        if (_models[modelId].registeredBy == address(0)) revert UnknownModel();
        if (pricePerSecond == 0) revert ZeroPrice();
        bytes32 gguf = ggufOf[msg.sender][modelId];
        bidId = liveBid(msg.sender, modelId);
        if (bidId != bytes32(0) && _bids[bidId].ggufSha256 == gguf) {
            _bids[bidId].pricePerSecond = pricePerSecond;
        } else {
            if (bidId != bytes32(0)) {
                _bids[bidId].live = false;
                emit BidDeleted(bidId);
            }
            bidId = keccak256(abi.encode(msg.sender, modelId, bidCount++));
            _liveBid[msg.sender][modelId] = bidId;
            _bids[bidId] = Bid(msg.sender, modelId, gguf, pricePerSecond, registrations[msg.sender], true);
        }
        emit BidPosted(bidId, msg.sender, modelId, gguf, pricePerSecond);
    }

    function deleteBid(bytes32 bidId) external {
        Bid storage b = _bids[bidId];
        if (b.provider == address(0)) revert UnknownBid();
        if (b.provider != msg.sender) revert NotBidOwner();
        if (!isLive(bidId)) revert BidNotLive();
        b.live = false;
        delete _liveBid[msg.sender][b.modelId];
        emit BidDeleted(bidId);
    }

    /// @notice A bid may open sessions: not withdrawn or replaced, and its provider
    ///         is registered still, in the registration that posted it.
    function isLive(bytes32 bidId) public view returns (bool) {
        Bid storage b = _bids[bidId];
        return b.live && _providers[b.provider].registered && b.registration == registrations[b.provider];
    }

    /// @notice The provider's live bid for a model (0: none).
    function liveBid(address provider, bytes32 modelId) public view returns (bytes32 bidId) {
        bidId = _liveBid[provider][modelId];
        if (bidId != bytes32(0) && !isLive(bidId)) bidId = bytes32(0);
    }

    /// @notice The bid, with `live` as isLive says (dead with its provider's registration).
    function getBid(bytes32 bidId) external view returns (Bid memory b) {
        b = _bids[bidId];
        b.live = isLive(bidId);
    }

    // --- sessions --------------------------------------------------------------

    /// @notice The id `openSession` will give a session (known before the transaction).
    function sessionIdOf(bytes32 bidId, address consumer, bytes32 nonce) public pure returns (bytes32) {
        return keccak256(abi.encode(bidId, consumer, nonce));
    }

    /// @notice The EIP-712 digest a provider signs to approve a session.
    function approvalDigest(bytes32 bidId, address consumer, uint64 expiry, bytes32 nonce)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(
            keccak256(abi.encode(APPROVAL_TYPEHASH, bidId, consumer, block.chainid, expiry, nonce))
        );
    }

    /// @notice Open a session: `stake` moves into escrow and buys stake / price seconds,
    ///         at most MAX_SESSION_SECONDS (more reverts with SessionTooLong).
    /// @param maxPricePerSecond the price the consumer agreed to; a bid re-priced above it reverts.
    function openSession(
        bytes32 bidId,
        uint256 stake,
        uint256 maxPricePerSecond,
        uint64 expiry,
        bytes32 nonce,
        bytes calldata approval
    ) external nonReentrant returns (bytes32 sessionId) {
        Bid storage b = _bids[bidId];
        if (b.provider == address(0)) revert UnknownBid();
        if (!b.live) revert BidNotLive();
        Provider storage p = _providers[b.provider];
        if (!p.registered) revert NotRegistered();
        // A bid of an earlier registration (its provider left, and came back).
        if (b.registration != registrations[b.provider]) revert BidNotLive();
        uint256 price = b.pricePerSecond;
        if (price > maxPricePerSecond) revert PriceAboveLimit(price, maxPricePerSecond);
        _useApproval(b.provider, bidId, expiry, nonce, approval);
        sessionId = sessionIdOf(bidId, msg.sender, nonce);
        Session storage s = _sessions[sessionId];
        // Two approvals with the same nonce (another expiry) would name the same session.
        if (s.consumer != address(0)) revert SessionExists();
        s.consumer = msg.sender;
        s.provider = b.provider;
        s.bidId = bidId;
        s.pricePerSecond = price;
        s.stake = stake;
        s.openedAt = block.timestamp.toUint64();
        s.endsAt = _endsAt(stake, price);
        s.open = true;
        p.openSessions += 1;
        totalEscrowed = _count(totalEscrowed, stake);
        token.safeTransferFrom(msg.sender, address(this), stake);
        emit SessionOpened(sessionId, msg.sender, s.provider, bidId, stake, price, s.endsAt);
    }

    /// @dev When a session that `stake` buys at `price` ends: after stake / price seconds.
    function _endsAt(uint256 stake, uint256 price) private view returns (uint64) {
        if (stake < price) revert StakeBelowOneSecond(price);
        uint256 duration = stake / price;
        // A plain uint64(block.timestamp + duration) wraps for a duration long enough
        // (a stake of 2^64 - 1 at 1 per second): the session would end before it
        // opened, and closing it, so also deregistering its provider, would revert
        // forever. SafeCast stays as the guard of the cast itself.
        if (duration > MAX_SESSION_SECONDS) revert SessionTooLong(duration, MAX_SESSION_SECONDS);
        return (block.timestamp + duration).toUint64();
    }

    /// @dev Checks the provider's approval (unexpired, unused, its signature) and spends it.
    function _useApproval(address provider, bytes32 bidId, uint64 expiry, bytes32 nonce, bytes calldata approval)
        private
    {
        if (block.timestamp > expiry) revert ApprovalExpired(expiry, block.timestamp);
        bytes32 digest = approvalDigest(bidId, msg.sender, expiry, nonce);
        if (approvalUsed[digest]) revert ApprovalUsed();
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, approval);
        if (err != ECDSA.RecoverError.NoError || signer != provider) revert BadApproval();
        approvalUsed[digest] = true;
    }

    /// @notice The EIP-712 digest a consumer signs to acknowledge using a session until
    ///         `usedUntil` (chain time); `claimSession` pays by it.
    function usageDigest(bytes32 sessionId, uint64 usedUntil) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(USAGE_TYPEHASH, sessionId, usedUntil)));
    }

    /// @notice Settle a session without an acknowledgement.
    ///         - Its consumer, before its end: the provider is paid price x elapsed
    ///           seconds (the consumer chose to end its session early), the rest refunded.
    ///         - Anyone, from CLAIM_WINDOW after its end: its provider did not claim it,
    ///           so it is paid 0 and the whole stake is refunded. Nobody's stake is stranded.
    ///         Otherwise it reverts: the provider settles by claimSession (a close by it
    ///         would pay nothing, so it is refused rather than taken as a refund by
    ///         mistake: claimSession(id, 0, "") refunds on purpose), and between the end
    ///         and the window's close the session is its provider's to claim.
    function closeSession(bytes32 sessionId) external nonReentrant returns (uint256 paid, uint256 refunded) {
        Session storage s = _sessions[sessionId];
        if (!s.open) revert SessionNotOpen();
        uint64 closableAt = s.endsAt + CLAIM_WINDOW;
        if (block.timestamp < closableAt) {
            if (msg.sender == s.consumer && block.timestamp < s.endsAt) {
                // No overflow: now - openedAt < stake / price, so this is below the stake.
                paid = s.pricePerSecond * (block.timestamp - s.openedAt);
            } else if (msg.sender == s.provider) {
                revert ProviderMustClaim();
            } else {
                revert NotClosableYet(closableAt);
            }
        }
        (paid, refunded) = _settle(sessionId, s, paid);
    }

    /// @notice The provider settles its session with the consumer's latest acknowledgement
    ///         (`usageDigest(sessionId, usedUntil)` signed by the consumer's wallet), any
    ///         time until CLAIM_WINDOW after the session's end: it is paid
    ///         price x (min(usedUntil, endsAt, now) - openedAt), the rest is refunded.
    ///         A usedUntil after the open must carry the consumer's signature (else
    ///         BadUsage); one at or before it pays nothing and needs none:
    ///         claimSession(id, 0, "") refunds the whole stake (a provider that cannot
    ///         serve a session it approved).
    function claimSession(bytes32 sessionId, uint64 usedUntil, bytes calldata consumerSignature)
        external
        nonReentrant
        returns (uint256 paid, uint256 refunded)
    {
        Session storage s = _sessions[sessionId];
        if (!s.open) revert SessionNotOpen();
        if (msg.sender != s.provider) revert NotProvider();
        uint64 closedAt = s.endsAt + CLAIM_WINDOW;
        if (block.timestamp >= closedAt) revert ClaimWindowClosed(closedAt);
        // Any time acknowledged after the open must be the consumer's word, whatever
        // the block's time: whether a claim is valid does not depend on when it is mined.
        if (usedUntil > s.openedAt) {
            bytes32 digest = usageDigest(sessionId, usedUntil);
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, consumerSignature);
            if (err != ECDSA.RecoverError.NoError || signer != s.consumer) revert BadUsage();
            uint256 until = usedUntil;
            if (until > s.endsAt) until = s.endsAt;
            if (until > block.timestamp) until = block.timestamp;
            // No overflow: until - openedAt <= endsAt - openedAt = stake / price.
            if (until > s.openedAt) paid = s.pricePerSecond * (until - s.openedAt);
        }
        (paid, refunded) = _settle(sessionId, s, paid);
    }

    /// @dev Close an open session: `owed` (at most the stake) to the provider, the rest
    ///      back to its consumer.
    function _settle(bytes32 sessionId, Session storage s, uint256 owed)
        private
        returns (uint256 paid, uint256 refunded)
    {
        paid = owed > s.stake ? s.stake : owed;
        refunded = s.stake - paid;
        s.open = false;
        _providers[s.provider].openSessions -= 1;
        totalPaid = _count(totalPaid, paid);
        totalRefunded = _count(totalRefunded, refunded);
        if (paid > 0) token.safeTransfer(s.provider, paid);
        if (refunded > 0) token.safeTransfer(s.consumer, refunded);
        emit SessionClosed(sessionId, msg.sender, paid, refunded);
    }

    function getSession(bytes32 sessionId) external view returns (Session memory) {
        return _sessions[sessionId];
    }

    /// @dev A life-long total plus `amount`, modulo 2^256. Tokens come back to be
    ///      escrowed again, so with a token of vast supply the totals could pass
    ///      2^256; a checked sum would then revert every openSession for good. They
    ///      are for reading differences (exact while under 2^256 moved between two
    ///      readings), and the invariant above holds modulo 2^256.
    function _count(uint256 total, uint256 amount) private pure returns (uint256) {
        unchecked {
            return total + amount;
        }
    }
}
