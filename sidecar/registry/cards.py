"""etcd -> the card index: every agent's A2A card under ``{prefix}/cards/``, through one PrefixWatch.

A card that does not parse or is larger than ``a2a.max_card_bytes`` is left out
with a log line and a metric; the agent it belongs to stays registered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..cards import CardIndex, StoredCard, decode_card
from ..config import A2aSettings
from ..errors import CardError
from ..metrics import HealthMetrics
from .etcd import EtcdClient
from .watch import Change, Gone, Listed, PrefixWatch

log = logging.getLogger(__name__)


def cards_prefix(prefix: str) -> str:
    """The etcd key prefix under which cards live."""
    return f"{prefix}/cards/"


class CardSync:
    """Keeps a CardIndex in step with ``{prefix}/cards/``."""

    def __init__(self, etcd: EtcdClient, prefix: str, index: CardIndex, metrics: HealthMetrics,
                 max_card_bytes: int) -> None:
        self._index = index
        self._metrics = metrics
        self.max_card_bytes = max_card_bytes
        self._prefix = cards_prefix(prefix)
        self.watch: PrefixWatch[StoredCard] = PrefixWatch(etcd, self._prefix, self._decode, self._apply,
                                                          name="cards")

    def update(self, a2a: A2aSettings) -> None:
        """Hot-apply ``a2a.max_card_bytes`` for the cards read from now on (those held are kept)."""
        self.max_card_bytes = a2a.max_card_bytes

    async def start(self) -> None:
        await self.watch.start()

    async def stop(self) -> None:
        await self.watch.stop()

    def _decode(self, key: str, value: bytes) -> StoredCard | None:
        name, _, agent_id = key[len(self._prefix):].partition("/")
        if not name or not agent_id or "/" in agent_id:
            log.warning("skipping %s: not a {prefix}/cards/{name}/{id} key", key)
            self._metrics.card_errors.labels("invalid").inc()
            return None
        try:
            card = decode_card(value, key, limit=self.max_card_bytes)
        except CardError as exc:
            log.warning("skipping the card at %s: %s", key, exc.reason)
            self._metrics.card_errors.labels(exc.kind).inc()
            return None
        return StoredCard(key, name, agent_id, card, 0)

    def _apply(self, changes: Sequence[Change[StoredCard]]) -> None:
        cards = dict(self._index.cards)
        revision = self._index.revision
        for change in changes:
            if isinstance(change, Listed):
                cards = {c.owner: _at(c, change.mod_revisions.get(key, change.revision))
                         for key, c in change.items.items()}
                revision = change.revision
            elif isinstance(change, Gone):
                name, _, agent_id = change.key[len(self._prefix):].partition("/")
                cards.pop(f"{name}/{agent_id}", None)
                revision = change.revision
            else:
                cards[change.value.owner] = _at(change.value, change.revision)
                revision = change.revision
        self._index.replace(cards, revision)


def _at(card: StoredCard, revision: int) -> StoredCard:
    return StoredCard(card.key, card.name, card.agent_id, card.card, revision)
