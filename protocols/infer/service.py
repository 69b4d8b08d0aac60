"""Trio adapter of the inference stream (docs/protocols.md#inference-stream).

Consumer: :func:`request` sends InferOpen and the sealed Request in one
write, hands each Chunk to its caller as it arrives, answers Done with an
Ack, and resets the stream if it leaves early (the provider then stops
generating). Provider: :func:`serve_infer` finds the session's keys, runs
the node's generation callback, batches its tokens into frames
(``batching``), and watches the stream meanwhile: a consumer that closes or
resets it cancels the generation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from p2pnode.errors import (
    BrokenStreamError,
    ErrorCode,
    LocalProtocolError,
    NetworkError,
    P2PNodeError,
    RemoteProtocolError,
)
from p2pnode.protocols.infer.batching import Batch, Streams, TokenBatcher
from p2pnode.protocols.infer.batching import Config as BatchConfig
from p2pnode.protocols.infer.machine import ConsumerMachine, ProviderMachine, State
from p2pnode.protocols.infer.messages import Ack, Chunk, Done, InferOpen, Request, TokenLogprob
from p2pnode.protocols.refusal import Refusal
from p2pnode.protocols.session.crypto import SessionKeys
from p2pnode.protocols.stream import (
    ByteStream,
    close_quietly,
    close_with_error,
    next_event,
    reset_quietly,
    send,
)
from p2pnode.protocols.wire import PEER_CLOSED, PROMPT_MAX_FRAME, Error
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # A provider may queue a request behind others (its offer tells how busy
    # it is, and a consumer prefers free slots), so the first chunk may take
    # a while; but no longer than half the consumer's try budget
    # (p2p/consumer.py): a provider that hangs before its first token must
    # leave time to ask another one. After it, a long silence means the
    # provider is gone.
    first_chunk_s: float = 30.0
    chunk_gap_s: float = 30.0
    # Provider: how long a consumer has to send its request, and its Ack.
    request_wait_s: float = 10.0
    ack_wait_s: float = 10.0
    # Provider: the longest one frame may wait for the consumer to read.
    write_s: float = 30.0
    max_frame: int = PROMPT_MAX_FRAME
    batching: BatchConfig = field(default_factory=BatchConfig)


class RequestRefused(P2PNodeError):
    """Raised by a provider's generation callback: tell the consumer why, sealed."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- consumer ----------------------------------------------------------------


async def request(
    stream: ByteStream,
    machine: ConsumerMachine,
    message: Request,
    deliver: Callable[[Chunk], Awaitable[None]],
    ack: Callable[[Done], Ack | bytes],
    cfg: Config,
) -> Done | Refusal:
    """Run one request; each Chunk goes to ``deliver`` in order, Done is returned.

    ``ack`` checks the receipt in Done and returns the Ack to send (paid mode: with
    the usage acknowledgement), or just our signature over the receipt.
    Returns Done, or the provider's :class:`Refusal` (its Error frame).
    Raises RemoteProtocolError (a tampered, replayed or malformed frame:
    nothing of it is delivered), NetworkError on timeouts and broken
    streams. Any early exit resets the stream, which cancels the generation.
    """
    finished = False
    try:
        await send(stream, machine, machine.open(message))
        wait = cfg.first_chunk_s
        while True:
            with trio.fail_after(wait):
                event = await next_event(stream, machine)
            wait = cfg.chunk_gap_s
            if isinstance(event, Error):
                return Refusal.of_request(event.code, event.message)
            if isinstance(event, Chunk):
                await deliver(event)
            elif isinstance(event, Done):
                answer = ack(event)
                if isinstance(answer, bytes):
                    answer = Ack(signature=answer)
                frame = machine.ack(answer.signature, answer.used_until, answer.usage_signature)
                with trio.move_on_after(cfg.ack_wait_s):
                    await send(stream, machine, frame)
                    await close_quietly(stream)
                finished = True
                return event
    except trio.TooSlowError as exc:
        raise NetworkError(f"provider silent for {wait:g} s") from exc
    except RemoteProtocolError as exc:
        await close_with_error(stream, machine.send_error(Error.from_exception(exc)))
        finished = True
        raise
    finally:
        if not finished:
            await reset_quietly(stream)


# --- provider ----------------------------------------------------------------


class Emit(Protocol):
    """Hands generated text (the tokens it took and, from an engine that runs
    the model, their ids and log-probabilities in thousandths of a nat) to
    the stream."""

    async def __call__(
        self,
        text: str,
        tokens: int,
        ids: Sequence[int] = (),
        logprobs: Sequence[int] = (),
        entries: Sequence[TokenLogprob] = (),
    ) -> None: ...


Lookup = Callable[[InferOpen], SessionKeys | Error]
"""The keys of the session an InferOpen names, or the Error to refuse it with."""

Run = Callable[[InferOpen, Request, Emit], Awaitable[Done]]
"""Generate a request, emitting text as it comes; returns the Done to send."""

OnAck = Callable[[InferOpen, Done, Ack | None], None]
"""The consumer's Ack of a Done (None if it never came). Called once for every Done
``Run`` returned, even one the stream could not deliver: a provider that counts
unacknowledged answers must hear of each."""


async def serve_infer(
    stream: ByteStream,
    lookup: Lookup,
    run: Run,
    on_ack: OnAck,
    cfg: Config,
    streams: Streams | None = None,
) -> None:
    """Serve one request on an inbound stream.

    ``streams``: the provider's count of streams generating, which widens each
    one's batching window (``batching``); None: this stream alone.
    A malformed or tampered frame gets an Error frame and the
    RemoteProtocolError is re-raised for the node to count; a consumer that
    leaves mid-stream is a cancellation, not an error.
    """
    machine = ProviderMachine(cfg.max_frame)
    try:
        with trio.fail_after(cfg.request_wait_s):
            opened = await next_event(stream, machine)
            if not isinstance(opened, InferOpen):
                return
            keys = lookup(opened)
            if isinstance(keys, Error):
                await close_with_error(stream, machine.refuse(ErrorCode(keys.code), keys.message))
                return
            machine.accept(keys)
            message = await next_event(stream, machine)
            if not isinstance(message, Request):
                return
        generation = _Generation(stream, machine, cfg, streams or Streams())
        await generation.run(opened, message, run, on_ack)
    except RemoteProtocolError as exc:
        await close_with_error(stream, machine.send_error(Error.from_exception(exc)))
        raise
    except trio.TooSlowError:
        await close_with_error(
            stream, machine.send_error(Error(code=ErrorCode.TIMEOUT, message="no request in time"))
        )


class _Generation:
    """One request being generated: batching, writes, and the consumer watch."""

    def __init__(
        self, stream: ByteStream, machine: ProviderMachine, cfg: Config, streams: Streams
    ) -> None:
        self._stream = stream
        self._machine = machine
        self._cfg = cfg
        self._streams = streams
        self._batcher = TokenBatcher(cfg.batching, streams)
        self._write_lock = trio.Lock()
        self._pending = trio.Event()
        self._ack: Ack | None = None
        self._acked = trio.Event()
        self._done: Done | None = None  # what run returned, delivered or not
        # Set once we refused mid-request: the machine is in ERROR, and the
        # consumer's reaction (a reset) is no concern of the watcher's.
        self._refused = False

    async def run(self, opened: InferOpen, message: Request, run: Run, on_ack: OnAck) -> None:
        self._streams.active += 1
        try:
            with single_errors_ungrouped():
                await self._generate(opened, message, run)
        finally:
            self._streams.active -= 1
            if self._done is not None:
                on_ack(opened, self._done, self._ack)
        await close_quietly(self._stream)

    async def _generate(self, opened: InferOpen, message: Request, run: Run) -> Done | None:
        done: Done | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, nursery.cancel_scope)
            nursery.start_soon(self._flusher)
            try:
                done = self._done = await run(opened, message, self._emit)
            except RequestRefused as exc:
                error = Error(code=int(exc.code), message=str(exc)[:200])
                self._refused = True
                async with self._write_lock:
                    await self._write(self._machine.send_error(error))
                nursery.cancel_scope.cancel()
                return None
            # What is still batched, then Done, in one hold of the lock (a
            # batch the flusher took cannot land after Done) and one write:
            # a frame's fixed cost paid once, not twice, at every layer.
            async with self._write_lock:
                await self._write(
                    self._chunk_bytes(self._batcher.flush()) + self._machine.done(done)
                )
            with trio.move_on_after(self._cfg.ack_wait_s):
                await self._acked.wait()
            nursery.cancel_scope.cancel()
        return done

    async def _write(self, data: bytes) -> None:
        """Send one frame; a consumer that takes nothing for ``write_s`` has left."""
        try:
            with trio.fail_after(self._cfg.write_s):
                await send(self._stream, self._machine, data)
        except trio.TooSlowError as exc:
            # A consumer that stops reading would otherwise hold a generation
            # slot (and, in free mode, cost nothing) for as long as it likes.
            self._machine.send_failed()
            await reset_quietly(self._stream)
            raise BrokenStreamError(
                f"the consumer read nothing for {self._cfg.write_s:g} s"
            ) from exc

    async def _emit(
        self,
        text: str,
        tokens: int,
        ids: Sequence[int] = (),
        logprobs: Sequence[int] = (),
        entries: Sequence[TokenLogprob] = (),
    ) -> None:
        batch = self._batcher.add(text, tokens, trio.current_time(), ids, logprobs, entries)
        if batch is None:
            self._pending.set()
            return
        async with self._write_lock:
            await self._send_chunk(batch)

    async def _flusher(self) -> None:
        """Sends a batch whose window has passed while no new token came."""
        while True:
            deadline = self._batcher.deadline()
            if deadline is None:
                await self._pending.wait()
                self._pending = trio.Event()
                continue
            await trio.sleep_until(deadline)
            async with self._write_lock:
                due = self._batcher.deadline()
                if due is not None and due <= trio.current_time():
                    await self._send_pending()

    async def _send_pending(self) -> None:
        """Send what the batcher holds; the caller holds the write lock."""
        batch = self._batcher.flush()
        if batch is not None:
            await self._send_chunk(batch)

    async def _send_chunk(self, batch: Batch) -> None:
        if data := self._chunk_bytes(batch):
            await self._write(data)

    def _chunk_bytes(self, batch: Batch | None) -> bytes:
        """``batch`` as a frame; nothing for no batch, or after an Error or Done."""
        if batch is None or self._machine.state is not State.STREAMING:
            return b""
        return self._machine.chunk(
            batch.text, batch.tokens, batch.token_ids, batch.logprobs, batch.entries
        )

    async def _watch(self, generation: trio.CancelScope) -> None:
        """Read what the consumer sends while we generate: its Ack, or its leaving."""
        try:
            event = await next_event(self._stream, self._machine)
        except BrokenStreamError:
            event = PEER_CLOSED
        except LocalProtocolError:
            if self._refused:  # read on after our Error frame: nothing to watch for
                return
            raise
        if isinstance(event, Ack):
            self._ack = event
            self._acked.set()
            return
        # The consumer left or failed before Done (or after it, without an Ack):
        # stop generating (the provider meters what was produced).
        generation.cancel()
