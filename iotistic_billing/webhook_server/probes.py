"""The probes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from aiohttp import web
from sqlalchemy import text

from iotistic_billing.webhook_server.context import ENGINE, KUBE, METRICS
from iotistic_billing.webhook_server.messages import json_model
from iotistic_billing.webhook_server.schemas import Health, Readiness

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
        _check("database", database()), _check("kubernetes", request.app[KUBE].server_version())
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


__all__ = ["healthz", "metrics", "readyz"]
