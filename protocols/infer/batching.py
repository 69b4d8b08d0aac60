"""When generated tokens leave as a frame: at once for the first, then by a short window.

A libp2p stream carries ~1,000-1,700 frames/s and spends ~0.6 ms of CPU per
frame (docs/libp2p-traps.md#per-frame-cost), so a frame per token would cap a
fast provider. The batcher holds tokens until the window has passed since
the oldest one waiting, or ``max_tokens`` (or ``max_bytes``) are waiting, and lets the first
token of a stream leave immediately so that time to first token is
unchanged.

The window widens with the streams the provider is generating at once
(:class:`Streams`): ``window_s`` for each, up to ``max_window_s``. Alone, a
stream's tokens leave every 40 ms; with four, every 160 ms; so the provider
sends about the same frames per second however many clients it serves, and
the CPU those frames cost is not taken from its engine (with four slots on
two cores, a frame per token cost ~7% of the tokens, and a frame per two
~5%: docs/performance.md#concurrent-clients).
Pure: the caller passes ``now`` and waits for :meth:`deadline` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from p2pnode.protocols.infer.messages import TokenLogprob


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # 40 ms: under what a reader notices, and at 25 frames/s a stream
    # carries any token rate the engine makes (goal: >= 20,000 tokens/s).
    window_s: float = 0.04
    # The widest window, however many streams: a reader sees text arrive in
    # steps of a few words, five times a second, from a provider busy enough
    # to need it (with 20 ms and 100 ms, four streams on a 2-core provider
    # took ~5% of its engine's tokens; with 40 ms and 200 ms, ~3%).
    max_window_s: float = 0.2
    # Bound a frame when a provider is very fast. Each frame costs a fixed
    # ~0.6 ms at every layer, twice over a relayed connection (the circuit's
    # own Noise and yamux inside the relay connection's): `bench stream`
    # carried 77,000-79,500 tokens/s with 256 tokens a frame, 86,700-89,000
    # with 1,024.
    max_tokens: int = 1024
    # Bytes of text and token pieces (counted as characters, so up to 4x
    # that in UTF-8): far below a consumer's frame cap (1 MiB) and within
    # one Noise message (64 KiB) for plain text.
    max_bytes: int = 16 * 1024


@dataclass
class Streams:
    """How many streams a provider is generating at once (shared by its batchers)."""

    active: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    text: str
    tokens: int
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[int, ...] = ()
    entries: tuple[TokenLogprob, ...] = ()  # what the user asked to see of each token


@dataclass
class TokenBatcher:
    """Collects (text, tokens) pieces and says when a batch is due."""

    cfg: Config = field(default_factory=Config)
    streams: Streams = field(default_factory=Streams)
    _parts: list[str] = field(default_factory=list)
    _tokens: int = 0
    _bytes: int = 0
    _ids: list[int] = field(default_factory=list)
    _logprobs: list[int] = field(default_factory=list)
    _entries: list[TokenLogprob] = field(default_factory=list)
    _since: float | None = None
    _sent_any: bool = False

    def add(
        self,
        text: str,
        tokens: int,
        now: float,
        ids: Sequence[int] = (),
        logprobs: Sequence[int] = (),
        entries: Sequence[TokenLogprob] = (),
    ) -> Batch | None:
        """Add a piece (with its token ids and log-probabilities, if the engine
        has them); returns the batch to send now, if one is due."""
        self._parts.append(text)
        self._tokens += tokens
        self._bytes += len(text)
        for entry in entries:
            self._bytes += len(entry.piece) + sum(len(a.piece) for a in entry.top)
        self._ids += ids
        self._logprobs += logprobs
        self._entries += entries
        if self._since is None:
            self._since = now
        if (
            not self._sent_any
            or self._tokens >= self.cfg.max_tokens
            or self._bytes >= self.cfg.max_bytes
        ):
            return self.flush()
        if now - self._since >= self.window_s():
            return self.flush()
        return None

    def window_s(self) -> float:
        """How long a token may wait for others now."""
        return min(self.cfg.max_window_s, self.cfg.window_s * max(1, self.streams.active))

    def deadline(self) -> float | None:
        """When the waiting batch must leave even if no token comes (None: nothing waits)."""
        return None if self._since is None else self._since + self.window_s()

    def flush(self) -> Batch | None:
        """Everything waiting, as one batch (None if nothing waits)."""
        if self._since is None:
            return None
        batch = Batch(
            "".join(self._parts),
            self._tokens,
            tuple(self._ids),
            tuple(self._logprobs),
            tuple(self._entries),
        )
        self._parts.clear()
        self._tokens = 0
        self._bytes = 0
        self._ids.clear()
        self._logprobs.clear()
        self._entries.clear()
        self._since = None
        self._sent_any = True
        return batch
