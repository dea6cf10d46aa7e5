"""A route entry: one `Route` per route of the route table says who may call it, what it takes and what
it answers.

The same entries register the aiohttp routes, drive the authentication middleware and write the OpenAPI
document, so a route cannot exist undocumented or unguarded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# public: anyone; admin: the bearer token; instance: the bearer token or the customer's own usage key;
# stripe: anyone, but the handler verifies Stripe's signature.
Access = Literal["public", "admin", "instance", "stripe"]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    access: Access
    # Status -> the model of the JSON body, or a media type for a body that is not JSON.
    responses: Mapping[int, type[BaseModel] | str]
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    # Error statuses the route can answer besides those implied by access, body and rate limiting.
    errors: tuple[int, ...] = ()
    description: str = ""
    headers: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    # Takes a client's Idempotency-Key (messages.read_idempotency_key): its retries are one request.
    idempotency_key: bool = False
    # Probes and metrics must answer whatever the load.
    rate_limited: bool = True

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


__all__ = ["Access", "Handler", "Route"]
