"""The access log: aiohttp's line a request (this app's middlewares log none), less the probes and
scrapes that succeed, and none at all with ACCESS_LOG=false."""

from __future__ import annotations

import logging
from typing import Final, TypedDict

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.log import access_logger
from aiohttp.web_log import AccessLogger

from iotistic_billing.settings import Settings

# The kubelet's probes and Prometheus' scrapes: every few seconds on every replica, and only their
# failures say something a person reads.
QUIET_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestLog(AccessLogger):
    """aiohttp's access log (its format and fields), without a successful GET or HEAD (a load
    balancer's check) of QUIET_PATHS."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.method in ("GET", "HEAD") and request.path in QUIET_PATHS and response.status < 400:
            return
        super().log(request, response, time)


class AccessLogArguments(TypedDict):
    access_log_class: type[AbstractAccessLogger]
    access_log: logging.Logger | None


def access_log_arguments(settings: Settings) -> AccessLogArguments:
    """What web.run_app (and a test's server) is given: no logger, so no line formatted, when off."""
    return AccessLogArguments(
        access_log_class=RequestLog,
        access_log=access_logger if settings.access_log else None,
    )
