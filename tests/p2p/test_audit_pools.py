"""A remote auditor's sampled-draw transforms stay in its own pool: one that lies
about them cannot tilt the test another auditor's verdict is judged by
(p2p/audit.py:Auditor._pool; docs/architecture.md#audits)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from p2pnode.inference.audit import Scores
from p2pnode.inference.engine import ModelInfo
from p2pnode.inference.engine import Request as EngineRequest
from p2pnode.p2p import audit as auditlib
from p2pnode.protocols.infer.messages import Commitment, Done, Receipt, Request, request_hash

WEIGHTS = "ab" * 32
IDS = tuple(range(1, 9))
WIRE = Request(
    request_id="r", model_id="m", kind="completion", prompt="hi", max_tokens=8, temperature=0.8
)


def job() -> auditlib.Job:
    commitment = Commitment(
        request_hash=request_hash(WIRE),
        gguf_sha256=WEIGHTS,
        prompt_tokens=3,
        completion_tokens=len(IDS),
        token_ids=IDS,
        logprobs=(-1000,) * len(IDS),
    )
    receipt = Receipt(
        session_id=b"s", requests=1, prompt_tokens=3, completion_tokens=len(IDS),
        commitment=commitment,
    )  # fmt: skip
    done = Done(finish_reason="length", prompt_tokens=3, completion_tokens=8, receipt=receipt)
    return auditlib.Job("provider", WIRE, done, "x" * len(IDS))


def scores(below: Sequence[float], prob: float) -> Scores:
    n = len(IDS)
    return Scores(
        logprobs=(-1.0,) * n,
        gaps=(0.0,) * n,
        kept=(True,) * n,
        below=tuple(below),
        prob=(prob,) * n,
        possible=(True,) * n,
        prompt_tokens=3,
        text="x" * n,
        ends_with_eog=False,
    )


async def test_a_liars_pool_cannot_get_an_honest_provider_caught() -> None:
    rng = random.Random(7)
    asked: list[str] = []

    async def ask(peer: str, _model: str, _request: EngineRequest, _ids: Sequence[int]) -> Scores:
        asked.append(peer)
        if peer == "liar":  # every draw at the very bottom of the distribution
            return scores([0.0] * len(IDS), 0.01)
        return scores([rng.uniform(0.0, 0.9) for _ in IDS], 0.1)

    info = ModelInfo(model_id="m", gguf_sha256=WEIGHTS)

    async def scorers(
        _sha: str, peers: frozenset[str], _stack: object, _needs: object
    ) -> auditlib.Scorer | None:
        for peer in ("liar", "honest"):  # the liar whenever it may
            if peer not in peers:
                return auditlib.RemoteScorer(peer, info, ask)
        return None

    async def on_caught(_job: auditlib.Job, _verdict: object) -> None:
        raise AssertionError("nobody is caught")

    auditor = auditlib.Auditor(auditlib.Config(rate=1.0), scorers, on_caught)
    limits = auditor.cfg.limits
    audits = limits.ks_min // len(IDS)
    for _ in range(audits - 1):  # each answer alone passes: its few draws say little
        verdict = await auditor.audit(job())
        assert verdict is not None
        assert verdict.passed
    # The liar's own pool now fails the test; the honest auditor, judging by
    # its own draws only, finds nothing, and no third one decides.
    assert await auditor.audit(job()) is None
    assert asked == ["liar"] * audits + ["honest"]
    assert (auditor.counters.disputed, auditor.counters.passed) == (1, audits - 1)
    assert not auditor.is_caught("provider")
