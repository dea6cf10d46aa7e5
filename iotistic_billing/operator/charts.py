"""The customer-instance chart the operator installs: a chart directory (INSTANCE_CHART a path), or an
OCI reference (INSTANCE_CHART `oci://...`) whose versions are pulled once each into a local cache, so a
pass installs from a directory (helm keeps no OCI cache of its own) and a version that does not exist is
told apart from a registry that is away."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from iotistic_billing.operator.helm import Helm, HelmError, chart_version
from iotistic_billing.settings import OCI_PREFIX, Settings

# Helm's answers when a chart version is not in the registry (the tag is missing, or the repository).
_NOT_FOUND_MARKERS = ("not found", "name unknown", "manifest unknown")
# ... and when the registry refuses us, however worded ("basic credential not found" without a login):
# the credentials may come, so the pull is retried rather than the Customer stalled.
_REFUSED_MARKERS = ("credential", "unauthorized", "denied", "status code 401", "status code 403")


class ChartUnavailable(Exception):
    """The version asked for does not exist where the chart comes from: retrying cannot help until the
    spec (or the setting) changes."""


@dataclass(frozen=True)
class InstanceChart:
    """One version of the chart, as a directory helm installs from."""

    version: str
    path: Path


class ChartStore:
    """The chart's versions by name: the fleet's (no spec.instance.chartVersion) or a pinned one."""

    def __init__(self, settings: Settings, helm: Helm, cache: Path) -> None:
        self.source = settings.instance_chart
        self.oci = self.source.startswith(OCI_PREFIX)
        self.helm = helm
        self.cache = cache
        self.plain_http = settings.instance_chart_plain_http
        self.registry_config = settings.instance_chart_registry_config
        self._fleet_version = settings.instance_chart_version
        self._pulls: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # A version's last pull helm failed: when it ended, and its error (`get`).
        self._failed: dict[str, tuple[float, HelmError]] = {}

    @property
    def fleet_version(self) -> str:
        """The version of every Customer without spec.instance.chartVersion: a chart directory's own,
        an OCI chart's INSTANCE_CHART_VERSION (pushing a version does not move the fleet by itself)."""
        if self.oci:
            assert self._fleet_version is not None  # the settings require it with an OCI chart
            return self._fleet_version
        return chart_version(Path(self.source))

    async def get(self, version: str | None, source: str = "spec.instance.chartVersion") -> InstanceChart:
        """The chart at `version`, which `source` asks for (the errors name it), or at the fleet's version."""
        asked = f"{source} is {version}" if version else f"the fleet's version is {self.fleet_version}"
        version = version or self.fleet_version
        if not self.oci:
            if version != (found := self.fleet_version):
                raise ChartUnavailable(f"{asked}, but the chart at {self.source} is {found}")
            return InstanceChart(version, Path(self.source))
        directory = self.cache / version
        if not (directory / "Chart.yaml").is_file():
            waiting_since = time.monotonic()
            async with self._pulls[version]:  # a thousand passes wanting a new version pull it once
                if not (directory / "Chart.yaml").is_file():
                    failed = self._failed.get(version)
                    if failed is not None and failed[0] >= waiting_since:
                        # The pull this one waited for failed: its answer, not a pull more each (a
                        # registry that never answers held every pass slot HELM_TIMEOUT per waiter).
                        # A new error each: one raised again grows its traceback with each waiter.
                        shared = failed[1]
                        raise HelmError(shared.command, shared.message, timed_out=shared.timed_out)
                    try:
                        await self._pull(version, directory, asked)
                    except HelmError as error:  # a ChartUnavailable names its asker, and came quick
                        self._failed[version] = (time.monotonic(), error.with_traceback(None))
                        raise
                    self._failed.pop(version, None)
        return InstanceChart(version, directory)

    async def _pull(self, version: str, directory: Path, asked: str) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.cache))
        try:
            try:
                await self.helm.pull(
                    self.source,
                    version,
                    staging,
                    plain_http=self.plain_http,
                    registry_config=self.registry_config,
                )
            except HelmError as error:
                said = error.message.lower()
                refused = any(marker in said for marker in _REFUSED_MARKERS)
                if not refused and any(marker in said for marker in _NOT_FOUND_MARKERS):
                    raise ChartUnavailable(f"{asked}, which {self.source} does not have") from None
                raise
            self._settle(staging, version, directory, asked)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _settle(self, staging: Path, version: str, directory: Path, asked: str) -> None:
        """The pulled chart moved into its place, whole or not at all (a crash leaves only staging)."""
        (pulled,) = [path for path in staging.iterdir() if (path / "Chart.yaml").is_file()]
        if (found := chart_version(pulled)) != version:
            raise ChartUnavailable(f"{asked}, but {self.source}:{version} holds chart {found}")
        pulled.rename(directory)


__all__ = ["ChartStore", "ChartUnavailable", "InstanceChart"]
