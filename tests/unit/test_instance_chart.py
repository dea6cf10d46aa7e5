"""The chart store with a chart directory: the fleet runs the directory's version, and a pin to another
version is refused naming the field (the OCI side runs against a real registry in the integration
tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from iotistic_billing.operator.charts import ChartStore, ChartUnavailable
from iotistic_billing.operator.helm import Helm, HelmError
from iotistic_billing.settings import load_settings

CHART = Path(__file__).resolve().parents[2] / "charts" / "customer-instance"


def store(tmp_path: Path) -> ChartStore:
    return ChartStore(load_settings(instance_chart=str(CHART)), Helm("helm", None, 1), tmp_path)


async def test_a_chart_directory_serves_its_own_version(tmp_path: Path) -> None:
    charts = store(tmp_path)
    assert charts.fleet_version == "0.1.0"
    assert (await charts.get(None)).path == CHART
    assert (await charts.get("0.1.0")).version == "0.1.0"
    with pytest.raises(
        ChartUnavailable, match=rf"^spec.instance.chartVersion is 0.2.0, but the chart at {CHART} is 0.1.0$"
    ):
        await charts.get("0.2.0")
    assert not any(os.scandir(tmp_path))  # nothing pulled, nothing cached


async def test_a_refused_login_is_retried_and_a_missing_version_stalls(tmp_path: Path) -> None:
    class Refusing(Helm):
        def __init__(self, message: str) -> None:
            super().__init__("helm", None, 1)
            self.message = message

        async def pull(self, *args: Any, **kwargs: Any) -> None:
            raise HelmError("pull", self.message)

    settings = load_settings(
        instance_chart="oci://127.0.0.1:5000/charts/customer-instance", instance_chart_version="0.1.0"
    )
    manifest = 'GET "http://127.0.0.1:5000/v2/charts/customer-instance/manifests/0.3.114030"'
    refusals = [
        f"{manifest}: basic credential not found",
        f"{manifest}: response status code 401: unauthorized",
    ]
    for message in refusals:
        with pytest.raises(HelmError):
            await ChartStore(settings, Refusing(message), tmp_path).get("0.3.114030")
    missing = f"{manifest}: response status code 404: manifest unknown: manifest unknown"
    with pytest.raises(ChartUnavailable):
        await ChartStore(settings, Refusing(missing), tmp_path).get("0.3.114030")
