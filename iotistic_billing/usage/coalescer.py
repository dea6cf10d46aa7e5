"""Coalesces usage reports into one status update per customer and flush.

Reports arrive far more often than the Customer's status should change (a batch of 1,000 reports, many
instances per customer): the request path only records the latest arrival per customer here, and the
flusher makes one status patch per customer that reported since the last flush.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime


class UsageCoalescer:
    """Customer id -> the latest time a report of that customer arrived, since the last drain.

    Plain dict operations with no await between them: safe on one event loop without a lock.
    """

    def __init__(self) -> None:
        self._latest: dict[str, datetime] = {}

    def saw(self, customer_ids: Iterable[str], at: datetime) -> None:
        for customer_id in customer_ids:
            known = self._latest.get(customer_id)
            if known is None or at > known:
                self._latest[customer_id] = at

    def drain(self) -> dict[str, datetime]:
        """Everything recorded so far; the coalescer starts empty again."""
        drained, self._latest = self._latest, {}
        return drained

    def requeue(self, entries: Mapping[str, datetime]) -> None:
        """Put back what a failed flush could not write, keeping anything newer recorded meanwhile."""
        for customer_id, at in entries.items():
            self.saw((customer_id,), at)

    def __len__(self) -> int:
        return len(self._latest)


__all__ = ["UsageCoalescer"]
