"""The one sampler every p2pnode engine that runs a model uses (docs/protocols.md#sampling).

Why our own, and not llama.cpp's: an audit (``inference/audit.py``) must know
the exact distribution a provider was bound to draw each token from, so the
distribution is defined here, in a few lines, and not by whichever sampler
chain a llama.cpp build happens to run. Given the model's logits for the
next token (its raw scores, one per vocabulary entry):

- first the request's ``logit_bias`` is added to the logits, and each token
  already in the answer loses ``frequency_penalty`` for every time it
  appeared and ``presence_penalty`` once (OpenAI's definitions:
  :meth:`Sampler.adjust`); what follows works on the adjusted logits;
- ``temperature == 0``: greedy, the highest logit (the lowest id on a tie);
- otherwise the logits are divided by the temperature and softmaxed; the
  ``TOP_K`` most probable tokens are kept, then the fewest of those whose
  probability adds up to ``top_p``, then those at least ``MIN_P`` times as
  probable as the best; the kept probabilities are renormalised and one
  token is drawn with the request's seeded generator.

``TOP_K`` and ``MIN_P`` are llama-cpp-python's defaults, which the bundled
model's answers were tuned by; they are constants of the protocol, not
settings, so a provider cannot quietly widen them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

TOP_K: Final = 40
MIN_P: Final = 0.05

Logits = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Sampler:
    """What a request asks of the sampler (OpenAI's names and meanings)."""

    temperature: float
    top_p: float
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def adjusts(self) -> bool:
        """Whether :meth:`adjust` changes any logit."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def adjust(self, logits: Logits, counts: dict[int, int]) -> Logits:
        """The logits this sampler draws from, given how often each token id
        already appears in the answer (``counts``); ``logits`` itself untouched."""
        if not self.adjusts:
            return logits
        out = logits.astype(np.float32, copy=True)
        for token, bias in self.logit_bias:
            out[token] += bias
        if counts and (self.presence_penalty or self.frequency_penalty):
            ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            seen = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
            out[ids] -= seen * self.frequency_penalty + self.presence_penalty
        return out


@dataclass(frozen=True, slots=True)
class Kept:
    """The tokens a sampler may draw from one position, most probable first."""

    ids: npt.NDArray[np.int64]
    probs: npt.NDArray[np.float64]  # renormalised over ``ids``; sums to 1


def log_softmax_at(logits: Logits, token: int) -> float:
    """The model's own log-probability of ``token`` (temperature 1, nothing cut)."""
    top = float(logits.max())
    total = float(np.exp(logits - top, dtype=np.float64).sum())
    return float(logits[token]) - top - float(np.log(total))


def kept(logits: Logits, sampler: Sampler, *, top_k: int = TOP_K, min_p: float = MIN_P) -> Kept:
    """The tokens ``sampler`` may draw at this position, and their probabilities.

    Greedy keeps the one best token. Ties at the cut keep the lower ids.
    ``top_k`` and ``min_p`` other than the protocol's: an auditor's looser
    cut, so that numerical noise at the edges is not taken for a violation.
    """
    if sampler.greedy:
        return Kept(np.array([int(logits.argmax())]), np.array([1.0]))
    z = logits.astype(np.float64) / sampler.temperature
    k = min(top_k, z.size)
    top = np.argpartition(-z, k - 1)[:k]
    top = top[np.lexsort((top, -z[top]))]  # by probability, then by id
    peak = z[top[0]]
    full = np.exp(z - peak).sum()
    probs = np.exp(z[top] - peak) / full
    # The fewest whose mass reaches top_p (at least one), then the MIN_P floor.
    n = int(np.searchsorted(np.cumsum(probs), sampler.top_p * (1 - 1e-12))) + 1
    n = max(1, min(n, k))
    keep = probs[:n] >= min_p * probs[0]
    ids, probs = top[:n][keep], probs[:n][keep]
    return Kept(ids.astype(np.int64), probs / probs.sum())


def choose(logits: Logits, sampler: Sampler, rng: np.random.Generator) -> int:
    """The next token, drawn as the module docstring says."""
    if sampler.greedy:
        return int(logits.argmax())
    options = kept(logits, sampler)
    if options.ids.size == 1:
        return int(options.ids[0])
    # Inverse transform with one uniform per token: the audit's probability
    # integral transform is the same walk run backwards.
    at = int(np.searchsorted(np.cumsum(options.probs), rng.random(), side="right"))
    return int(options.ids[min(at, options.ids.size - 1)])
