"""What every handler needs, built once at start-up and kept in Kopf's memo: no import-time singletons."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from iotistic_billing.licensing.keys import SigningKeys
from iotistic_billing.operator.deployments import InstanceDeployments
from iotistic_billing.operator.helm import Helm
from iotistic_billing.operator.kube import Kube
from iotistic_billing.settings import Settings


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class OperatorContext:
    settings: Settings
    keys: SigningKeys
    kube: Kube
    helm: Helm
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # The instance Deployments readiness is judged by: listed after helm runs, kept by the watch.
    deployments: InstanceDeployments
    # Passes in flight at most: a thousand Customers applied at once wait here as cheap coroutines
    # instead of each holding a read body, a minted licence and rendered values while helm is busy.
    pass_slots: asyncio.Semaphore
    # Time is an input: tests move this clock instead of sleeping until a timer fires.
    clock: Callable[[], datetime] = utc_now
    # One pass at a time per Customer, whichever handler or watch started it.
    locks: defaultdict[str, asyncio.Lock] = field(default_factory=lambda: defaultdict(asyncio.Lock))
