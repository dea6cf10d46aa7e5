"""Operational routes: liveness, readiness, metrics, the Customers-by-phase counts, the API document."""

from __future__ import annotations

import asyncio
import html
import logging
from typing import Any, Final

from aiohttp import web
from sqlalchemy import text

from iotistic_billing.webhook_server.context import CLUSTER, DIRECTORY, ENGINE, METRICS, OPENAPI
from iotistic_billing.webhook_server.routing import json_model
from iotistic_billing.webhook_server.schemas import Health, Readiness
from iotistic_billing.webhook_server.views import queue_stats

log = logging.getLogger(__name__)
READINESS_TIMEOUT: Final = 3.0


async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving (nothing else is checked: a dependency down is not our restart)."""
    return json_model(Health(status="ok"))


async def _check(name: str, probe: Any) -> tuple[str, bool]:
    try:
        await asyncio.wait_for(probe, READINESS_TIMEOUT)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.warning("readiness: %s unavailable (%s)", name, type(error).__name__)
        return name, False
    return name, True


async def readyz(request: web.Request) -> web.Response:
    """Ready when PostgreSQL answers `SELECT 1` and the API server answers its version."""

    async def database() -> None:
        async with request.app[ENGINE].connect() as connection:
            await connection.execute(text("SELECT 1"))

    results = await asyncio.gather(
        _check("database", database()), _check("kubernetes", request.app[CLUSTER].ping())
    )
    checks = {name: "ok" if ok else "unavailable" for name, ok in results}
    ready = all(ok for _, ok in results)
    return json_model(
        Readiness.model_validate({"status": "ready" if ready else "unavailable", "checks": checks}),
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics of this process."""
    return request.app[METRICS].exposition()


async def get_queue_stats(request: web.Request) -> web.Response:
    """Customers counted by status.phase: what the seed's deployment queue showed, now the operator's work."""
    return json_model(queue_stats(await request.app[DIRECTORY].all()))


async def get_openapi(request: web.Request) -> web.Response:
    """This document."""
    response = web.json_response(request.app[OPENAPI])
    response.headers["Cache-Control"] = "no-cache"
    return response


async def get_docs(request: web.Request) -> web.Response:
    """A page listing every route of the OpenAPI document; no script, no style, no CDN."""
    document: dict[str, Any] = request.app[OPENAPI]
    rows = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            rows.append(
                "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>".format(
                    html.escape(method.upper()),
                    html.escape(path),
                    html.escape(operation.get("summary", "")),
                    html.escape(", ".join(sorted(str(code) for code in operation.get("responses", {})))),
                )
            )
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(document['info']['title'])}</title></head><body>"
        f"<h1>{html.escape(document['info']['title'])} {html.escape(document['info']['version'])}</h1>"
        '<p>The machine-readable document: <a href="/api/openapi.json">/api/openapi.json</a>.</p>'
        "<table><thead><tr><th>Method</th><th>Path</th><th>Summary</th><th>Statuses</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


__all__ = ["get_docs", "get_openapi", "get_queue_stats", "healthz", "metrics", "readyz"]
