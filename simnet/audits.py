"""The audit scenario: honest providers and cheaters of every kind, real models throughout.

``p2pnode simnet --scenario audit`` (docs/architecture.md#audits). Two phases:

1. **Detection.** Consumers that audit every answer (rate 1) ask each
   provider directly, greedy and sampled requests alternating, every third
   one with a long prompt. Honest providers run the bundled model on one
   and two threads with one and two slots; each cheater kind
   (``simnet/cheaters.py``) is asked until it is caught or
   ``max_cheat_requests`` have been audited. Reports, per kind, how many
   audited requests it took; for the honest, how many audits passed (every
   failure is a false positive) and the noise floor they showed.
2. **Cost.** Fresh consumers at the default audit rate send
   ``cost_requests`` ordinary requests (ranked as usual, honest providers
   only); the auditors' scoring CPU time over the providers' generation CPU
   time is ``audit_cost_ratio``.
"""

from __future__ import annotations

import statistics
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from p2pnode.errors import P2PNodeError
from p2pnode.inference.engine import ChatMessage, Params, Request
from p2pnode.inference.llamacpp import (
    BUNDLED_MODEL_ID,
    Config,
    LlamaCppEngine,
    bundled_model_path,
    open_llamacpp,
)
from p2pnode.p2p import audit as auditlib
from p2pnode.p2p import host as hostlib
from p2pnode.p2p.node import Node, NodeConfig
from p2pnode.simnet.cheaters import KINDS, Cheater, degraded_copy, swap_model_path
from p2pnode.simnet.harness import start_node

# Honest providers: (llama.cpp threads, slots).
HONEST: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (2, 2))
QUESTIONS = (
    "Tell me a story about a dragon.",
    "Explain how a bicycle works.",
    "Write a short poem about the sea.",
    "What should I pack for a day at the beach?",
    "Describe a busy market in the morning.",
)
LONG = " ".join(
    f"On day {d} the traveller reached the village of {name}, where the baker sold {d + 2} loaves."
    for d, name in enumerate(("Amber", "Birch", "Cedar", "Dune", "Elm", "Fern", "Glen", "Heath"))
)


def request(n: int, max_tokens: int) -> Request:
    """The n-th request of a provider: greedy and sampled alternate, every third long."""
    question = QUESTIONS[n % len(QUESTIONS)]
    if n % 3 == 2:
        question = f"{LONG} Which village came first, and what did its baker sell?"
    sampled = n % 2 == 1
    params = Params(
        max_tokens=max_tokens,
        temperature=0.8 if sampled else 0.0,
        top_p=0.95,
        seed=n if sampled else None,
    )
    return Request(
        model_id=BUNDLED_MODEL_ID,
        kind="chat",
        messages=(ChatMessage(role="user", content=question),),
        params=params,
    )


async def _ignore(_text: str, _tokens: int) -> None:
    return None


async def audit_scenario(
    *,
    honest_requests: int = 60,
    max_cheat_requests: int = 20,
    cost_requests: int = 200,
    max_tokens: int = 24,
    workdir: Path,
    kinds: tuple[str, ...] = KINDS,
    honest_configs: tuple[tuple[int, int], ...] = HONEST,
    bound_s: float = 60.0,
) -> dict[str, Any]:
    """Run both phases (module docstring); ``workdir`` holds the degraded GGUF.

    ``kinds`` and ``honest_configs`` (threads, slots) narrow the cast (tests)."""
    errors: list[str] = []
    started = trio.current_time()
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        path = bundled_model_path()

        async def engine(file: Path, threads: int = 1, slots: int = 1, name: str = "") -> Any:
            cfg = Config(
                model_path=file, model_id=name or BUNDLED_MODEL_ID, n_threads=threads, slots=slots
            )
            return await stack.enter_async_context(open_llamacpp(cfg))

        vocab: LlamaCppEngine = await engine(path)
        info = vocab.models()[0]
        honest_engines = [await engine(path, t, s) for t, s in honest_configs]
        cheat_base = await engine(path)
        inner: dict[str, LlamaCppEngine] = {}
        if "model_swap" in kinds:
            gemma_file = await trio.to_thread.run_sync(swap_model_path)
            inner["model_swap"] = await engine(gemma_file, name="gemma")
        if "cheap_quant" in kinds:
            cheap_file = await trio.to_thread.run_sync(degraded_copy, path, workdir / "q4_0.gguf")
            inner["cheap_quant"] = await engine(cheap_file)
        cheaters = [Cheater(kind, inner.get(kind, cheat_base), info, vocab) for kind in kinds]

        seed = await start_node(nursery, NodeConfig(measure_tokens=0, audit=None))
        boot = (seed.node.addrs[0],)

        async def node(engines: list[Any], rate: float | None) -> Node:
            audit = None if rate is None else auditlib.Config(rate=rate)
            config = NodeConfig(measure_tokens=0, bootstrap=boot, audit=audit)
            running = await start_node(nursery, config, engines, key_pair=create_new_key_pair())
            return running.node

        honest = [await node([e], None) for e in honest_engines]
        cheats = [await node([c], None) for c in cheaters]
        auditors = [await node([], 1.0) for _ in range(2)]
        for consumer in auditors:
            await _know(consumer, honest + cheats, bound_s)

        # --- phase 1: detection --------------------------------------------------
        async def ask(consumer: Node, provider: Node, n: int) -> bool:
            try:
                with trio.fail_after(bound_s):
                    await consumer.generate(
                        request(n, max_tokens), _ignore, only=[provider.peer_id]
                    )
                return True
            except (P2PNodeError, trio.TooSlowError) as exc:
                if not _caught(consumer, provider):
                    errors.append(f"{provider.peer_id[-8:]}: {exc}")
                return False

        honest_sent = 0
        for n in range(honest_requests):
            for i, provider in enumerate(honest):
                consumer = auditors[(n + i) % 2]
                before = consumer.auditor.counters.audits  # type: ignore[union-attr]
                if await ask(consumer, provider, n):
                    honest_sent += 1
                    with trio.move_on_after(bound_s):
                        await consumer.auditor.wait_for(before + 1)  # type: ignore[union-attr]
        detected: dict[str, dict[str, Any]] = {}
        for kind, provider in zip(kinds, cheats, strict=True):
            consumer = auditors[0]
            auditor = consumer.auditor
            assert auditor is not None
            caught_at = None
            for n in range(1, max_cheat_requests + 1):
                before = auditor.counters.audits
                promises = consumer.consumer.counters.broken_promises
                await ask(consumer, provider, n)
                if consumer.consumer.counters.broken_promises > promises:
                    caught_at = n  # its commitment lied: refused on the spot
                    break
                with trio.move_on_after(bound_s):
                    await auditor.wait_for(before + 1)
                if _caught(consumer, provider):
                    caught_at = n
                    break
            detected[kind] = {
                "providers": 1,
                "caught": int(caught_at is not None),
                "requests_to_catch_median": caught_at,
                "finding": auditor.records.get(provider.peer_id, auditlib.Record()).caught
                or ("false commitment" if caught_at else ""),
            }
        honest_ids = {p.peer_id for p in honest}
        watchers = [c.auditor for c in auditors if c.auditor is not None]
        honest_records = [r for a in watchers for p, r in a.records.items() if p in honest_ids]
        honest_audits = sum(r.audits for r in honest_records)
        false_positives = sum(r.failed for r in honest_records)
        false_findings = sorted({r.caught for r in honest_records if r.caught})
        floor = _noise(watchers)
        engines = [*honest_engines, cheat_base, *inner.values()]
        per_answer = _per_answer_cost(auditors, engines)

        # --- phase 2: cost at the default rate -------------------------------------
        buyers = [await node([], auditlib.Config().rate) for _ in range(2)]
        for consumer in buyers:
            await _know(consumer, honest, bound_s)
        generation_before = sum(e.generation_cpu_s for e in honest_engines)
        cost_done = 0
        for n in range(cost_requests):
            consumer = buyers[n % 2]
            try:
                with trio.fail_after(bound_s):
                    await consumer.generate(
                        request(n, max_tokens), _ignore, only=[p.peer_id for p in honest]
                    )
                cost_done += 1
            except (P2PNodeError, trio.TooSlowError) as exc:
                errors.append(f"cost phase: {exc}")
        for consumer in buyers:
            assert consumer.auditor is not None
            with trio.move_on_after(bound_s):
                await consumer.auditor.drained()
        generation = sum(e.generation_cpu_s for e in honest_engines) - generation_before
        scoring = sum(c.auditor.scoring_s for c in buyers if c.auditor is not None)
        cost_audits = sum(c.auditor.counters.audits for c in buyers if c.auditor is not None)
        nursery.cancel_scope.cancel()
    return {
        "scenario": "audit",
        "honest_providers": [{"threads": t, "slots": s} for t, s in honest_configs],
        "honest_requests": honest_sent,
        "honest_audits": honest_audits,
        "false_positives": false_positives,
        "false_positive_findings": false_findings,
        "noise_floor": floor,
        "detected": detected,
        "all_caught": all(d["caught"] for d in detected.values()),
        "audit_rate": auditlib.Config().rate,
        "cost_requests": cost_done,
        "cost_audits": cost_audits,
        "audit_cost_ratio": round(scoring / generation, 4) if generation else None,
        "audit_cost_per_answer_ratio": per_answer,
        "elapsed_s": round(trio.current_time() - started, 1),
        "errors": errors,
    }


def _caught(consumer: Node, provider: Node) -> bool:
    return consumer.auditor is not None and consumer.auditor.is_caught(provider.peer_id)


async def _know(consumer: Node, providers: list[Node], bound_s: float) -> None:
    """Connect ``consumer`` to each provider and hold its offer (no waiting for gossip)."""
    with trio.fail_after(bound_s):
        for p in providers:
            await consumer.host.connect(hostlib.parse_peer_addr(p.addrs[0]))
            while consumer.offer_book.get(p.peer_id) is None:
                await consumer.finder.refresh_offer(p.peer_id)


def _noise(auditors: list[auditlib.Auditor]) -> dict[str, float]:
    """The worst each figure got in audits that passed: the honest noise floor."""
    passed = [a for auditor in auditors for a in auditor.passed_figures]
    if not passed:
        return {}
    return {
        "logprob_mean_diff_max": round(max(p[0] for p in passed), 4),
        "logprob_mean_diff_median": round(statistics.median(p[0] for p in passed), 4),
        "logprob_max_diff_max": round(max(p[1] for p in passed), 4),
        "greedy_gap_max": round(max(p[2] for p in passed), 4),
    }


def _per_answer_cost(auditors: list[Node], engines: list[LlamaCppEngine]) -> float | None:
    """Scoring CPU over generation CPU in phase 1, where every answer was audited."""
    generation = sum(e.generation_cpu_s for e in engines)
    scoring = sum(c.auditor.scoring_s for c in auditors if c.auditor is not None)
    return round(scoring / generation, 4) if generation else None


__all__ = ["audit_scenario"]
