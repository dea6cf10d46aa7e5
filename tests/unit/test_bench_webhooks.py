"""bench/webhooks.py's open-loop sender against a stand-in server (the script itself is run by hand)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

# bench/ is not a package: its scripts import each other by name, as they do when run.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import webhooks as bench

STALL = 0.3


async def sent_through_a_stall() -> bench.Sends:
    """Ten events at 100/s to a server whose first answer holds the event loop for STALL seconds (the
    sender shares it): the events due meanwhile go out late."""
    answered: list[int] = []

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        if not answered:
            time.sleep(STALL)  # noqa: ASYNC251 - the stall is the point: nothing else runs meanwhile
        answered.append(1)
        return web.json_response({"received": True})

    app = web.Application()
    app.router.add_post("/api/webhooks/stripe", receive)
    async with TestServer(app) as server:
        return await bench.open_loop(
            [str(server.make_url("/api/webhooks/stripe"))], 100, 0.1, ["cust_bench0001"]
        )


async def test_an_event_sent_late_counts_from_its_scheduled_time() -> None:
    """The wait before a late send is part of its latency (open loop, no coordinated omission)."""
    sends = await sent_through_a_stall()

    assert len(sends.events) == 10
    assert statistics.median(sends.from_schedule) >= STALL / 2


async def test_the_time_from_the_actual_send_is_reported_beside_it() -> None:
    """From the send alone, the stall shows only in the event that met it."""
    sends = await sent_through_a_stall()

    assert max(sends.from_send) >= STALL
    assert statistics.median(sends.from_send) < STALL / 2
