"""bench/usage.py's counting and verdicts: the pure parts of the script and its load driver against a
stand-in server (the script itself is run by hand)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

# bench/ is not a package: its scripts import each other by name, as they do when run.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import usage as bench


def reads(*latencies: list[float]) -> list[bench.Round]:
    return [bench.Round(len(each), len(each), 1.0, each) for each in latencies]


def test_the_reads_p99_counts_the_slow_reads_of_every_round() -> None:
    fast = [0.010] * 100
    slow_round = [0.010] * 90 + [1.0] * 10

    p50, p99 = bench.reads_quantiles(reads(fast, slow_round, fast))

    assert p50 == 0.010
    assert p99 >= 0.5


def test_reads_slower_with_the_rows_than_on_the_empty_table_miss_the_target() -> None:
    empty = bench.Phase("empty table", 0.7, 0.5, 0.010, 0.020)
    filled = bench.Phase("20,000,000 more reports", 0.7, 0.5, 0.030, 0.040)

    verdicts = dict(bench.verdicts([empty, filled]))

    assert not all(verdicts.values()), verdicts


def test_reads_within_the_factor_of_the_empty_tables_meet_the_target() -> None:
    empty = bench.Phase("empty table", 0.7, 0.5, 0.010, 0.020)
    filled = bench.Phase("20,000,000 more reports", 0.7, 0.5, 0.012, 0.030)

    assert all(met for _, met in bench.verdicts([empty, filled]))


async def test_throughput_counts_the_reports_the_server_says_it_accepted() -> None:
    async def nothing_new(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"accepted": 0, "duplicate": 1000}, status=202)

    app = web.Application()
    app.router.add_post("/api/usage/report", nothing_new)
    async with TestServer(app) as server:
        url = str(server.make_url("/api/usage/report"))
        result = await bench.drive(url, lambda: json.dumps({"reports": []}).encode(), 2, 0.2, {})

    assert result.requests > 0
    assert result.reports_per_second == 0
