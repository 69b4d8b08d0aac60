"""What this node offers others: its models, their measured speed and terms, its load.

The one place an offer's contents are put together (discovery signs and
sends it, the status protocol answers with it). Models come from the
engines (tokens/s measured at start) and then from configuration only (a
node may announce models for testing discovery); in paid mode each carries
the terms of this provider's bid (``p2p/market/billing.py:ProviderMarket.offer_terms``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import trio

from p2pnode.errors import EngineError
from p2pnode.inference.engine import Engine, Params, Request, tokens_per_second
from p2pnode.p2p import market as marketlib
from p2pnode.protocols import offers, status

logger = logging.getLogger(__name__)

MEASURE_PROMPT = "The history of the printing press"


class Offering:
    """The served models and load; ``changed()`` is told when the offer must go out again."""

    def __init__(
        self,
        engines: Sequence[Engine],
        announced: tuple[offers.ModelOffer, ...],
        *,
        market: marketlib.ProviderMarket | None,
        wallet: str | None,
        changed: Callable[[], None] = lambda: None,
        max_tokens_per_s: float = offers.Config().max_tokens_per_s,
    ) -> None:
        self.engines = list(engines)
        # The speed this node's own offer checks accept (as its peers' do).
        self._max_tokens_per_s = max_tokens_per_s
        self._market = market
        self._wallet = market.address if market is not None else wallet
        self.changed = changed
        # Set once :meth:`measure` has announced its figures (the CLI's progress).
        self.measured = trio.Event()
        # Served models first, then any announced by configuration only.
        self.models: tuple[offers.ModelOffer, ...] = (
            tuple(
                offers.ModelOffer(
                    model_id=m.model_id,
                    gguf_sha256=m.gguf_sha256,
                    context_length=m.context_length,
                    temperature=m.temperature,
                    top_p=m.top_p,
                    features=m.features,
                )
                for engine in self.engines
                for m in engine.models()
            )
            + announced
        )

    def model_ids(self) -> tuple[str, ...]:
        """The ids of the models this node announces, served ones first."""
        return tuple(m.model_id for m in self.models)

    def engine_for(self, model_id: str) -> Engine | None:
        """The engine that serves ``model_id`` here, if any."""
        for engine in self.engines:
            if any(m.model_id == model_id for m in engine.models()):
                return engine
        return None

    def load(self) -> status.Load:
        """Slots and queue over every engine, right now."""
        return status.Load(
            slots_total=sum(e.slots_total for e in self.engines),
            slots_free=sum(e.slots_free for e in self.engines),
            queue_len=sum(e.queue_len for e in self.engines),
        )

    def set_models(self, models: tuple[offers.ModelOffer, ...]) -> None:
        """Change what this node announces (with its bid terms); the offer goes out at once."""
        if self._market is not None:
            models = self._market.offer_terms(models)
        self.models = models
        self.changed()

    def terms_changed(self) -> None:
        """The provider's bids changed: the same models, new terms."""
        self.set_models(self.models)

    async def measure(self, max_tokens: int) -> None:
        """Measure each served model's generation speed and announce it.

        Tokens per second of generation proper (first token to last), from a
        short greedy completion; an engine that fails is logged and keeps 0.
        """
        measured = {}
        for engine in self.engines:
            for info in engine.models():
                request = Request(
                    model_id=info.model_id,
                    kind="completion",
                    prompt=MEASURE_PROMPT,
                    params=Params(max_tokens=max_tokens, temperature=0.0),
                )
                try:
                    measured[info.model_id] = await tokens_per_second(engine, request)
                except EngineError as exc:
                    logger.warning("cannot measure %s: %s", info.model_id, exc)
        # Peers drop a whole offer that claims more than their bound (as a
        # lie): an engine faster than that announces the bound, not nothing.
        bound = self._max_tokens_per_s
        for model_id, speed in measured.items():
            if speed > bound:
                logger.warning(
                    "%s measured %.0f tokens/s; announced as %.0f, what peers accept",
                    model_id, speed, bound,
                )  # fmt: skip
                measured[model_id] = bound
        self.set_models(
            tuple(
                replace(m, tokens_per_s=measured.get(m.model_id, m.tokens_per_s))
                for m in self.models
            )
        )
        self.measured.set()

    def offer(self, peer_id: str, addrs: Sequence[str]) -> offers.Offer | None:
        """The offer to announce now (unsigned: discovery sets seq, time and signature)."""
        if not self.models:
            return None
        load = self.load()
        return offers.Offer(
            peer_id=peer_id,
            addrs=tuple(addrs),
            models=self.models,
            slots_free=load.slots_free,
            queue_len=load.queue_len,
            seq=0,
            timestamp=0.0,
            wallet=self._wallet,
        )
