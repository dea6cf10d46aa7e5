"""Two operator shards on one control plane: each Customer is handled by exactly the shard its
`iotistic.io/shard` label names (shard 0: no label, or no such shard); a killed shard's Customers wait
for it, untouched by the other; relabelling moves a Customer."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import GROUP, PLURAL, SHARD_LABEL, VERSION, customer_id_in_use
from iotistic_billing.operator.constants import FINALIZER
from iotistic_billing.rollout import ROLLOUT_PLURAL
from tests.conftest import OperatorProcess, unique_name, wait_until
from tests.integration.test_operator import Cluster, customer_manifest, operator_metric

pytestmark = pytest.mark.integration
LICENSE_EXPIRY = "iotistic_operator_license_expiry_timestamp_seconds"
HANDLER_SUCCEEDED = re.compile(r"Handler '\w+' succeeded\.")


@pytest.fixture
def shards(
    operator: OperatorProcess, operator_env: dict[str, str], tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    """The session operator stopped (it owns every Customer), two shards in its place; afterwards the
    session operator runs again whatever happened."""
    operator.kill()
    started = [OperatorProcess(operator_env, tmp_path / f"shard-{index}.log") for index in range(2)]
    try:
        for index, shard in enumerate(started):
            # Unbuffered: a shard is killed -9, and its log is the evidence of what it handled.
            shard.start(OPERATOR_SHARDS="2", OPERATOR_SHARD=str(index), PYTHONUNBUFFERED="1")
        yield started
    finally:
        for shard in started:
            shard.kill()
        operator.start(**operator.overrides)


def handler_runs(shard: OperatorProcess) -> list[str]:
    """The Customers whose handlers ran in this shard, once per run (Kopf's JSON log names the object)."""
    runs = []
    for line in shard.log.read_text(errors="replace").splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if HANDLER_SUCCEEDED.fullmatch(record.get("message", "")) and "object" in record:
            runs.append(record["object"]["name"])
    return runs


def handled(shard: OperatorProcess) -> set[str]:
    return set(handler_runs(shard))


def daemons_ended(shard: OperatorProcess) -> set[str]:
    """The Customers whose housekeeping daemon returned in this shard while it ran."""
    ended = set()
    for line in shard.log.read_text(errors="replace").splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("message") == "Daemon 'housekeeping' succeeded." and "object" in record:
            ended.add(record["object"]["name"])
    return ended


def licensed_plan(cluster: Cluster, name: str) -> str | None:
    try:
        claims, _ = cluster.license(name, verify_times=False)
    except ApiException:
        return None
    return str(claims["plan"])


def label(cluster: Cluster, name: str, shard: str) -> None:
    cluster.objects.patch_cluster_custom_object(
        GROUP, VERSION, PLURAL, name, {"metadata": {"labels": {SHARD_LABEL: shard}}}
    )


def test_each_customer_is_handled_by_exactly_its_shard(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, shards: list[OperatorProcess]
) -> None:
    cluster = Cluster(k8s_client, kubeconfig)
    shard0, shard1 = shards
    labels = {"plain": None, "zero": "0", "one": "1", "nowhere": "7"}
    names = {key: unique_name(f"shard-{key}") for key in labels}
    for key, value in labels.items():
        manifest = customer_manifest(names[key], plan="starter")
        if value is not None:
            manifest["metadata"]["labels"] = {SHARD_LABEL: value}
        cluster.create(manifest)

    ours = set(names.values())
    expected = {0: ours - {names["one"]}, 1: {names["one"]}}
    wait_until(
        lambda: all(handled(shards[index]) & ours >= owned for index, owned in expected.items()),
        120,
        "every Customer handled by its shard",
    )
    assert {index: handled(shard) & ours for index, shard in enumerate(shards)} == expected
    assert all(licensed_plan(cluster, name) == "starter" for name in ours)

    # Shard 1 killed: its Customer waits. Its instance's Deployment events reach shard 0 too (the
    # Deployments are not sharded), and shard 0 must not act on them.
    shard1.kill()
    cluster.patch_spec(names["one"], {"plan": "professional"})
    cluster.make_deployments_available(names["one"])
    cluster.patch_spec(names["plain"], {"plan": "professional"})
    wait_until(lambda: licensed_plan(cluster, names["plain"]) == "professional", 60, "shard 0 works on")
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: licensed_plan(cluster, names["one"]) != "starter", 3, "shard 0 took it")
    assert names["one"] not in handled(shard0)
    assert {index: handled(shard) & ours for index, shard in enumerate(shards)} == expected

    shard1.start(**shard1.overrides)
    wait_until(lambda: licensed_plan(cluster, names["one"]) == "professional", 60, "shard 1 resumed it")

    # Relabelled, a Customer moves: shard 1 handles its next change, shard 0 no longer does, and shard 0
    # stopped its housekeeping (Kopf forgets a Customer that leaves the watch but keeps its daemon).
    moved = names["zero"]
    before = handler_runs(shard0).count(moved)
    expiry = f'customer_id="{customer_id_in_use(cluster.customer(moved) or {})}"'
    assert operator_metric(shard0, LICENSE_EXPIRY, expiry) > 0
    label(cluster, moved, "1")
    wait_until(lambda: moved in handled(shard1), 60, "shard 1 took the relabelled Customer")
    wait_until(lambda: moved in daemons_ended(shard0), 30, "shard 0 stopped its housekeeping")
    # Shard 0 no longer exports its licence's expiry (its last value would fire the expiry alerts weeks
    # later), shard 1 does. Shard 0 drops it after the daemon, once it has asked the API server whether
    # another Customer holds the id (handlers.customer_gone).
    wait_until(lambda: operator_metric(shard0, LICENSE_EXPIRY, expiry) == 0, 30, "shard 0 dropped its expiry")
    wait_until(lambda: operator_metric(shard1, LICENSE_EXPIRY, expiry) > 0, 30, "shard 1 exports it")
    cluster.patch_spec(moved, {"plan": "professional"})
    wait_until(lambda: licensed_plan(cluster, moved) == "professional", 60, "moved Customer handled")
    assert handler_runs(shard0).count(moved) == before

    # And back: shard 0 handles it again.
    label(cluster, moved, "0")
    wait_until(lambda: handler_runs(shard0).count(moved) > before, 60, "shard 0 took it back")
    cluster.patch_spec(moved, {"plan": "enterprise"})
    wait_until(lambda: licensed_plan(cluster, moved) == "enterprise", 60, "returned Customer handled")


def test_only_shard_zero_watches_rollouts_and_their_finalizer_stays(
    k8s_client: kubernetes.client.ApiClient, shards: list[OperatorProcess]
) -> None:
    """A rollout is advanced by shard 0 alone; another shard that watched it too would take away the
    finalizer shard 0's daemon puts on it, again and again."""
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    name = unique_name("shard-rollout")
    objects.create_cluster_custom_object(
        GROUP,
        VERSION,
        ROLLOUT_PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InstanceRollout",
            "metadata": {"name": name},
            "spec": {"chartVersion": "9.9.9", "steps": [{"rest": True}]},
        },
    )

    def rollout() -> dict[str, Any]:
        body: dict[str, Any] = objects.get_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name)
        return body

    # The session's chart is a directory: the rollout stalls RolloutsDisabled, and then nothing changes.
    wait_until(lambda: (rollout().get("status") or {}).get("phase"), 60, "shard 0 ticked the rollout")
    settled = rollout()
    assert FINALIZER in settled["metadata"]["finalizers"]
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(
            lambda: rollout()["metadata"]["resourceVersion"] != settled["metadata"]["resourceVersion"],
            5,
            "the rollout kept being written",
        )
    assert name not in {run for shard in shards[1:] for run in handler_runs(shard)}
