"""The least a Kopf operator of Customers does, for `bench/reconcile.py --floor`: what the reconcile
bench's operator side costs before any of the operator's own steps.

Per Customer: Kopf's watch and its finalizer (a deletion handler), the namespace created through the API,
the bare loop's `helm upgrade --install` (the same command, values and concurrency), and `status.release`
written by Kopf from the handler's result, with the operator's Kopf settings (kopf_tuning.py). No licence,
Secret, PostgreSQL, Deployment list, Event or watch of its own. Run by the bench, not by hand:
`python bench/floor_operator.py` with KUBECONFIG, HELM_CONCURRENCY and FLOOR_LIVENESS_PORT set.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import kopf
import kubernetes
from reconcile import CHART, CONCURRENCY, baseline_values

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.operator.helm import chart_version, helm_environment, upgrade_install_args
from iotistic_billing.operator.kopf_tuning import configure_kopf
from iotistic_billing.operator.values import values_hash

CUSTOMERS = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings, routine=())
    client = kubernetes.config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
    memo["core"] = kubernetes.client.CoreV1Api(client)
    memo["slots"] = asyncio.Semaphore(CONCURRENCY)
    memo["helm"] = str(find_binary("helm"))


@kopf.on.create(*CUSTOMERS)
async def release(name: str, memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """Kopf writes the result to status.release, which the bench watches for."""
    namespace = f"customer-{name}"
    body = {"metadata": {"name": namespace}}
    await asyncio.to_thread(lambda: memo["core"].create_namespace(body, _preload_content=False).read())
    number = int(name.rpartition("-")[2]) if name.startswith("bench-") else 0
    with tempfile.NamedTemporaryFile("w", suffix=".json") as values:
        json.dump(baseline_values(number), values)
        values.flush()
        async with memo["slots"]:
            process = await asyncio.create_subprocess_exec(
                memo["helm"],
                "--kubeconfig",
                os.environ["KUBECONFIG"],
                *upgrade_install_args(
                    "instance",
                    namespace,
                    CHART,
                    Path(values.name),
                    values_hash(baseline_values(number), chart_version(CHART)),
                ),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=helm_environment(),
            )
            _, err = await process.communicate()
    if process.returncode != 0:
        raise kopf.TemporaryError(err.decode(), delay=1)
    return {"name": "instance", "namespace": namespace, "revision": 1}


@kopf.on.delete(*CUSTOMERS)
async def finalize(**_: Any) -> None:
    """Nothing to undo: here only for the finalizer the operator's deletion handler gets."""


if __name__ == "__main__":
    kopf.configure(verbose=False)
    kopf.run(
        standalone=True,
        clusterwide=True,
        liveness_endpoint=f"http://127.0.0.1:{os.environ['FLOOR_LIVENESS_PORT']}/healthz",
    )
