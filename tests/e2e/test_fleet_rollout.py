"""Fleet rollouts on a cluster where instances really roll out: 30 Customers on the registry's chart,
taken to a new version in steps by an InstanceRollout, a bad version stopped at the canaries and rolled
back, a rollout paused, the operator killed mid-rollout. Nothing here patches a status by hand: the
operator upgrades the releases and kwok's nodes run (or, for the bad version, never schedule) the Pods.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.devenv.registry import ChartRegistry
from iotistic_billing.rollout import (
    ROLLOUT_CHART_VERSION,
    ROLLOUT_NAME,
    ROLLOUT_PLURAL,
    ROLLOUT_UPDATED_AT,
)
from tests.conftest import REPO, OperatorProcess, unique_name, wait_until
from tests.e2e.test_customer_lifecycle import ROLLOUT_TIMEOUT, customer_manifest

pytestmark = pytest.mark.e2e

CHART = REPO / "charts" / "customer-instance"
FLEET_SIZE = 30
BASE = "0.1.0"


def stamp() -> str:
    return datetime.now(UTC).strftime("%H%M%S%f")


class Fleet:
    """The module's 30 Customers (one label selects them) and what a sampler saw of them."""

    def __init__(
        self, client: kubernetes.client.ApiClient, kubeconfig: Path, operator: OperatorProcess
    ) -> None:
        self.objects = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.kubeconfig = kubeconfig
        self.operator = operator
        self.label = unique_name("fleet")
        self.names = [f"{self.label}-{i:02}" for i in range(FLEET_SIZE)]

    def customers(self) -> dict[str, dict[str, Any]]:
        listed = self.objects.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, label_selector=f"fleet={self.label}"
        )
        return {c["metadata"]["name"]: c for c in listed["items"]}

    def rollout(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.objects.get_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name)
        return body

    def create_rollout(self, name: str, chart_version: str, steps: list[dict[str, Any]], **spec: Any) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "InstanceRollout",
            "metadata": {"name": name},
            "spec": {
                "chartVersion": chart_version,
                "selector": {"matchLabels": {"fleet": self.label}},
                "steps": steps,
                **spec,
            },
        }
        self.objects.create_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, body)

    def phase(self, name: str, *phases: str) -> dict[str, Any] | None:
        body = self.rollout(name)
        return body if (body.get("status") or {}).get("phase") in phases else None

    def finished(self, name: str) -> dict[str, Any]:
        """The rollout once it has finished, whichever way."""
        body: dict[str, Any] = wait_until(
            lambda: self.phase(name, "Succeeded", "Halted", "RolledBack", "Aborted"),
            timeout=ROLLOUT_TIMEOUT * 3,
            interval=1,
            message=f"rollout {name} finished; operator log {self.operator.log}",
        )
        return body

    def pending_upgrades(self) -> set[tuple[str, str]]:
        """(namespace, revision) of each revision pending-upgrade: a helm upgrading now, or killed while it
        did (helm's rollback leaves that revision's status as it was)."""
        secrets = self.core.list_secret_for_all_namespaces(label_selector="owner=helm,status=pending-upgrade")
        return {(s.metadata.namespace, s.metadata.labels["version"]) for s in secrets.items}

    def helm_history(self, name: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [
                "helm",
                "--kubeconfig",
                str(self.kubeconfig),
                "history",
                "instance",
                "-n",
                f"customer-{name}",
                "-o",
                "json",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        history: list[dict[str, Any]] = json.loads(out)
        return history


def running(body: dict[str, Any]) -> str | None:
    return ((body.get("status") or {}).get("release") or {}).get("chartVersion")


def healthy_on(body: dict[str, Any], version: str) -> bool:
    status = body.get("status") or {}
    release = status.get("release") or {}
    ready = next((c for c in status.get("conditions") or () if c["type"] == "Ready"), {})
    return (
        release.get("chartVersion") == version
        and release.get("targetVersion") == version
        and ready.get("status") == "True"
    )


class Sampler(threading.Thread):
    """Every half second: the rollout's status, then the Customers (so the Customers are never older
    than the counts they are compared with)."""

    def __init__(self, fleet: Fleet, rollout: str, target: str) -> None:
        super().__init__(daemon=True)
        self.fleet, self.rollout_name, self.target = fleet, rollout, target
        self.stop = threading.Event()
        self.most_upgrading = 0
        self.overcounted: list[str] = []
        self.moves: dict[str, set[str]] = {}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            status = self.fleet.rollout(self.rollout_name).get("status") or {}
            customers = self.fleet.customers()
            self.samples += 1
            target = self.target
            moved = [
                c
                for c in customers.values()
                if (c["metadata"].get("annotations") or {}).get(ROLLOUT_CHART_VERSION) == target
            ]
            upgrading = [c for c in moved if not healthy_on(c, target)]
            self.most_upgrading = max(self.most_upgrading, len(upgrading))
            healthy = sum(healthy_on(c, target) for c in moved)
            if (status.get("healthy") or 0) > healthy:
                self.overcounted.append(
                    f"rollout says {status.get('healthy')} healthy, Customers show {healthy}"
                )
            for c in moved:
                stamp = c["metadata"]["annotations"].get(ROLLOUT_UPDATED_AT, "")
                self.moves.setdefault(c["metadata"]["name"], set()).add(stamp)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.join(10)


@pytest.fixture(scope="module")
def registry_versions(
    chart_registry: ChartRegistry, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A good version and a bad one (its Pods ask for a node that does not exist, so its Deployments
    never become available), pushed to the session's registry."""
    good, bad, later = f"0.5.{stamp()}", f"0.6.{stamp()}", f"0.7.{stamp()}"
    chart_registry.push(CHART, good)
    chart_registry.push(CHART, later)
    broken = tmp_path_factory.mktemp("bad-chart") / "customer-instance"
    shutil.copytree(CHART, broken)
    values = yaml.safe_load((broken / "values.yaml").read_text())
    values["nodeSelector"] = {"iotistic.io/no-such-node": "true"}
    (broken / "values.yaml").write_text(yaml.safe_dump(values))
    chart_registry.push(broken, bad)
    return {"good": good, "bad": bad, "later": later}


@pytest.fixture(scope="module")
def fleet(
    k8s_client: kubernetes.client.ApiClient,
    kubeconfig: Path,
    operator: OperatorProcess,
    chart_registry: ChartRegistry,
    registry_versions: dict[str, str],
) -> Iterator[Fleet]:
    """The operator on the registry's chart (the fleet at 0.1.0), and 30 Customers Ready on it."""
    operator.stop()
    operator.start(
        INSTANCE_CHART=chart_registry.reference("customer-instance"),
        INSTANCE_CHART_VERSION=BASE,
        INSTANCE_CHART_PLAIN_HTTP="true",
    )
    fleet = Fleet(k8s_client, kubeconfig, operator)
    try:
        for name in fleet.names:
            manifest = customer_manifest(name, plan="starter")
            manifest["metadata"]["labels"] = {"fleet": fleet.label}
            fleet.objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, manifest)
        wait_until(
            lambda: sum(healthy_on(c, BASE) for c in fleet.customers().values()) == FLEET_SIZE,
            timeout=ROLLOUT_TIMEOUT * 2,
            interval=1,
            message=f"30 Customers Ready on {BASE}; operator log {operator.log}",
        )
        yield fleet
    finally:
        if os.environ.get("E2E_KUBECONFIG"):  # an existing cluster outlives the suite
            for name in fleet.names:
                fleet.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        operator.stop()
        operator.start()


def test_a_good_version_reaches_every_customer_in_steps(
    fleet: Fleet, registry_versions: dict[str, str]
) -> None:
    good, rollout = registry_versions["good"], unique_name("good")
    canaries = fleet.names[7:9]
    bake = 4  # long enough to tell a bake from none (each step's bake is asserted below)
    steps = [
        {"customers": canaries, "maxParallel": 5, "bakeSeconds": bake},
        {"percent": 25, "maxParallel": 5, "bakeSeconds": bake},
        {"rest": True, "maxParallel": 5, "bakeSeconds": bake},
    ]
    with Sampler(fleet, rollout, good) as sampler:
        fleet.create_rollout(rollout, good, steps)
        done = fleet.finished(rollout)
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    customers = fleet.customers()
    assert all(healthy_on(c, good) for c in customers.values())
    assert sampler.samples > 20 and sampler.most_upgrading <= 5, sampler.most_upgrading
    assert not sampler.overcounted, sampler.overcounted[:3]

    # The steps ran in order: each began after the one before had baked; canaries first.
    steps_status = status["steps"]
    assert [s["selected"] for s in steps_status] == [2, 8, 20]
    for before, after in itertools.pairwise(steps_status):
        assert before["completedAt"] <= after["startedAt"]
        baked = datetime.fromisoformat(before["completedAt"]) - datetime.fromisoformat(before["healthyAt"])
        assert baked.total_seconds() >= bake
    # The annotation has whole seconds; the next step's first moves are made by the tick that completes
    # the step, at the same instant.
    moved_at = {
        n: datetime.fromisoformat(c["metadata"]["annotations"][ROLLOUT_UPDATED_AT])
        for n, c in customers.items()
    }
    canaries_done = datetime.fromisoformat(steps_status[0]["completedAt"])
    assert max(moved_at[n] for n in canaries) <= canaries_done
    assert min(t for n, t in moved_at.items() if n not in canaries) >= canaries_done.replace(microsecond=0)
    # Each Customer was moved once and upgraded once (revision 1 the install, 2 the new version).
    assert all(len(stamps) == 1 for stamps in sampler.moves.values()) and len(sampler.moves) == FLEET_SIZE
    for name in fleet.names[:3] + canaries:
        history = fleet.helm_history(name)
        assert [h["chart"] for h in history] == [f"customer-instance-{BASE}", f"customer-instance-{good}"]


def test_a_bad_version_is_stopped_at_the_canaries_and_rolled_back(
    fleet: Fleet, registry_versions: dict[str, str]
) -> None:
    bad, rollout = registry_versions["bad"], unique_name("bad")
    # The version the fleet runs now: the good one after the test above, the base one when this runs
    # first on a fresh fleet.
    before = {n: running(c) for n, c in fleet.customers().items()}
    canaries = fleet.names[:2]
    [good] = {before[n] for n in fleet.names}
    fleet.create_rollout(
        rollout,
        bad,
        [{"customers": canaries}, {"percent": 25}, {"rest": True}],
        healthGate={"timeoutSeconds": 20, "maxFailures": 1},
        onFailure="rollback",
    )
    done = fleet.finished(rollout)
    status = done["status"]
    assert status["phase"] == "RolledBack", status
    failed = {f["customer"]: f for f in status["failures"]}
    assert set(failed) <= set(canaries) and failed
    for failure in failed.values():
        assert failure["reason"] == "HealthTimeout" and "waiting for Deployments" in failure["message"], (
            failure
        )
        assert failure["previousVersion"] == good
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "RolledBack"
    # The canaries are back on the version they had, and Ready; the other 28 never left it.
    wait_until(
        lambda: all(healthy_on(fleet.customers()[n], good) for n in canaries),
        timeout=ROLLOUT_TIMEOUT,
        message="canaries Ready on the good version again",
    )
    after = fleet.customers()
    for name in fleet.names[2:]:
        assert running(after[name]) == before[name] == good
        assert (after[name]["metadata"].get("annotations") or {}).get(ROLLOUT_NAME) != rollout
    history = fleet.helm_history(fleet.names[5])
    assert all(h["chart"] != f"customer-instance-{bad}" for h in history)


def test_a_paused_rollout_starts_nothing_and_a_killed_operator_resumes_where_it_was(
    fleet: Fleet, registry_versions: dict[str, str]
) -> None:
    later, rollout = registry_versions["later"], unique_name("later")
    with Sampler(fleet, rollout, later) as sampler:
        group = fleet.names[10:18]  # eight Customers are enough to pause between
        fleet.create_rollout(rollout, later, [{"customers": group, "maxParallel": 2}])
        wait_until(lambda: (fleet.rollout(rollout).get("status") or {}).get("updated", 0) >= 2, timeout=60)
        fleet.objects.patch_cluster_custom_object(
            GROUP, VERSION, ROLLOUT_PLURAL, rollout, {"spec": {"paused": True}}
        )
        wait_until(lambda: fleet.phase(rollout, "Paused"), timeout=30, message="paused")
        moved = moved_to(fleet, later)
        fleet.operator.kill()  # mid-rollout, maybe mid-upgrade
        fleet.operator.start(**fleet.operator.overrides)
        # Paused across the restart: nothing new is moved.
        wait_until(lambda: fleet.phase(rollout, "Paused"), timeout=30)
        still = moved_to(fleet, later)
        assert still == moved and len(moved) <= 4, (moved, still)
        # Resumed with more at once: the spec may change mid-rollout.
        resume = {"spec": {"paused": False, "steps": [{"customers": group, "maxParallel": 3}]}}
        fleet.objects.patch_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, rollout, resume)
        # Killed again while it progresses, some of the group moved and some not yet, in the middle of a
        # helm upgrade: its revision is left pending-upgrade, which the operator restarted in its place
        # recovers at once (the CI run that killed one by chance waited out HELM_TIMEOUT, 6 min).
        wait_until(lambda: len(moved_to(fleet, later)) > len(moved), timeout=60, message="moving again")
        progressing = moved_to(fleet, later)
        assert len(progressing) < len(group), progressing
        upgrading = {f"customer-{name}" for name in group}

        def upgrades_begun() -> set[tuple[str, str]]:
            return {p for p in fleet.pending_upgrades() - before if p[0] in upgrading}

        before, stuck = fleet.pending_upgrades(), set[tuple[str, str]]()
        for _ in range(3):  # helm may end its upgrade between the look and the kill (a few ms of ~0.5 s)
            wait_until(upgrades_begun, timeout=60, interval=0.02, message="a helm upgrade")
            fleet.operator.kill()
            killed = upgrades_begun()
            fleet.operator.start(**fleet.operator.overrides)
            # Still pending once the kill has settled (helm's last write may have been on its way).
            stuck = killed & fleet.pending_upgrades()
            if stuck:
                break
        assert stuck, "no kill landed in a helm upgrade"
        # Recovered at once, not after HELM_TIMEOUT: its killed upgrade rolled back (helm leaves that
        # revision pending-upgrade), then run again.
        wait_until(
            lambda: all(
                any(
                    h["description"].startswith("Rollback to")
                    for h in fleet.helm_history(ns[len("customer-") :])
                )
                for ns, _ in stuck
            ),
            timeout=60,
            message="the killed upgrade recovered",
        )
        done = fleet.finished(rollout)
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert sampler.most_upgrading <= 3
    # Moved once each, across the kill; and one completed upgrade to the version each (a helm killed
    # mid-upgrade is rolled back and upgraded again: its attempt never completed).
    assert all(len(stamps) == 1 for stamps in sampler.moves.values()) and set(sampler.moves) == set(group)
    others = fleet.customers()
    assert all(running(others[n]) != later for n in set(fleet.names) - set(group))
    for name in group:
        history = fleet.helm_history(name)
        upgrades = [
            h
            for h in history
            if h["chart"] == f"customer-instance-{later}" and h["description"] == "Upgrade complete"
        ]
        assert len(upgrades) == 1, history


def moved_to(fleet: Fleet, version: str) -> set[str]:
    """The Customers a rollout has set to `version`."""
    return {
        name
        for name, body in fleet.customers().items()
        if (body["metadata"].get("annotations") or {}).get(ROLLOUT_CHART_VERSION) == version
    }
