"""Audits: did a provider run the model it sells? (docs/architecture.md#audits)

A provider commits, under its signature, to what it did for each request:
the GGUF's sha256, the request it received, every token id it generated and
the model's log-probability of each (``Commitment``). An auditor holding the
same GGUF scores the prompt and those ids in one batched prefill
(:meth:`LlamaCppEngine.score`: far cheaper than generating them) and
:func:`audit` compares:

- the **text**: the answer delivered must be the text of the ids (a provider
  that splices in text of its own without ids for it is caught here);
- the **usage**: prompt tokens recounted from the request, completion tokens
  from the ids;
- the **log-probabilities**: a provider's own must match the auditor's within
  the numerical noise between llama.cpp's one-token and batched paths, which
  we measured (README, "Trust"): another model, a cheaper quant or a
  truncated prompt computes other ones;
- at temperature 0, **every token the model's choice**, up to a gap no honest
  run comes near;
- at temperature > 0, **every token one the sampler could draw**
  (``inference/sampling.py``) and the draws **distributed as the sampler's
  distribution says**: each sampled token's randomised probability integral
  transform is uniform on [0, 1] under honest sampling, so a
  Kolmogorov–Smirnov test over a provider's pooled transforms
  (:class:`PitPool`, across requests) has a false-positive rate we choose
  (``Limits.ks_alpha``). Sampling hotter or with a wider top-p than asked
  skews it.

Pure: the caller scores, the module judges. Every threshold is in
:class:`Limits`, with the measurement it came from.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field, fields
from typing import Final

from scipy import stats

from p2pnode.errors import EngineError
from p2pnode.protocols.infer.messages import PAUSED, Commitment, Scored


@dataclass(frozen=True, slots=True)
class Scores:
    """What the model says of tokens someone else generated (teacher-forced).

    Per token: the model's log-probability (temperature 1, as a provider
    commits it), the gap to the best token's (0 when it is the model's
    choice), and under the request's sampler whether the token was one it
    may draw (``kept``), the probability of the tokens before it in the
    sampler's order (``below``) and its own (``prob``): the pieces of the
    probability integral transform (``inference/audit.py``). ``possible``:
    whether the token is within a looser cut (``LOOSER_*``): one outside it
    no honest draw of the sampler, numerical noise included, could give.
    """

    logprobs: tuple[float, ...]
    gaps: tuple[float, ...]
    kept: tuple[bool, ...]
    below: tuple[float, ...]
    prob: tuple[float, ...]
    possible: tuple[bool, ...]
    prompt_tokens: int  # the prompt (with any continuation) as the model's tokens
    text: str  # what the tokens stand for (:func:`token_text`)
    ends_with_eog: bool  # the last token is one that ends generation (not usage)
    cpu_s: float = 0.0  # the scoring thread's CPU time


# What travels in Scored: every field of Scores but the log-probabilities,
# which the commitment carries beside it.
_SCORED: Final = tuple(f.name for f in fields(Scores) if f.name != "logprobs")


def scored_of(scores: Scores) -> Scored:
    """``scores`` as an auditor sends them back (docs/protocols.md#score-requests)."""
    return Scored(**{name: getattr(scores, name) for name in _SCORED})


def scores_of(commitment: Commitment, scored: Scored) -> Scores:
    """What a remote auditor measured, from its commitment (checked first)."""
    logprobs = tuple(lp / 1000 for lp in commitment.logprobs)
    return Scores(logprobs=logprobs, **{name: getattr(scored, name) for name in _SCORED})


CUT: Final = "cut"
"""Finish reason of an answer its provider never finished (a failover cut it
short): audited as far as it was streamed, with no usage claim to check."""


# The looser cut a sampled token must fall within (``Scores.possible``): the
# protocol's TOP_K, top_p and MIN_P cut where probabilities are compared, and
# the auditor's probabilities differ from the provider's by the noise above
# (a few percent each): a token at the edge of the provider's nucleus can be
# just past the auditor's. Measured: with the protocol's own cut, 1 honest
# answer in ~36 had a token "outside"; with this one, none in the scenario.
LOOSER_TOP_K: Final = 48
LOOSER_TOP_P: Final = 0.05  # added to the request's top_p
LOOSER_MIN_P: Final = 0.02


class ImpossibleAnswer(EngineError):  # noqa: N818 - a verdict on the answer, not our failure
    """The answer has what no run of the model can give (ids outside its
    vocabulary): the provider's fault. Any other scoring failure is the
    auditor's (busy, a smaller context, a llama.cpp error) and judges nobody."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Where honest noise ends (measured with ``p2pnode simnet --scenario audit``)."""

    # |claimed - measured| log-probability, nats. Honest: mean 0.02-0.07 and
    # max <= 0.35 over answers of 64 tokens across 1 and 2 threads; a Q4_0
    # copy of the Q4_1 model: mean 0.37-1.15, max 2-11.
    logprob_mean: float = 0.15
    logprob_max: float = 1.5
    # Means of fewer tokens than this say little (one noisy token dominates).
    logprob_min_tokens: int = 8
    # Greedy: how far (in logits) a token may fall short of the best one.
    # Honest: <= 0.14; the Q4_0 copy's first divergence: 2-8.
    greedy_gap: float = 1.0
    # The Kolmogorov-Smirnov test of a provider's pooled transforms: rejected
    # below this p-value (it is tested after every audit: the bound keeps the
    # false positives of a thousand looks near 1e-3).
    ks_alpha: float = 1e-6
    ks_min: int = 64
    pool: int = 4096


@dataclass(frozen=True, slots=True)
class Finding:
    """One check an answer failed."""

    check: str  # "text", "usage", "weights", "logprobs", "greedy", "sampling"
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """What one audit found, and what it measured (kept as evidence on failure)."""

    findings: tuple[Finding, ...]
    tokens: int
    logprob_mean_diff: float
    logprob_max_diff: float
    greedy_worst_gap: float
    outside: int  # sampled tokens the sampler could not have drawn
    pits: tuple[float, ...]  # the sampled tokens' transforms, for the provider's pool
    logprobs: tuple[float, ...] = ()  # the model's, per token (the claimed are signed)

    @property
    def passed(self) -> bool:
        return not self.findings

    def measured(self) -> dict[str, object]:
        """The figures, as evidence (JSON-ready)."""
        return {
            "findings": [f"{f.check}: {f.detail}" for f in self.findings],
            "tokens": self.tokens,
            "logprob_mean_diff": round(self.logprob_mean_diff, 4),
            "logprob_max_diff": round(self.logprob_max_diff, 4),
            "greedy_worst_gap": round(self.greedy_worst_gap, 4),
            "outside": self.outside,
            "logprobs": [round(lp, 4) for lp in self.logprobs],
        }


def audit(
    commitment: Commitment,
    *,
    weights: str,
    temperature: float,
    stops: tuple[str, ...],
    delivered: str,
    finish_reason: str,
    scores: Scores,
    limits: Limits = Limits(),
    rng: random.Random | None = None,
) -> Audit:
    """Judge one answer: ``commitment`` as signed, ``delivered`` the text it streamed,
    ``scores`` the auditor's teacher-forced scoring of its ids under the GGUF
    ``weights`` (sha256) with the request's sampler (``temperature``)."""
    findings: list[Finding] = []
    ids = commitment.token_ids
    if commitment.gguf_sha256 != weights:
        findings.append(Finding("weights", "committed to other weights than the audited"))
    # Text: what it streamed is the ids' text; past it only what a stop string cut.
    rest = scores.text[len(delivered) :] if scores.text.startswith(delivered) else None
    if rest is None:
        findings.append(Finding("text", "the text streamed is not the text of its token ids"))
    elif rest and not (finish_reason == "stop" and stops):
        findings.append(Finding("text", f"{len(rest)} characters of its ids were never streamed"))
    # Usage, recounted.
    completion = len(ids) - int(scores.ends_with_eog)
    if commitment.completion_tokens != completion:
        findings.append(
            Finding(
                "usage", f"claims {commitment.completion_tokens} tokens, generated {completion}"
            )
        )
    # A paused answer (paid: acknowledged mid-way) bills no prompt: its Done says 0.
    if commitment.prompt_tokens != scores.prompt_tokens and finish_reason not in (PAUSED, CUT):
        findings.append(
            Finding(
                "usage",
                f"claims a prompt of {commitment.prompt_tokens} tokens, "
                f"it is {scores.prompt_tokens}",
            )
        )
    # Log-probabilities, the provider's against the model's.
    diffs = [abs(c / 1000 - m) for c, m in zip(commitment.logprobs, scores.logprobs, strict=True)]
    mean_diff = sum(diffs) / len(diffs) if diffs else 0.0
    max_diff = max(diffs, default=0.0)
    if max_diff > limits.logprob_max or (
        len(diffs) >= limits.logprob_min_tokens and mean_diff > limits.logprob_mean
    ):
        findings.append(
            Finding(
                "logprobs",
                f"its log-probabilities differ from the model's by {mean_diff:.3f} on "
                f"average, {max_diff:.3f} at most",
            )
        )
    worst_gap = max(scores.gaps, default=0.0)
    outside = 0
    pits: list[float] = []
    if temperature <= 0:
        if worst_gap > limits.greedy_gap:
            at = scores.gaps.index(worst_gap)
            findings.append(
                Finding("greedy", f"token {at} is {worst_gap:.2f} logits below the model's choice")
            )
    else:
        # The auditor's own randomness: a provider that could predict it could
        # pick its tokens to look uniform.
        draw = rng or random.SystemRandom()
        for kept, below, prob, possible in zip(
            scores.kept, scores.below, scores.prob, scores.possible, strict=True
        ):
            if kept:
                pits.append(below + draw.random() * prob)
            elif not possible:
                outside += 1
        if outside:
            findings.append(
                Finding("sampling", f"{outside} tokens the requested sampler could not draw")
            )
    return Audit(
        findings=tuple(findings),
        tokens=len(ids),
        logprob_mean_diff=mean_diff,
        logprob_max_diff=max_diff,
        greedy_worst_gap=worst_gap,
        outside=outside,
        pits=tuple(pits),
        logprobs=scores.logprobs,
    )


@dataclass
class PitPool:
    """A provider's sampled tokens' transforms, pooled across its audited answers."""

    limits: Limits = field(default_factory=Limits)
    values: collections.deque[float] = field(default_factory=collections.deque)

    def add(self, pits: tuple[float, ...]) -> None:
        self.values.extend(pits)
        while len(self.values) > self.limits.pool:
            self.values.popleft()

    def _with(self, extra: tuple[float, ...]) -> list[float]:
        return [*self.values, *extra][-self.limits.pool :]

    def p_value(self, extra: tuple[float, ...] = ()) -> float | None:
        """The KS test's p-value of uniformity, with ``extra`` draws not yet added
        (None: too few draws to say)."""
        values = self._with(extra)
        if len(values) < self.limits.ks_min:
            return None
        return float(stats.kstest(values, "uniform").pvalue)

    def finding(self, extra: tuple[float, ...] = ()) -> Finding | None:
        """The pool's verdict were ``extra`` added (an answer whose audit is not
        settled yet: its draws join the pool only once it is)."""
        p = self.p_value(extra)
        if p is None or p >= self.limits.ks_alpha:
            return None
        return Finding(
            "sampling",
            f"its draws are not the requested distribution (KS p = {p:.1e} over "
            f"{len(self._with(extra))} tokens)",
        )
