"""LlamaCppEngine with the real bundled model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import trio
import trio.lowlevel

from p2pnode.errors import BadRequestError, ConfigError, EngineError
from p2pnode.inference.engine import ChatMessage, EngineBusy, Params, Request, collect
from p2pnode.inference.llamacpp import (
    BUFFER_TOKENS,
    BUNDLED_MODEL_ID,
    Config,
    LlamaCppEngine,
    bundled_model_path,
    file_sha256,
    open_llamacpp,
    recommended_sampling,
)

pytestmark = pytest.mark.slow

QUESTION = (ChatMessage(role="user", content="Tell me a long story about a dragon."),)
GREEDY = Params(max_tokens=24, temperature=0.0, seed=7)


def chat(params: Params = GREEDY, messages: tuple[ChatMessage, ...] = QUESTION) -> Request:
    return Request(model_id=BUNDLED_MODEL_ID, kind="chat", messages=messages, params=params)


def cfg(**kw: object) -> Config:
    return Config(model_path=bundled_model_path(), model_id=BUNDLED_MODEL_ID, n_threads=1, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def engine() -> AsyncIterator[LlamaCppEngine]:
    async with open_llamacpp(cfg()) as e:
        yield e


def direct_chat(request: Request) -> tuple[str, dict[str, int]]:
    """What llama-cpp-python gives by itself for the same request (fresh model)."""
    # Imported here, not at the top: llama_cpp must load after the engine
    # module has set libgomp's spin (inference/llamacpp.py).
    from llama_cpp import Llama

    llm = Llama(model_path=str(bundled_model_path()), n_ctx=2048, n_threads=1, verbose=False)
    try:
        p = request.params
        out = llm.create_chat_completion(
            messages=[{"role": m.role, "content": m.content} for m in request.messages],
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            seed=p.seed,
        )
        return out["choices"][0]["message"]["content"], dict(out["usage"])
    finally:
        llm.close()


async def test_model_info(engine: LlamaCppEngine) -> None:
    (info,) = engine.models()
    assert info.model_id == BUNDLED_MODEL_ID
    assert info.context_length == 2048
    assert info.gguf_sha256 == await trio.to_thread.run_sync(file_sha256, bundled_model_path())
    assert (engine.slots_total, engine.slots_free, engine.queue_len) == (1, 1, 0)


async def test_greedy_output_is_stable_and_equals_llama_cpp_directly(
    engine: LlamaCppEngine,
) -> None:
    first, last = await collect(engine, chat())
    # Something else runs in between: without reset() the KV cache would leak in.
    await collect(engine, chat(messages=(ChatMessage(role="user", content="Say hello."),)))
    again, _ = await collect(engine, chat())
    expected, usage = await trio.to_thread.run_sync(direct_chat, chat())
    assert first == again == expected
    assert first.strip()
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )


async def test_usage_when_the_model_stops_by_itself(engine: LlamaCppEngine) -> None:
    request = chat(
        Params(max_tokens=200, temperature=0.0, seed=1),
        (ChatMessage(role="user", content="What is 2+2? Answer with a number only."),),
    )
    text, last = await collect(engine, request)
    expected, usage = await trio.to_thread.run_sync(direct_chat, request)
    assert text == expected
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert last.usage.completion_tokens == usage["completion_tokens"]
    assert last.usage.prompt_tokens == usage["prompt_tokens"]


async def test_completion_kind(engine: LlamaCppEngine) -> None:
    request = Request(
        model_id=BUNDLED_MODEL_ID,
        kind="completion",
        prompt="The capital of France is",
        params=Params(max_tokens=8, temperature=0.0),
    )
    text, last = await collect(engine, request)
    assert text
    assert last.usage is not None
    assert last.usage.completion_tokens == 8


async def test_stop_sequences_end_the_text(engine: LlamaCppEngine) -> None:
    full, _ = await collect(engine, chat())
    cut_at = full.strip().split()[1]
    text, last = await collect(engine, chat(Params(max_tokens=24, temperature=0.0, stop=(cut_at,))))
    assert cut_at not in text
    assert full.startswith(text)
    assert last.finish_reason == "stop"


async def test_leaving_the_stream_stops_generation_and_frees_the_slot(
    engine: LlamaCppEngine,
) -> None:
    long = chat(Params(max_tokens=400, temperature=0.0))
    received = 0
    async with engine.stream(long) as chunks:
        assert engine.slots_free == 0
        async for chunk in chunks:
            received += 1 if chunk.text else 0
            if received == 3:
                break
        left_at = time.perf_counter()
    stopped_after = time.perf_counter() - left_at
    assert engine.slots_free == 1
    # Within one token: SmolLM2 makes ~50 tokens/s on one thread here, so the
    # whole 400-token request would have taken seconds.
    assert stopped_after < 1.0
    text, _ = await collect(engine, chat())
    assert text  # the slot works again


async def test_cancelling_the_caller_frees_the_slot(engine: LlamaCppEngine) -> None:
    with trio.move_on_after(0.3):
        await collect(engine, chat(Params(max_tokens=400, temperature=0.0)))
    assert engine.slots_free == 1


async def test_two_slots_serve_two_requests_at_once() -> None:
    async with open_llamacpp(cfg(slots=2)) as engine:
        results: list[str] = []

        async def one() -> None:
            text, _ = await collect(engine, chat())
            results.append(text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
            await trio.lowlevel.checkpoint()
            # Both started at once: no slot left, nobody waiting.
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert engine.slots_free == 0
            assert engine.queue_len == 0
        assert len(results) == 2
        assert results[0] == results[1]
        assert engine.slots_free == 2


async def test_a_full_queue_refuses_at_once() -> None:
    async with open_llamacpp(cfg(queue_limit=0)) as engine, engine.stream(chat()):
        with pytest.raises(EngineBusy, match="slots busy"):
            async with engine.stream(chat()):
                pass


async def test_unknown_model_is_an_engine_error(engine: LlamaCppEngine) -> None:
    with pytest.raises(EngineError, match="not served here"):
        async with engine.stream(Request(model_id="other", kind="completion", prompt="x")):
            pass


@pytest.mark.parametrize("cut", [1, 7, 20])
async def test_a_continued_answer_equals_the_uninterrupted_one(
    engine: LlamaCppEngine, cut: int
) -> None:
    """Failover continues from the text delivered so far (docs/architecture.md#failover)."""
    request = chat(Params(max_tokens=40, temperature=0.0, seed=7))
    full, last = await collect(engine, request)
    parts: list[str] = []
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            parts.append(chunk.text)
            if len(parts) == cut:
                break
    delivered = "".join(parts)
    rest_request = replace(
        request, continuation=delivered, params=replace(request.params, max_tokens=40 - cut)
    )
    rest, rest_last = await collect(engine, rest_request)
    assert delivered + rest == full
    assert rest_last.finish_reason == last.finish_reason
    assert rest_last.usage is not None
    assert rest_last.usage.completion_tokens == 40 - cut


async def _greedy_logprobs(engine: LlamaCppEngine, asked: Request) -> tuple[list[int], list[float]]:
    ids: list[int] = []
    logprobs: list[float] = []
    async with engine.stream(asked) as chunks:
        async for chunk in chunks:
            ids += chunk.token_ids
            logprobs += chunk.logprobs
    return ids, logprobs


def _rest(engine: LlamaCppEngine, request: Request, ids: list[int], cut: int) -> Request:
    """``request`` continued after its first ``cut`` tokens (``ids``), as a failover asks."""
    return replace(
        request,
        continuation=engine.text_of(ids[:cut]),
        continuation_ids=tuple(ids[:cut]),
        params=replace(request.params, max_tokens=request.params.max_tokens - cut),
    )


async def test_a_replayed_answer_leaves_the_model_exactly_where_generation_did(
    engine: LlamaCppEngine,
) -> None:
    # Where one batch is not exact, a failover replays the answer so far
    # token by token, without asking llama.cpp for logits it does not need:
    # the log-probabilities of what comes next must be the very same floats,
    # not merely the same greedy picks.
    engine.replays_in_one_batch = False
    request = chat(Params(max_tokens=30, temperature=0.0, seed=7))
    ids, logprobs = await _greedy_logprobs(engine, request)
    cut = 12
    rest_ids, rest_logprobs = await _greedy_logprobs(engine, _rest(engine, request, ids, cut))
    assert rest_ids == ids[cut:]
    assert rest_logprobs == logprobs[cut:]


@pytest.mark.parametrize(
    ("model", "prompt"),
    [
        ("bundled", "The history of the printing press"),
        # The cut falls past llama.cpp's 256 KV cells, where a batch attends
        # over more (masked) cells than the one-token steps before it did.
        ("bundled", "The history of the printing press. " * 35),
        ("gemma", "The history of the printing press"),
    ],
    ids=["bundled", "bundled-past-256-cells", "gemma"],
)
async def test_the_answer_so_far_goes_in_one_batch_only_where_that_is_exact(
    model: str, prompt: str
) -> None:
    """A failover's continuation is evaluated in one batch (as fast as a
    prompt) where that leaves llama.cpp bit for bit where generation did, and
    token by token where it does not (docs/architecture.md#deterministic-generation)."""
    import llama_cpp

    from p2pnode.simnet.cheaters import swap_model_path

    path = bundled_model_path() if model == "bundled" else swap_model_path()
    async with open_llamacpp(Config(model_path=path, model_id=BUNDLED_MODEL_ID, n_threads=1)) as e:
        request = Request(
            model_id=BUNDLED_MODEL_ID,
            kind="completion",
            prompt=prompt,
            params=Params(max_tokens=30, temperature=0.0, seed=7),
        )
        if len(prompt) > 100:
            assert 256 - 17 < e.prompt_tokens(request) < 256
        ids, logprobs = await _greedy_logprobs(e, request)
        assert len(ids) == 30
        cut = 17
        rest = _rest(e, request, ids, cut)
        chose = e.replays_in_one_batch
        e.replays_in_one_batch = True
        batched = await _greedy_logprobs(e, rest)
        e.replays_in_one_batch = False
        one_by_one = await _greedy_logprobs(e, rest)
    assert one_by_one == (ids[cut:], logprobs[cut:])
    assert chose == (batched == one_by_one)
    # What the engine chose, as measured here: gemma-3's K-quant kernels
    # differ by batch size in any build; SmolLM2 Q4_1 is exact without
    # llamafile, as ./dev builds llama.cpp.
    system = llama_cpp.llama_print_system_info().decode()
    assert chose == (model == "bundled" and "LLAMAFILE = 1" not in system)


async def test_a_continuation_with_its_ids_goes_on_where_its_text_alone_would_not(
    engine: LlamaCppEngine,
) -> None:
    """Some answers cut short tokenize back into other tokens
    (docs/protocols.md#failover-continuation).

    Greedy output continued from those drifts; from the ids the chunks
    carried, it is the uninterrupted answer at every cut.
    """
    request = Request(
        model_id=BUNDLED_MODEL_ID,
        kind="completion",
        prompt="Why the sky is blue",
        params=Params(max_tokens=16, temperature=0.0),
    )
    chunks = []
    async with engine.stream(request) as stream:
        async for chunk in stream:
            chunks.append(chunk)
    full = "".join(c.text for c in chunks)
    drifted = []
    for cut in range(1, len(chunks) - 1):
        text = "".join(c.text for c in chunks[:cut])
        ids = tuple(i for c in chunks[:cut] for i in c.token_ids)
        left = replace(request.params, max_tokens=16 - len(ids))
        by_text, _ = await collect(engine, replace(request, continuation=text, params=left))
        by_ids, _ = await collect(
            engine, replace(request, continuation=text, continuation_ids=ids, params=left)
        )
        assert text + by_ids == full, cut
        if text + by_text != full:
            drifted.append(text)
    assert drifted  # the case exists (after ".\n\n" in this answer)
    # Ids that do not spell the text are not used: the text's own tokens are.
    text = "".join(c.text for c in chunks[:3])
    wrong = replace(request, continuation=text, continuation_ids=(1, 2, 3),
                    params=replace(request.params, max_tokens=4))  # fmt: skip
    text_alone = (await collect(engine, replace(wrong, continuation_ids=())))[0]
    assert (await collect(engine, wrong))[0] == text_alone
    # Nor ids that hide a control token the text does not show (a turn's end).
    ids = tuple(i for c in chunks[:3] for i in c.token_ids)
    im_end = 2  # SmolLM2's <|im_end|>: a control token, no text of its own
    assert engine.text_of([im_end]) == ""
    hidden = replace(wrong, continuation_ids=(*ids, im_end))
    assert (await collect(engine, hidden))[0] == text_alone


async def test_a_continued_completion_equals_the_uninterrupted_one(engine: LlamaCppEngine) -> None:
    request = Request(
        model_id=BUNDLED_MODEL_ID,
        kind="completion",
        prompt="The history of the printing press",
        params=Params(max_tokens=30, temperature=0.0),
    )
    full, _ = await collect(engine, request)
    parts: list[str] = []
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            parts.append(chunk.text)
            if len(parts) == 10:
                break
    rest, _ = await collect(
        engine,
        replace(
            request, continuation="".join(parts), params=replace(request.params, max_tokens=20)
        ),
    )
    assert "".join(parts) + rest == full


async def test_the_bundled_model_recommends_its_authors_sampling(engine: LlamaCppEngine) -> None:
    (info,) = engine.models()
    assert (info.temperature, info.top_p) == (0.2, 0.9)  # SmolLM2's model card


@pytest.mark.parametrize(
    ("mine", "metadata", "announced"),
    [
        ({}, {"general.basename": "SmolLM2"}, (0.2, 0.9)),
        ({}, {"general.basename": "other"}, (None, None)),
        # The file's own keys win over its authors' card.
        ({}, {"general.basename": "smollm2", "general.sampling.temp": "0.6"}, (0.6, 0.9)),
        ({}, {"general.sampling.top_p": "0.5"}, (None, 0.5)),
        # Out of range in a file: ignored (every peer would refuse the offer).
        ({}, {"general.sampling.temp": "7", "general.sampling.top_p": "0"}, (None, None)),
        ({}, {"general.sampling.temp": "hot"}, (None, None)),
        # The operator's word wins over everything.
        ({"temperature": 0.0, "top_p": 1.0}, {"general.basename": "smollm2"}, (0.0, 1.0)),
    ],
)
def test_the_recommendation_is_the_operators_the_files_or_the_authors(
    mine: dict[str, float], metadata: dict[str, str], announced: tuple[float | None, float | None]
) -> None:
    assert recommended_sampling(cfg(**mine), metadata) == announced


@pytest.mark.parametrize("mine", [{"temperature": 2.5}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_a_recommendation_out_of_range_is_a_config_error(mine: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="recommended"):
        recommended_sampling(cfg(**mine), {})


async def test_logit_bias_bans_and_forces_tokens(engine: LlamaCppEngine) -> None:
    request = Request(model_id=BUNDLED_MODEL_ID, kind="chat", messages=QUESTION, params=GREEDY)
    plain = await _ids(engine, request)
    first, forced = plain[0], plain[1]
    banned = await _ids(engine, _with(request, logit_bias=((first, -100.0),)))
    assert banned[0] != first
    assert first not in banned
    # +100 outweighs every other logit: greedy picks it every time.
    assert await _ids(engine, _with(request, logit_bias=((forced, 100.0),))) == [forced] * len(
        plain
    )


async def test_penalties_change_a_greedy_answer_that_repeats_itself(
    engine: LlamaCppEngine,
) -> None:
    # (Their exact arithmetic: tests/inference/test_sampling.py; that scoring
    # applies them as generation does: tests/inference/test_audit.py.)
    request = Request(model_id=BUNDLED_MODEL_ID, kind="chat", messages=QUESTION, params=GREEDY)
    plain = await _ids(engine, request)
    assert len(set(plain)) < len(plain)  # some token comes back
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        assert await _ids(engine, _with(request, **penalty)) != plain, penalty


async def test_a_bias_outside_the_vocabulary_is_an_engine_error(engine: LlamaCppEngine) -> None:
    request = Request(
        model_id=BUNDLED_MODEL_ID,
        kind="chat",
        messages=QUESTION,
        params=replace(GREEDY, logit_bias=((10**6, 1.0),)),
    )
    free = engine.slots_free
    with pytest.raises(BadRequestError, match="logit_bias names a token id outside"):
        await collect(engine, request)
    assert engine.slots_free == free


def _with(request: Request, **params: object) -> Request:
    return replace(request, params=replace(request.params, **params))  # type: ignore[arg-type]


async def _ids(engine: LlamaCppEngine, request: Request) -> list[int]:
    ids: list[int] = []
    async with engine.stream(request) as chunks:
        async for chunk in chunks:
            ids += chunk.token_ids
    return ids


async def test_a_reader_that_stops_reading_holds_generation_back_and_can_still_leave(
    engine: LlamaCppEngine,
) -> None:
    # The worker thread hands chunks over without waiting for trio, but no
    # further than BUFFER_TOKENS ahead of the reader; one waiting for room
    # when the reader leaves must still stop, or the slot never comes back.
    long = chat(Params(max_tokens=400, temperature=0.0))
    with trio.fail_after(30):
        async with engine.stream(long) as chunks:
            await chunks.receive()
            await trio.sleep(3)  # ~50 tokens/s here: the buffer fills and the thread waits
            waiting = 0  # chunks already there: each comes at once, a new one in ~20 ms
            while True:
                with trio.move_on_after(0.005) as waited_too_long:
                    await chunks.receive()
                if waited_too_long.cancelled_caught:
                    break
                waiting += 1
            # Unbounded, ~150 would have been waiting after 3 s (the one more:
            # the first receive made room for it).
            assert waiting <= BUFFER_TOKENS + 1
            await trio.sleep(3)  # full again: the thread waits for room as the reader leaves
            left_at = trio.current_time()
        assert trio.current_time() - left_at < 0.4
        assert engine.slots_free == 1
