"""Coalesces usage reports into one status update per customer and flush.

Reports arrive far more often than the Customer's status should change (a batch of 1,000 reports, many
instances per customer): the request path only records, per customer, the first and latest arrivals and
the earliest period start reported, and the flusher makes one status patch per customer that reported
since the last flush (and a rollup for each ended period those reports end in that has none). It is
memory: what a server stopped before its flush held, the meter run finds again in PostgreSQL
(UsageMetering.flush_unheld).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Reported:
    """What a customer's reports since the last drain tell the flusher."""

    at: datetime  # the latest arrival: status.usage.lastReportAt
    # The earliest period_start: none of them ends in a billing period before the one holding it.
    earliest_start: datetime

    def merged(self, other: Reported) -> Reported:
        return Reported(max(self.at, other.at), min(self.earliest_start, other.earliest_start))


class UsageCoalescer:
    """Customer id -> what its reports since the last drain told (`Reported`).

    Plain dict operations with no await between them: safe on one event loop without a lock.
    """

    def __init__(self) -> None:
        self._reported: dict[str, Reported] = {}

    def saw(self, earliest_starts: Mapping[str, datetime], at: datetime) -> None:
        """Reports arrived at `at`: customer id -> the earliest period_start among its reports."""
        for customer_id, start in earliest_starts.items():
            self._note(customer_id, Reported(at, start))

    def drain(self) -> dict[str, Reported]:
        """Everything recorded so far; the coalescer starts empty again."""
        drained, self._reported = self._reported, {}
        return drained

    def requeue(self, entries: Mapping[str, Reported]) -> None:
        """Put back what a failed flush could not write, merged with anything recorded meanwhile."""
        for customer_id, reported in entries.items():
            self._note(customer_id, reported)

    def _note(self, customer_id: str, reported: Reported) -> None:
        known = self._reported.get(customer_id)
        self._reported[customer_id] = reported if known is None else known.merged(reported)

    def __len__(self) -> int:
        return len(self._reported)


__all__ = ["Reported", "UsageCoalescer"]
