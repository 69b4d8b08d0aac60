"""Who audits which answers, and what follows (docs/architecture.md#audits).

Theory of operation. After each answer a provider finished for us, the
consumer hands its Done (the signed commitment), the request it sent and
the text it received to :meth:`Auditor.consider`. The first answer of every
provider we have not audited yet is audited, and each later one with
probability ``rate``. Who scores it: this node when it holds the GGUF the
commitment names (one of its own engines, or the bundled model), else
another provider of that GGUF, never the audited one, through a score
request it is paid for (:class:`RemoteScorer`, ``Consumer.score_on``). A
remote auditor's finding counts only once a second one (another peer and
wallet) confirms it. The audit runs in the auditor's own task after the
answer was delivered, so it never slows the user's stream; at most
``max_pending`` wait (more are skipped and counted).

:func:`p2pnode.inference.audit.audit` judges each answer; a provider's
sampled draws are pooled across its answers (:class:`PitPool`). Each
provider's record (audits, passed, failed, and what caught it) is kept in
``audits.json`` in the node's home across restarts. A provider that fails is
caught for good: the consumer stops asking it (and, paid, closes its
session at once and keeps the signed evidence in ``sessions.db``), through
the ``caught`` callback.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from p2pnode.errors import EngineError
from p2pnode.inference import engine as enginelib
from p2pnode.inference.audit import (
    Audit,
    Finding,
    ImpossibleAnswer,
    Limits,
    PitPool,
    Scores,
    audit,
)
from p2pnode.p2p.host import short
from p2pnode.protocols.infer.messages import Done, Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # Share of answers audited beyond each provider's first (--audit-rate).
    rate: float = 0.05
    # Whether other providers of the weights may audit (they see the prompt and
    # the answer); False: only with weights this node holds (--no-remote-audits).
    remote: bool = True
    # Audits waiting to run; more are skipped (counted), never queued without end.
    max_pending: int = 8
    limits: Limits = field(default_factory=Limits)
    # Where the providers' records are kept (None: memory only).
    path: Path | None = None
    # Providers remembered; the least audited are forgotten first (never a caught one
    # before the clean ones).
    max_providers: int = 10_000


class Scorer(Protocol):
    """An engine that can score answers (``LlamaCppEngine``)."""

    def models(self) -> list[enginelib.ModelInfo]: ...

    async def score(self, request: enginelib.Request, token_ids: Sequence[int]) -> Scores: ...


@dataclass
class Record:
    """What audits found of one provider."""

    audits: int = 0
    passed: int = 0
    failed: int = 0
    answers: int = 0  # its answers we could have audited (the first included)
    caught: str = ""  # the finding that caught it ("" while it never failed)
    caught_after: int = 0  # audits it took

    @property
    def score(self) -> float | None:
        """Share of audits passed (None: never audited)."""
        return self.passed / self.audits if self.audits else None


@dataclass(frozen=True, slots=True)
class Job:
    """One answer to audit."""

    peer: str
    wire: Request  # the request as sent (its continuation included)
    done: Done
    delivered: str  # the text this provider streamed for it


@dataclass
class Counters:
    audits: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0  # chosen, but the queue was full
    unauditable: int = 0  # no GGUF of ours matches the commitment
    errors: int = 0  # the scorer failed (ids outside the vocabulary count as failed)
    remote: int = 0  # answers scored by another provider (a score request)
    unconfirmed: int = 0  # a remote finding no second auditor could check
    disputed: int = 0  # two auditors disagreed and no third could decide
    outvoted: int = 0  # an auditor two others contradicted


Caught = Callable[[Job, Audit], Awaitable[None]]
Misled = Callable[[str], Awaitable[None]]
"""Told the peer of an auditor two others contradicted."""

# Sampled-draw pools kept per provider, one per auditor that scored it.
MAX_POOLS: Final = 8
# A provider's answers audited for sure until one audit of it settles.
FIRST_TRIES: Final = 3
ScorerSource = Callable[
    [str, frozenset[str], AsyncExitStack, frozenset[str]], Awaitable[Scorer | None]
]
"""``(sha256, peers, stack, needs)``: an engine holding that GGUF (opened on
``stack`` if it must be), or a :class:`RemoteScorer` that is none of ``peers``
and offers the features ``needs`` names, or None."""

Ask = Callable[[str, str, enginelib.Request, Sequence[int]], Awaitable[Scores]]
"""``(peer, model_id, request, ids)``: that provider's scores of ``ids`` as its
model's answer to ``request`` (``Consumer.score_on``)."""


@dataclass(frozen=True, slots=True)
class RemoteScorer:
    """Another provider of the same GGUF, scoring through a score request
    (docs/protocols.md#score-requests): paid for it like for any request."""

    peer: str
    model: enginelib.ModelInfo  # its name for the weights
    ask: Ask

    def models(self) -> list[enginelib.ModelInfo]:
        return [self.model]

    async def score(self, request: enginelib.Request, token_ids: Sequence[int]) -> Scores:
        return await self.ask(self.peer, self.model.model_id, request, token_ids)


class Auditor:
    """Audits a share of the answers providers give this node."""

    def __init__(
        self,
        cfg: Config,
        scorers: ScorerSource,
        caught: Caught,
        rng: random.Random | None = None,
        misled: Misled | None = None,
    ) -> None:
        self.cfg = cfg
        self._scorers = scorers
        self._caught = caught
        self._misled = misled or _nobody
        self._rng = rng or random.Random()  # noqa: S311 - which answers, not secrets
        self.records: dict[str, Record] = self._load()
        self._pools: dict[str, dict[str, PitPool]] = {}
        self._send, self._jobs = trio.open_memory_channel[Job](cfg.max_pending)
        self.counters = Counters()
        self._progress = trio.Event()  # set (and replaced) after each audit
        self._queued = 0  # audits queued and not yet done
        # (logprob mean diff, max diff, greedy gap: 0 if sampled) of recent audits that passed:
        # the honest noise floor as this node measures it.
        self.passed_figures: collections.deque[tuple[float, float, float]] = collections.deque(
            maxlen=4096
        )
        # Engines opened for audits live as long as run() (or the caller's stack).
        self._stack = AsyncExitStack()
        # CPU time spent scoring, for the audit-cost figures.
        self.scoring_s = 0.0

    async def drained(self) -> None:
        """Until every audit queued so far is done."""
        while self._queued:
            await self._progress.wait()

    async def wait_for(self, audits: int) -> None:
        """Until ``audits`` audits have been done in all (reports, tests)."""
        while self.counters.audits < audits:
            await self._progress.wait()

    def summary(self) -> dict[str, int]:
        """This node's audits in figures (the status output): records kept across
        restarts, counters since start."""
        records = self.records.values()
        return {
            "providers_audited": sum(1 for r in records if r.audits),
            "providers_caught": sum(1 for r in records if r.caught),
            "audits": sum(r.audits for r in records),
            "passed": sum(r.passed for r in records),
            "remote": self.counters.remote,
            "disputed": self.counters.disputed,
            "unconfirmed": self.counters.unconfirmed,
            "unauditable": self.counters.unauditable,
        }

    def is_caught(self, peer: str) -> bool:
        record = self.records.get(peer)
        return record is not None and bool(record.caught)

    def consider(self, job: Job, *, always: bool = False) -> bool:
        """Audit ``job`` later if it is chosen (``always``: it is); True if it was
        queued."""
        commitment = job.done.receipt.commitment
        # Text with no ids for it is audited too (it fails on "text"): a
        # provider cannot dodge audits by committing to nothing.
        if commitment is None or not commitment.gguf_sha256:
            return False
        if not commitment.token_ids and not job.delivered:
            return False
        record = self._record(job.peer)
        record.answers += 1
        if record.caught:
            return False
        # Its first answers until one was audited: an audit that came to
        # nothing (no auditor, a dispute) does not spare it to the rate.
        first = record.audits == 0 and record.answers <= FIRST_TRIES
        if not (first or always) and self._rng.random() >= self.cfg.rate:
            return False
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            self.counters.skipped += 1
            return False
        self._queued += 1
        return True

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the audits ``consider`` queues, one at a time, until cancelled.

        An audit that fails in a way we did not foresee is logged and counted:
        it runs on a stranger's answer, and must never take the node down.
        """
        async with AsyncExitStack() as stack:
            self._stack = stack
            task_status.started()
            async for job in self._jobs:
                try:
                    await self.audit(job)
                except Exception:  # noqa: BLE001 - see the docstring
                    self.counters.errors += 1
                    logger.exception("audit of %s failed", short(job.peer))
                finally:
                    self._queued -= 1
                    self._progress.set()
                    self._progress = trio.Event()

    async def audit(self, job: Job) -> Audit | None:
        """Audit one answer now (None: nobody could judge it; see the counters).

        A remote auditor's word settles nothing alone (docs/architecture.md#audits):
        a finding is confirmed by a second auditor (another peer and wallet)
        before the provider is caught, and when the second finds nothing a
        third decides; the auditor it outvotes is told to the consumer
        (``misled``), which counts it against that auditor.
        """
        commitment = job.done.receipt.commitment
        assert commitment is not None
        ids = commitment.token_ids
        # What no honest run gives, caught before any scoring work (and without
        # the weights): a log-probability short for some ids (the consumer
        # checked this only where the offer names its weights), or more ids
        # than were asked for.
        bad = (
            "a log-probability is missing for some token ids"
            if len(commitment.logprobs) != len(ids)
            else f"{len(ids)} token ids for at most {job.wire.max_tokens} tokens"
            if len(ids) > job.wire.max_tokens + 1
            else None
        )
        pool_of = ""  # whose sampled draws the settled verdict joins ("": ours)
        if bad:
            verdict = _unscorable(bad, len(ids))
        else:
            first = await self._opinion(job, frozenset({job.peer}))
            if first is None:
                return None
            by, verdict = first
            pool_of = by
            if by and not verdict.passed:
                settled = await self._confirm(job, by, verdict)
                if settled is None:
                    return None
                pool_of, verdict = settled
        self._pool(job.peer, pool_of).add(verdict.pits)
        record = self._record(job.peer)
        record.audits += 1
        self.counters.audits += 1
        if verdict.passed:
            record.passed += 1
            self.counters.passed += 1
            greedy_gap = verdict.greedy_worst_gap if job.wire.temperature <= 0 else 0.0
            self.passed_figures.append(
                (verdict.logprob_mean_diff, verdict.logprob_max_diff, greedy_gap)
            )
        else:
            record.failed += 1
            self.counters.failed += 1
            if not record.caught:
                record.caught = f"{verdict.findings[0].check}: {verdict.findings[0].detail}"
                record.caught_after = record.audits
            logger.warning(
                "audit: provider %s did not run %s as asked (%s)",
                short(job.peer), job.wire.model_id, record.caught,
            )  # fmt: skip
        self.save()
        try:
            if not verdict.passed:
                await self._caught(job, verdict)
        finally:
            self._progress.set()
            self._progress = trio.Event()
        return verdict

    async def _opinion(self, job: Job, peers: frozenset[str]) -> tuple[str, Audit] | None:
        """A verdict on ``job`` by a scorer that is none of ``peers``: (the remote
        auditor's peer, "" for ours; its verdict), or None when nobody could
        give one. A remote auditor that gives none is replaced once."""
        commitment = job.done.receipt.commitment
        assert commitment is not None
        for attempt in range(2):
            needs = enginelib.from_wire(job.wire).params.needs()
            scorer = await self._scorers(commitment.gguf_sha256, peers, self._stack, needs)
            if scorer is None:
                if attempt == 0:
                    self.counters.unauditable += 1
                return None
            by = scorer.peer if isinstance(scorer, RemoteScorer) else ""
            verdict = await self._judge(job, scorer, self._pool(job.peer, by))
            if verdict is not None:
                return by, verdict
            if not by:
                return None
            peers |= {by}
        return None

    async def _confirm(self, job: Job, by: str, found: Audit) -> tuple[str, Audit] | None:
        """Settle remote auditor ``by``'s finding ``found``: (whose pool the settled
        verdict joins, the verdict), or None if it cannot be settled."""
        second = await self._opinion(job, frozenset({job.peer, by}))
        if second is not None and not second[1].passed:
            return second  # confirmed
        if second is None:
            self.counters.unconfirmed += 1
            then = "no second auditor could check it"
        else:
            # One of the two is wrong: a third decides, and the one it
            # outvotes is told.
            other = second[0]
            third = await self._opinion(job, frozenset({job.peer, by, other}))
            if third is not None:
                outvoted = by if third[1].passed else other
                self.counters.outvoted += 1
                logger.warning(
                    "audit: auditor %s outvoted on %s's answer", short(outvoted), short(job.peer)
                )
                await self._misled(outvoted)
                return third
            self.counters.disputed += 1
            then = "a second auditor found nothing and no third could decide"
        logger.warning(
            "audit: auditor %s found that %s did not run %s (%s); %s: not caught",
            short(by), short(job.peer), job.wire.model_id, found.findings[0], then,
        )  # fmt: skip
        return None

    def _pool(self, provider: str, auditor: str) -> PitPool:
        """The provider's sampled draws as ``auditor`` ("": this node) scored them:
        one pool per auditor, so that a lying one cannot tilt the others' test."""
        pools = self._pools.setdefault(provider, {})
        pool = pools.get(auditor)
        if pool is None:
            pool = pools[auditor] = PitPool(self.cfg.limits)
            while len(pools) > MAX_POOLS:
                pools.pop(next(iter(pools)))
        return pool

    async def _judge(self, job: Job, scorer: Scorer, pool: PitPool) -> Audit | None:
        """``job`` as ``scorer`` scores it (None: it could not say)."""
        commitment = job.done.receipt.commitment
        assert commitment is not None
        request = enginelib.from_wire(job.wire, scorer.models()[0].model_id)
        ids = commitment.token_ids
        remote = isinstance(scorer, RemoteScorer)
        try:
            if remote:
                self.counters.remote += 1
            scores = await scorer.score(request, ids)
        except ImpossibleAnswer as exc:
            # No honest run of this GGUF gives it: the provider's doing (a
            # remote auditor's word for it is confirmed like any finding).
            verdict = _unscorable(str(exc), len(ids))
        except EngineError as exc:
            # Ours (busy, a smaller context than the provider's, llama.cpp),
            # or the remote auditor's: it judges nobody.
            self.counters.errors += 1
            logger.info("audit of %s not done: %s", short(job.peer), exc)
            return None
        else:
            if not remote:
                self.scoring_s += scores.cpu_s
            verdict = audit(
                commitment,
                weights=commitment.gguf_sha256,
                temperature=job.wire.temperature,
                stops=job.wire.stop,
                delivered=job.delivered,
                finish_reason=job.done.finish_reason,
                scores=scores,
                limits=self.cfg.limits,
            )
        pooled = pool.finding(verdict.pits)
        if pooled is not None:
            verdict = dataclasses.replace(verdict, findings=(*verdict.findings, pooled))
        return verdict

    def _record(self, peer: str) -> Record:
        record = self.records.get(peer)
        if record is None:
            record = self.records[peer] = Record()
            if len(self.records) > self.cfg.max_providers:
                # Forget the least telling: never caught, fewest audits.
                forget = min(
                    (p for p in self.records if p != peer),
                    key=lambda p: (bool(self.records[p].caught), self.records[p].audits),
                )
                del self.records[forget]
                self._pools.pop(forget, None)
        return record

    def _load(self) -> dict[str, Record]:
        path = self.cfg.path
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
            return {str(peer): Record(**fields) for peer, fields in data.items()}
        except (ValueError, TypeError, OSError) as exc:
            logger.warning("audit records in %s unreadable, starting afresh: %s", path, exc)
            return {}

    def save(self) -> None:
        """Write the records to ``cfg.path`` (after each audit; atomically)."""
        path = self.cfg.path
        if path is None:
            return
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({p: asdict(r) for p, r in self.records.items()}))
        os.replace(partial, path)


def local_scorers(engines: Sequence[object]) -> ScorerSource:
    """Scorers from what this node holds: its own llama.cpp engines, else the
    bundled model (loaded on the first audit that needs it, one slot)."""
    opened: dict[str, Scorer] = {}
    bundled: list[str] = []  # its sha256, once hashed

    async def scorer_for(
        sha: str, _peers: frozenset[str], stack: AsyncExitStack, _needs: frozenset[str]
    ) -> Scorer | None:
        # (Every llama.cpp engine has every feature a request may need.)
        for engine in engines:
            if hasattr(engine, "score") and any(m.gguf_sha256 == sha for m in engine.models()):  # type: ignore[attr-defined]
                return engine  # type: ignore[return-value]
        if sha in opened:
            return opened[sha]
        from p2pnode.inference import llamacpp

        try:
            path = llamacpp.bundled_model_path()
        except Exception:  # noqa: BLE001 - no bundled model: nothing to audit with
            return None
        if not bundled:
            bundled.append(await trio.to_thread.run_sync(llamacpp.file_sha256, path))
        if sha != bundled[0]:
            return None
        cfg = llamacpp.Config(
            model_path=path, model_id=llamacpp.BUNDLED_MODEL_ID, slots=1, n_threads=1
        )
        opened[sha] = await stack.enter_async_context(llamacpp.open_llamacpp(cfg))
        return opened[sha]

    return scorer_for


def either(*sources: ScorerSource) -> ScorerSource:
    """The first of ``sources`` that has a scorer (this node's own engines
    before a remote auditor: they cost nothing and cannot lie)."""

    async def scorer_for(
        sha: str, peers: frozenset[str], stack: AsyncExitStack, needs: frozenset[str]
    ) -> Scorer | None:
        for source in sources:
            scorer = await source(sha, peers, stack, needs)
            if scorer is not None:
                return scorer
        return None

    return scorer_for


async def _nobody(_peer: str) -> None:
    return None


def _unscorable(why: str, tokens: int) -> Audit:
    return Audit(
        findings=(Finding("ids", why),),
        tokens=tokens,
        logprob_mean_diff=0.0,
        logprob_max_diff=0.0,
        greedy_worst_gap=0.0,
        outside=0,
        pits=(),
    )
