"""Audits with real models: honest answers pass, every kind of cheat is caught.

The honest side runs the bundled SmolLM2 on one and on two threads (the
auditor on one, scoring in batched prefill); the cheaters are real engines
too (simnet/cheaters.py): a Q4_0-degraded copy of the same GGUF, Gemma 3
270M under SmolLM2's name, and wrappers that splice, truncate or sample hot.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from p2pnode.inference.audit import Audit, ImpossibleAnswer, Limits, PitPool, audit
from p2pnode.inference.engine import JSON_SCHEMA, ChatMessage, Format, Params, Request
from p2pnode.inference.llamacpp import (
    BUNDLED_MODEL_ID,
    Config,
    LlamaCppEngine,
    bundled_model_path,
    open_llamacpp,
)
from p2pnode.protocols.infer.messages import PAUSED, Commitment
from p2pnode.simnet.cheaters import Cheater, swap_model_path

QUESTIONS = (
    "Tell me a story about a dragon.",
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
)
GREEDY = Params(max_tokens=32, temperature=0.0)
SAMPLED = Params(max_tokens=32, temperature=0.8, top_p=0.95)


def chat(question: str, params: Params, seed: int | None = None) -> Request:
    return Request(
        model_id=BUNDLED_MODEL_ID,
        kind="chat",
        messages=(ChatMessage(role="user", content=question),),
        params=replace(params, seed=seed),
    )


def config(path: Path, threads: int = 1, slots: int = 1) -> Config:
    return Config(model_path=path, model_id=BUNDLED_MODEL_ID, n_threads=threads, slots=slots)


@dataclass
class Answer:
    text: str
    commitment: Commitment
    finish: str


async def answer(engine: object, request: Request) -> Answer:
    """Generate ``request`` and build the commitment a provider would sign for it."""
    texts: list[str] = []
    ids: list[int] = []
    logprobs: list[float] = []
    finish, usage = "", None
    async with engine.stream(request) as chunks:  # type: ignore[attr-defined]
        async for chunk in chunks:
            texts.append(chunk.text)
            ids += chunk.token_ids
            logprobs += chunk.logprobs
            if chunk.finish_reason is not None:
                finish, usage = chunk.finish_reason, chunk.usage
    assert usage is not None
    (info,) = engine.models()  # type: ignore[attr-defined]
    commitment = Commitment(
        request_hash=b"",
        gguf_sha256=info.gguf_sha256,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        token_ids=tuple(ids),
        logprobs=tuple(round(lp * 1000) for lp in logprobs),
    )
    return Answer("".join(texts), commitment, finish)


async def judge(
    auditor: LlamaCppEngine, request: Request, got: Answer, rng: random.Random | None = None
) -> Audit:
    """Audit ``got`` (``rng``: the transforms' randomness; one per pool, never
    one per answer, or the pooled values repeat)."""
    scores = await auditor.score(request, got.commitment.token_ids)
    (info,) = auditor.models()
    assert info.gguf_sha256 is not None
    return audit(
        got.commitment,
        weights=info.gguf_sha256,
        temperature=request.params.temperature,
        stops=request.params.stop,
        delivered=got.text,
        finish_reason=got.finish,
        scores=scores,
        rng=rng,
    )


@pytest.fixture
async def auditor() -> AsyncIterator[LlamaCppEngine]:
    async with open_llamacpp(config(bundled_model_path())) as engine:
        yield engine


@pytest.mark.parametrize(("threads", "slots"), [(1, 1), (2, 2)])
async def test_honest_answers_pass_across_thread_and_slot_counts(
    auditor: LlamaCppEngine, threads: int, slots: int
) -> None:
    pool = PitPool()
    async with open_llamacpp(config(bundled_model_path(), threads, slots)) as honest:
        for i, question in enumerate(QUESTIONS[:2]):
            for params in (GREEDY, SAMPLED):
                request = chat(question, params, seed=i)
                got = await answer(honest, request)
                verdict = await judge(auditor, request, got)
                assert verdict.passed, verdict.measured()
                assert verdict.tokens == len(got.commitment.token_ids) > 0
                pool.add(verdict.pits)
    # The sampled draws look like the sampler's own (or too few to say).
    assert pool.finding() is None


async def test_a_cheaper_quant_of_the_same_model_is_caught(
    auditor: LlamaCppEngine, degraded_gguf: Path
) -> None:
    async with open_llamacpp(config(degraded_gguf)) as cheap:
        cheat = Cheater("cheap_quant", cheap, auditor.models()[0], auditor)
        for params in (GREEDY, SAMPLED):
            request = chat(QUESTIONS[0], params, seed=1)
            verdict = await judge(auditor, request, await answer(cheat, request))
            checks = {f.check for f in verdict.findings}
            # Its own log-probabilities betray its weights, greedy or sampled.
            assert "logprobs" in checks, verdict.measured()
            assert verdict.logprob_mean_diff > 2 * Limits().logprob_mean


async def test_another_model_under_the_name_is_caught(auditor: LlamaCppEngine) -> None:
    async with open_llamacpp(
        Config(model_path=swap_model_path(), model_id="gemma", n_threads=1)
    ) as gemma:
        cheat = Cheater("model_swap", gemma, auditor.models()[0], auditor)
        request = chat(QUESTIONS[1], GREEDY)
        got = await answer(cheat, request)
        verdict = await judge(auditor, request, got)
    checks = {f.check for f in verdict.findings}
    assert {"logprobs", "greedy"} <= checks, verdict.measured()


async def test_spliced_text_is_caught_with_or_without_ids_for_it(auditor: LlamaCppEngine) -> None:
    cheat = Cheater("token_splice", auditor, auditor.models()[0], auditor)
    request = chat(QUESTIONS[2], GREEDY)
    got = await answer(cheat, request)
    assert "Sponsored" in got.text
    # With ids for its text: the model would never have chosen them.
    verdict = await judge(auditor, request, got)
    assert "greedy" in {f.check for f in verdict.findings}, verdict.measured()
    # Without: the ids' text is not what it streamed.
    honest = await answer(auditor, request)
    spliced = replace(honest, text=honest.text[:20] + " BUY NOW" + honest.text[20:])
    verdict = await judge(auditor, request, spliced)
    assert [f.check for f in verdict.findings] == ["text"]


async def test_miscounted_usage_and_other_weights_are_caught(auditor: LlamaCppEngine) -> None:
    request = chat(QUESTIONS[0], GREEDY)
    honest = await answer(auditor, request)
    c = honest.commitment
    for lie, check in (
        (replace(c, completion_tokens=c.completion_tokens + 1), "usage"),
        (replace(c, prompt_tokens=c.prompt_tokens + 5), "usage"),
        (replace(c, gguf_sha256="0" * 64), "weights"),
    ):
        verdict = await judge(auditor, request, replace(honest, commitment=lie))
        assert [f.check for f in verdict.findings] == [check]
    # A paused paid answer bills no prompt (its Done says 0): that is no lie.
    paused = replace(honest, commitment=replace(c, prompt_tokens=0), finish=PAUSED)
    assert (await judge(auditor, request, paused)).passed


async def test_a_truncated_prompt_is_caught(auditor: LlamaCppEngine) -> None:
    cheat = Cheater("prompt_truncation", auditor, auditor.models()[0], auditor)
    story = " ".join(f"On day {d} the dragon flew over village number {d * 7}." for d in range(12))
    request = chat(story + " Which village did the dragon fly over first?", GREEDY)
    got = await answer(cheat, request)
    # It claims the whole prompt, and its answer reads as one.
    assert got.commitment.prompt_tokens == auditor.prompt_tokens(request)
    verdict = await judge(auditor, request, got)
    assert {"logprobs"} <= {f.check for f in verdict.findings}, verdict.measured()


async def test_hot_sampling_is_caught_across_requests(auditor: LlamaCppEngine) -> None:
    cheat = Cheater("hot_sampling", auditor, auditor.models()[0], auditor)
    pool = PitPool()
    caught_after = None
    for n in range(1, 21):
        request = chat(QUESTIONS[n % 3], SAMPLED, seed=n)
        verdict = await judge(auditor, request, await answer(cheat, request))
        pool.add(verdict.pits)
        if not verdict.passed or pool.finding() is not None:
            caught_after = n
            break
    assert caught_after is not None
    # Greedy requests it serves honestly: they pass.
    request = chat(QUESTIONS[0], GREEDY)
    assert (await judge(auditor, request, await answer(cheat, request))).passed


async def test_penalised_answers_pass_and_one_that_ignored_the_penalties_is_caught(
    auditor: LlamaCppEngine,
) -> None:
    # Generation and scoring adjust the logits each on its own path
    # (inference/llamacpp.py:_generate and _score): they must agree, and an
    # audit must notice an answer drawn without what the request asked.
    extra = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": ((28, -100.0),)}
    for params in (GREEDY, SAMPLED):
        request = chat(QUESTIONS[2], replace(params, **extra), seed=3)  # type: ignore[arg-type]
        got = await answer(auditor, request)
        verdict = await judge(auditor, request, got)
        assert verdict.passed, verdict.measured()
        assert 28 not in got.commitment.token_ids
    penalised = chat(QUESTIONS[2], replace(GREEDY, **extra))  # type: ignore[arg-type]
    plain = await answer(auditor, chat(QUESTIONS[2], GREEDY))
    assert plain.text != (await answer(auditor, penalised)).text
    verdict = await judge(auditor, penalised, plain)
    assert not verdict.passed
    assert "greedy" in {f.check for f in verdict.findings}, verdict.measured()


async def test_answers_under_an_output_format_pass_and_one_drawn_without_it_is_caught(
    auditor: LlamaCppEngine,
) -> None:
    # The grammar masks what generation may draw (inference/llamacpp.py:_sample);
    # scoring must mask the same, position by position.
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    }
    fmt = Format(kind=JSON_SCHEMA, schema=json.dumps(schema))
    for params in (GREEDY, SAMPLED):
        request = chat("What is the weather in Rome?", replace(params, format=fmt), seed=5)
        got = await answer(auditor, request)
        assert json.loads(got.text)["unit"] in ("celsius", "fahrenheit")
        verdict = await judge(auditor, request, got)
        assert verdict.passed, verdict.measured()
    # An answer to the same question drawn without the format, claimed as
    # the formatted one: the audit sees tokens the grammar never allowed.
    request = chat("What is the weather in Rome?", replace(GREEDY, format=fmt))
    plain = await answer(auditor, chat("What is the weather in Rome?", GREEDY))
    with pytest.raises(ImpossibleAnswer):
        await judge(auditor, request, plain)
