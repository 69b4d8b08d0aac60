// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";

/// @title Marketplace: providers, models, bids priced per second, escrowed sessions.
/// @notice A provider registers with a minimum stake and its libp2p peer ID (never
///         an address on the internet), posts one live bid per model, and approves
///         each session off chain with an EIP-712 signature. The consumer opens the
///         session with that approval, moving its stake into escrow; whoever closes
///         it (the consumer, the provider, or anyone once it has ended) pays the
///         provider price x elapsed seconds, capped by the stake, and refunds the
///         rest in the same transaction. Invariant: escrowed = paid + refunded +
///         the stakes of open sessions.
contract Marketplace is EIP712, ReentrancyGuard {
    using SafeERC20 for IERC20;

    struct Provider {
        string peerId;
        uint256 stake;
        uint64 openSessions;
        bool registered;
    }

    struct Model {
        string name;
        bytes32 ggufSha256;
        address owner;
    }

    struct Bid {
        address provider;
        bytes32 modelId;
        uint256 pricePerSecond;
        bool live;
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

    IERC20 public immutable token;
    uint256 public immutable minProviderStake;

    mapping(address => Provider) private _providers;
    mapping(bytes32 => Model) private _models;
    mapping(bytes32 => Bid) private _bids;
    mapping(address => mapping(bytes32 => bytes32)) public liveBid;
    mapping(bytes32 => Session) private _sessions;
    mapping(bytes32 => bool) public approvalUsed;
    uint256 public bidCount;

    uint256 public totalEscrowed;
    uint256 public totalPaid;
    uint256 public totalRefunded;

    event ProviderRegistered(address indexed provider, string peerId, uint256 stake);
    event ProviderUpdated(address indexed provider, string peerId, uint256 stake);
    event ProviderDeregistered(address indexed provider, uint256 stakeReturned);
    event ModelRegistered(bytes32 indexed modelId, string name, bytes32 ggufSha256, address owner);
    event BidPosted(bytes32 indexed bidId, address indexed provider, bytes32 indexed modelId, uint256 pricePerSecond);
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
    error ModelExists();
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
    error SessionExists();
    error SessionNotOpen();
    error NotYetEnded(uint64 endsAt);

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

    /// @notice Leave, with the stake back; only with no session open.
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

    function registerModel(bytes32 modelId, string calldata name, bytes32 ggufSha256) external {
        if (_models[modelId].owner != address(0)) revert ModelExists();
        _models[modelId] = Model(name, ggufSha256, msg.sender);
        emit ModelRegistered(modelId, name, ggufSha256, msg.sender);
    }

    function getModel(bytes32 modelId) external view returns (Model memory) {
        return _models[modelId];
    }

    // --- bids ------------------------------------------------------------------

    /// @notice Post (or re-price, at no fee) this provider's one live bid for a model.
    ///         Open sessions keep the price they were opened at.
    function postBid(bytes32 modelId, uint256 pricePerSecond) external returns (bytes32 bidId) {
        if (!_providers[msg.sender].registered) revert NotRegistered();
        if (_models[modelId].owner == address(0)) revert UnknownModel();
        if (pricePerSecond == 0) revert ZeroPrice();
        bidId = liveBid[msg.sender][modelId];
        if (bidId == bytes32(0)) {
            bidId = keccak256(abi.encode(msg.sender, modelId, bidCount++));
            liveBid[msg.sender][modelId] = bidId;
            _bids[bidId] = Bid(msg.sender, modelId, pricePerSecond, true);
        } else {
            _bids[bidId].pricePerSecond = pricePerSecond;
        }
        emit BidPosted(bidId, msg.sender, modelId, pricePerSecond);
    }

    function deleteBid(bytes32 bidId) external {
        Bid storage b = _bids[bidId];
        if (b.provider == address(0)) revert UnknownBid();
        if (b.provider != msg.sender) revert NotBidOwner();
        if (!b.live) revert BidNotLive();
        b.live = false;
        delete liveBid[msg.sender][b.modelId];
        emit BidDeleted(bidId);
    }

    function getBid(bytes32 bidId) external view returns (Bid memory) {
        return _bids[bidId];
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

    /// @notice Open a session: `stake` moves into escrow and buys stake / price seconds.
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
        uint256 price = b.pricePerSecond;
        if (price > maxPricePerSecond) revert PriceAboveLimit(price, maxPricePerSecond);
        _useApproval(b.provider, bidId, expiry, nonce, approval);
        if (stake < price) revert StakeBelowOneSecond(price);
        sessionId = sessionIdOf(bidId, msg.sender, nonce);
        Session storage s = _sessions[sessionId];
        // Two approvals with the same nonce (another expiry) would name the same session.
        if (s.consumer != address(0)) revert SessionExists();
        s.consumer = msg.sender;
        s.provider = b.provider;
        s.bidId = bidId;
        s.pricePerSecond = price;
        s.stake = stake;
        s.openedAt = uint64(block.timestamp);
        s.endsAt = uint64(block.timestamp + stake / price);
        s.open = true;
        p.openSessions += 1;
        totalEscrowed += stake;
        token.safeTransferFrom(msg.sender, address(this), stake);
        emit SessionOpened(sessionId, msg.sender, s.provider, bidId, stake, price, s.endsAt);
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

    /// @notice Settle a session: the provider is paid for the seconds used, the consumer
    ///         gets the rest. The consumer or the provider may close at any time; anyone
    ///         may once it has ended, so no stake is ever stranded.
    function closeSession(bytes32 sessionId) external nonReentrant returns (uint256 paid, uint256 refunded) {
        Session storage s = _sessions[sessionId];
        if (!s.open) revert SessionNotOpen();
        if (msg.sender != s.consumer && msg.sender != s.provider && block.timestamp < s.endsAt) {
            revert NotYetEnded(s.endsAt);
        }
        uint256 until = block.timestamp < s.endsAt ? block.timestamp : s.endsAt;
        paid = s.pricePerSecond * (until - s.openedAt);
        if (paid > s.stake) paid = s.stake;
        refunded = s.stake - paid;
        s.open = false;
        _providers[s.provider].openSessions -= 1;
        totalPaid += paid;
        totalRefunded += refunded;
        if (paid > 0) token.safeTransfer(s.provider, paid);
        if (refunded > 0) token.safeTransfer(s.consumer, refunded);
        emit SessionClosed(sessionId, msg.sender, paid, refunded);
    }

    function getSession(bytes32 sessionId) external view returns (Session memory) {
        return _sessions[sessionId];
    }
}
