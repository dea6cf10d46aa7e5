"""The schema gate (db/schema.py): the webhook server's background work waits until the database is at
this version's schema, as readiness decides it (migrate.schema_current), looking at the revision once a
poll for all of its workers and saying so in one line; a stop while it waits ends it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from iotistic_billing.db.migrate import head_revision, previous_revision
from iotistic_billing.db.schema import SchemaGate, after_schema

HEAD = head_revision()
BEFORE = previous_revision(HEAD)


class Database:
    """The revisions the gate reads, one a look (the last one stays), and the naps between its looks,
    each of them ended by the test (`look_again`): no time passes for real."""

    def __init__(self, *revisions: str | BaseException | None) -> None:
        self.revisions = list(revisions)
        self.looks = 0
        self.naps: list[float] = []
        self.napping = asyncio.Event()
        self._go = asyncio.Event()

    async def revision(self) -> str | None:
        self.looks += 1
        answer = self.revisions.pop(0) if len(self.revisions) > 1 else self.revisions[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def nap(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.napping.set()
        await self._go.wait()
        self._go.clear()

    async def napped(self) -> None:
        """Until the gate naps (after a look that did not open it)."""
        async with asyncio.timeout(5):  # the test's own bound: the gate never sleeps for real here
            await self.napping.wait()
        self.napping.clear()

    def look_again(self) -> None:
        self._go.set()

    def gate(self) -> SchemaGate:
        return SchemaGate(self.revision, poll=5.0, sleep=self.nap)


def waiting_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for the database schema")
    ]


async def test_the_workers_wait_for_the_migration_with_one_look_a_poll_and_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: during an upgrade the new replicas' inbox, notice sender and usage timers ran
    against the schema before the operator's migration, failing each claim on a column not there yet
    (stripe_events.payload_bytes, usage_rollups.billed_manually) for as long as the migration ran; only
    readiness waited for it. They wait now, at one gate a process, which logs one line however long."""
    caplog.set_level(logging.INFO, logger="iotistic_billing.db.schema")
    database = Database(BEFORE, BEFORE, BEFORE, HEAD)
    gate = database.gate()
    started: list[str] = []

    async def worker(name: str) -> None:
        started.append(name)

    workers = [
        asyncio.create_task(after_schema(gate, lambda n=n: worker(n))) for n in ("claims", "prune", "meter")
    ]
    for _ in range(3):
        await database.napped()
        assert started == []
        database.look_again()
    async with asyncio.timeout(5):
        await asyncio.gather(*workers)
    assert sorted(started) == ["claims", "meter", "prune"]
    # One look a poll for the three workers, and the poll's interval between them.
    assert (database.looks, database.naps) == (4, [5.0, 5.0, 5.0])
    assert waiting_lines(caplog) == [
        f"waiting for the database schema {HEAD} (at {BEFORE}): the operator's migration runs first"
    ]
    # Open stays open: a worker that comes later does not look again.
    await after_schema(gate, lambda: worker("later"))
    assert database.looks == 4 and started[-1] == "later"


@pytest.mark.parametrize(
    ("revision", "opens"),
    [(HEAD, True), ("9999", True), (BEFORE, False), (None, False)],
    ids=["head", "a newer version's", "an older one", "never migrated"],
)
async def test_the_gate_opens_on_the_schemas_readiness_takes(revision: str | None, opens: bool) -> None:
    database = Database(revision)
    waiting = asyncio.create_task(database.gate().wait())
    if opens:
        async with asyncio.timeout(5):
            await waiting
        assert database.naps == []
    else:
        await database.napped()
        assert not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_a_stop_while_waiting_ends_the_worker_and_another_goes_on_looking() -> None:
    database = Database(BEFORE, BEFORE, HEAD)
    gate = database.gate()
    first = asyncio.create_task(gate.wait())
    await database.napped()  # the first waiter looks, and naps holding the look
    second = asyncio.create_task(gate.wait())
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await database.napped()  # the second took over the looks
    database.look_again()
    async with asyncio.timeout(5):
        await second
    assert database.looks == 3


async def test_a_database_away_is_told_once_and_read_again_after_a_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="iotistic_billing.db.schema")
    away = ConnectionRefusedError(111, "Connect call failed")
    database = Database(away, away, HEAD)
    waiting = asyncio.create_task(database.gate().wait())
    for _ in range(2):
        await database.napped()
        database.look_again()
    async with asyncio.timeout(5):
        await waiting
    assert database.naps == [1.0, 2.0]
    told = [r for r in caplog.records if "cannot read the database's revision" in r.getMessage()]
    assert len(told) == 1 and told[0].exc_info is None
    assert waiting_lines(caplog) == []
