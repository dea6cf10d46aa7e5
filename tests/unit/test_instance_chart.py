"""The chart store with a chart directory: the fleet runs the directory's version, and a pin to another
version is refused naming the field (the OCI side runs against a real registry in the integration
tests); the release step pulls a chart only for a release that needs it."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import pytest
from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import (
    ConditionStatus,
    ConditionType,
    InstanceSpec,
    LicenseStatus,
    ReleaseStatus,
    set_condition,
)
from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.charts import ChartStore, ChartUnavailable
from iotistic_billing.operator.conditions import release_condition
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.deployments import DeploymentState, instance_health
from iotistic_billing.operator.helm import Helm, HelmError, HelmRelease, _release, manifest_deployments
from iotistic_billing.operator.outcomes import InstanceHealth
from iotistic_billing.operator.release import ensure_release
from iotistic_billing.operator.state import PassTarget
from iotistic_billing.operator.values import desired_release_values, values_hash
from iotistic_billing.settings import load_settings
from tests.unit.test_customer_instance_chart import chart_before_issuer_at
from tests.unit.test_operator_state import NOW, target

CHART = Path(__file__).resolve().parents[2] / "charts" / "customer-instance"


def store(tmp_path: Path) -> ChartStore:
    return ChartStore(load_settings(instance_chart=str(CHART)), Helm("helm", None, 1, timeout=60), tmp_path)


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
            super().__init__("helm", None, 1, timeout=60)
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


# The licence a Customer's release was installed with.
LICENCE = LicenseStatus(
    jti="j1", issued_at=NOW - timedelta(days=1), expires_at=NOW + timedelta(days=29), sha256="a" * 64
)


class RegistryAway(Helm):
    """helm with an OCI registry that cannot be reached; any install or upgrade is a failure of the test."""

    def __init__(self) -> None:
        super().__init__("helm", None, 1, timeout=60)
        self.pulls = 0

    async def pull(self, *args: Any, **kwargs: Any) -> None:
        self.pulls += 1
        raise HelmError("pull", "dial tcp 127.0.0.1:5000: connect: connection refused")

    async def upgrade_install(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("helm upgrade ran")


class DeployedRevisions:
    """helm's storage Secrets of the release: revision -> labels; and the Pods of the billing namespace
    by name (their metadata), or a refusal of every Pod read (`pods_refused`, the chart's RBAC before)."""

    def __init__(self, revisions: dict[int, dict[str, str]]) -> None:
        self.revisions = revisions
        self.pods: dict[str, dict[str, Any]] = {}
        self.pods_refused = False
        self.pod_reads: list[str] = []

    async def helm_release_revisions(self, namespace: str, name: str) -> dict[int, dict[str, str]]:
        return self.revisions

    async def read_pod_metadata(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.pod_reads.append(f"{namespace}/{name}")
        if self.pods_refused:
            raise ApiException(status=403, reason="Forbidden")
        return self.pods.get(name)


async def test_a_registry_away_after_a_restart_leaves_a_current_release_as_it_is(tmp_path: Path) -> None:
    """Found in review: the chart was pulled before helm's deployed revision was looked at, and the
    cache is empty after every start, so a registry away then failed every Ready Customer's pass
    (ChartPullFailed, Ready False) though nothing was to be installed."""
    settings = load_settings(
        instance_chart="oci://127.0.0.1:5000/charts/customer-instance",
        instance_chart_version="0.1.0",
        billing_url="http://billing.example",
    )
    helm = RegistryAway()
    licence = LICENCE
    aim = target()
    digest = values_hash(desired_release_values(aim, settings, licence.sha256), "0.1.0")
    kube = DeployedRevisions({3: {"status": "deployed", c.LABEL_VALUES_HASH: digest}})
    ctx = cast(
        OperatorContext,
        SimpleNamespace(
            settings=settings,
            helm=helm,
            kube=kube,
            charts=ChartStore(settings, helm, tmp_path),
            deployments=KeptDeployments(list(INSTANCE_DEPLOYMENTS)),
        ),
    )
    running = ReleaseStatus(
        name=c.RELEASE_NAME,
        namespace=aim.namespace,
        revision=3,
        chart_version="0.1.0",
        values_hash=digest,
        deployments=list(INSTANCE_DEPLOYMENTS),
    )

    outcome = await ensure_release(ctx, aim, licence, running, may_exist=True)
    assert (outcome.result, outcome.reason, outcome.release) == ("unchanged", c.RELEASE_UNCHANGED, running)
    assert helm.pulls == 0

    # New values need the chart: the registry away is then a retried failure, not a stall.
    renewed = licence.model_copy(update={"sha256": "b" * 64})
    outcome = await ensure_release(ctx, aim, renewed, running, may_exist=True)
    assert (outcome.result, outcome.reason, outcome.permanent) == ("failed", c.CHART_PULL_FAILED, False)
    assert "connection refused" in outcome.message and helm.pulls == 1


class Upgrading(Helm):
    """helm whose upgrade renders the chart's five Deployments, at the next revision."""

    def __init__(self) -> None:
        super().__init__("helm", None, 1, timeout=60)
        self.upgrades = 0

    async def upgrade_install(self, name: str, namespace: str, *args: Any, **kwargs: Any) -> HelmRelease:
        self.upgrades += 1
        return HelmRelease(name, namespace, 3 + self.upgrades, "deployed", "0.1.0", INSTANCE_DEPLOYMENTS)


class KeptDeployments:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    async def of(self, namespace: str, helm_ran: bool) -> list[DeploymentState]:
        return [DeploymentState(name, "uid-" + name, 1, 1, 1, 1, 1, 1) for name in self.names]


INSTANCE_DEPLOYMENTS = tuple(
    f"instance-{part}" for part in ("api", "dashboard", "exporter", "mosquitto", "redis")
)


def test_the_release_s_deployments_are_read_from_helm_s_manifest() -> None:
    rendered = subprocess.run(
        [str(find_binary("helm")), "template", "instance", str(CHART), "--values", "-"],
        input=json.dumps(
            {"customerId": "cust_abcdef", "plan": "starter", "domain": "a.example", "billingUrl": "http://b"}
            | {"license": {"maxDevices": 10, "sha256": "0" * 64}}
        ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert manifest_deployments(rendered, "instance", "customer-acme") == INSTANCE_DEPLOYMENTS
    # Whatever order a chart writes kind and metadata in; other kinds are not Deployments. Found in review:
    # a Deployment the operator does not follow (not labelled with the release, in another namespace)
    # was never seen present, and every pass upgraded for it.
    labelled = "  labels:\n    app.kubernetes.io/instance: instance\n"
    documents = [
        "kind: Service\nmetadata:\n  name: api\n" + labelled,
        "metadata:\n" + labelled + "  name: 'web'\nkind: Deployment",
        "kind: Deployment\nmetadata: {name: flow, labels: {app.kubernetes.io/instance: instance}}",
        "kind: Deployment\nmetadata:\n  name: worker\n  labels:\n    app: worker\n",
        "kind: Deployment\nmetadata:\n  name: elsewhere\n  namespace: other\n" + labelled,
        "kind: Deployment\nmetadata:\n  name: here\n  namespace: customer-acme\n" + labelled,
    ]
    assert manifest_deployments("\n---\n".join(documents), "instance", "customer-acme") == (
        "flow",
        "here",
        "web",
    )


class ReleaseStep(NamedTuple):
    ctx: OperatorContext
    aim: PassTarget
    digest: str  # of the values LICENCE wants on the chart directory
    revisions: dict[int, dict[str, str]]  # helm's storage: revision 3 deployed with those values
    kept: KeptDeployments  # the chart's five Deployments, all present

    def release(self, **fields: Any) -> ReleaseStatus:
        """Revision 3 of the release, as a status reports it."""
        return ReleaseStatus(
            name=c.RELEASE_NAME,
            namespace=self.aim.namespace,
            revision=3,
            chart_version="0.1.0",
            values_hash=self.digest,
            **fields,
        )


def release_step(helm: Helm, tmp_path: Path, chart: Path = CHART) -> ReleaseStep:
    """The release step over the chart directory, its release deployed at revision 3 with the values it
    wants."""
    settings = load_settings(instance_chart=str(chart), billing_url="http://billing.example")
    aim = target()
    digest = values_hash(desired_release_values(aim, settings, LICENCE.sha256), "0.1.0")
    revisions = {3: {"status": "deployed", c.LABEL_VALUES_HASH: digest}}
    kept = KeptDeployments(list(INSTANCE_DEPLOYMENTS))
    ctx = cast(
        OperatorContext,
        SimpleNamespace(
            settings=settings,
            helm=helm,
            kube=DeployedRevisions(revisions),
            charts=ChartStore(settings, helm, tmp_path),
            deployments=kept,
            clock=lambda: NOW,
            pod_checks_skipped=set(),
        ),
    )
    return ReleaseStep(ctx, aim, digest, revisions, kept)


async def test_a_deleted_deployment_of_a_current_release_is_put_back_by_an_upgrade(tmp_path: Path) -> None:
    """Found in review: helm's deployed revision was current, so a Deployment deleted behind helm's
    back (`kubectl delete deployment`) never came back, and readiness, judged by the Deployments left,
    stayed True. The revision's Deployments are in the status; a missing one makes the pass upgrade,
    which recreates it, and Ready waits for it."""
    helm = Upgrading()
    step = release_step(helm, tmp_path)
    ctx, aim, licence, kept = step.ctx, step.aim, LICENCE, step.kept
    running = step.release(deployments=list(INSTANCE_DEPLOYMENTS))
    outcome = await ensure_release(ctx, aim, licence, running, may_exist=True)
    assert (outcome.result, outcome.release, helm.upgrades) == ("unchanged", running, 0)

    kept.names.remove("instance-api")
    assert instance_health(await kept.of(aim.namespace, False), True, running.deployments) == InstanceHealth(
        False, c.DEPLOYMENTS_UNAVAILABLE, "missing Deployments: instance-api"
    )
    outcome = await ensure_release(ctx, aim, licence, running, may_exist=True)
    assert (outcome.result, outcome.reason, helm.upgrades) == ("upgraded", c.UPGRADE_SUCCEEDED, 1)
    assert outcome.message == "upgraded to revision 4 (instance-api had been deleted)"
    assert outcome.release is not None and outcome.release.deployments == list(INSTANCE_DEPLOYMENTS)


class ValuesKept(Upgrading):
    """helm that keeps the values of each upgrade."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[dict[str, Any]] = []
        self.digests: list[str] = []

    async def upgrade_install(self, name: str, namespace: str, *args: Any, **kwargs: Any) -> HelmRelease:
        self.values.append(args[1])
        self.digests.append(args[2])
        return await super().upgrade_install(name, namespace, *args, **kwargs)


async def test_a_customer_s_extra_env_of_the_operator_s_variables_is_left_out_and_said(
    tmp_path: Path,
) -> None:
    """Found in review: a Customer stored before the CRD refused the operator's variables in extraEnv
    (IOTISTIC_LICENSE_KEY pinned to a literal licence) overrode the licence Secret's; the release is
    installed without them, and ReleaseDeployed's message names each one for its owner to remove."""
    helm = ValuesKept()
    step = release_step(helm, tmp_path)
    pinned = {"name": "IOTISTIC_LICENSE_KEY", "value": "eyJhbGc"}
    values = {"api": {"extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}, pinned]}}
    customer = step.aim.spec.model_copy(update={"instance": InstanceSpec(values=values)})
    aim = target(customer_spec=customer)

    outcome = await ensure_release(step.ctx, aim, LICENCE, step.release(), may_exist=True)

    assert (outcome.result, helm.upgrades) == ("upgraded", 1)
    assert helm.values[0]["api"]["extraEnv"] == [{"name": "LOG_LEVEL", "value": "debug"}]
    assert outcome.message == (
        "upgraded to revision 4; left out as the operator's variables (remove them):"
        " spec.instance.values.api.extraEnv[1].name IOTISTIC_LICENSE_KEY"
    )


async def test_a_chart_version_from_before_an_operator_value_is_sent_only_the_values_it_declares(
    tmp_path: Path,
) -> None:
    """Found in review: the operator sent license.issuer and license.audience to every chart version, and
    each one published before them refuses both (its `license` closed by additionalProperties false):
    after an operator upgrade every Customer on such a version stalled in UpgradeFailed. The release step
    reads the version's values.schema.json and leaves out the operator's values it does not declare; the
    digest stays the one of every value the operator wants, known before the chart is pulled."""
    helm = ValuesKept()
    step = release_step(helm, tmp_path / "cache", chart_before_issuer_at(tmp_path / "chart"))
    step.revisions[3][c.LABEL_VALUES_HASH] = "of the operator before"

    outcome = await ensure_release(step.ctx, step.aim, LICENCE, None, may_exist=True)

    assert (outcome.result, helm.upgrades) == ("upgraded", 1)
    assert sorted(helm.values[0]["license"]) == ["maxDevices", "secretName", "sha256"]
    assert helm.digests == [step.digest]
    step.revisions[3]["status"] = "superseded"
    step.revisions[4] = {"status": "deployed", c.LABEL_VALUES_HASH: step.digest}
    again = await ensure_release(step.ctx, step.aim, LICENCE, outcome.release, may_exist=True)
    assert (again.result, helm.upgrades) == ("unchanged", 1)


async def test_the_note_of_extra_env_left_out_goes_once_its_entries_are_removed(tmp_path: Path) -> None:
    """Found in review: ReleaseDeployed kept saying the entries were left out (remove them) after they
    were removed: their removal leaves the values the operator sends as they were (left out already), so
    the release was unchanged, and the condition kept the last upgrade's message, note and all."""
    helm = ValuesKept()
    step = release_step(helm, tmp_path)
    mine = {"name": "LOG_LEVEL", "value": "debug"}
    pinned = {"name": "IOTISTIC_LICENSE_KEY", "value": "eyJhbGc"}

    def with_env(*entries: dict[str, str]) -> PassTarget:
        values = {"api": {"extraEnv": list(entries)}}
        return target(
            customer_spec=step.aim.spec.model_copy(update={"instance": InstanceSpec(values=values)})
        )

    with_pin = with_env(mine, pinned)
    first = await ensure_release(step.ctx, with_pin, LICENCE, None, may_exist=True)
    assert first.result == "upgraded"
    said = set_condition(
        None,
        type_=ConditionType.RELEASE_DEPLOYED,
        status=ConditionStatus.TRUE,
        reason=first.reason,
        message=first.message,
        observed_generation=1,
        now=NOW,
    )
    assert "IOTISTIC_LICENSE_KEY" in first.message
    step.revisions[3]["status"] = "superseded"
    step.revisions[4] = {"status": "deployed", c.LABEL_VALUES_HASH: helm.digests[0]}

    kept = await ensure_release(step.ctx, with_pin, LICENCE, first.release, may_exist=True)
    removed = await ensure_release(step.ctx, with_env(mine), LICENCE, first.release, may_exist=True)

    assert (kept.result, removed.result, helm.upgrades) == ("unchanged", "unchanged", 1)
    still = release_condition(kept, said)
    assert still is not None and still.message == first.message
    gone = release_condition(removed, said)
    assert gone is not None and (gone.reason, gone.message) == (c.UPGRADE_SUCCEEDED, "upgraded to revision 4")


class Manifests(Upgrading):
    """helm whose deployed revision's manifest has the chart's five Deployments."""

    def __init__(self) -> None:
        super().__init__()
        self.manifest_reads: list[int] = []

    async def deployments(self, name: str, namespace: str, revision: int) -> tuple[str, ...]:
        self.manifest_reads.append(revision)
        return INSTANCE_DEPLOYMENTS


async def test_a_release_whose_status_lacks_its_deployments_reads_them_once_from_the_manifest(
    tmp_path: Path,
) -> None:
    """A release installed by an earlier operator (or whose status write after helm was lost) had no
    status.release.deployments, so a Deployment deleted behind helm's back came back only with its next
    upgrade: the deployed revision's manifest is read once, and the status keeps what it says."""
    helm = Manifests()
    step = release_step(helm, tmp_path)
    ctx, aim, licence, kept = step.ctx, step.aim, LICENCE, step.kept
    earlier = step.release()
    outcome = await ensure_release(ctx, aim, licence, earlier, may_exist=True)
    assert (outcome.result, helm.manifest_reads, helm.upgrades) == ("unchanged", [3], 0)
    assert outcome.release == earlier.model_copy(update={"deployments": list(INSTANCE_DEPLOYMENTS)})

    # The next pass starts from the status that pass wrote: no helm call, and a deleted one is put back.
    kept.names.remove("instance-api")
    outcome = await ensure_release(ctx, aim, licence, outcome.release, may_exist=True)
    assert (outcome.result, helm.manifest_reads, helm.upgrades) == ("upgraded", [3], 1)
    assert outcome.message == "upgraded to revision 4 (instance-api had been deleted)"


async def test_a_helm_killed_mid_upgrade_is_not_left_behind_a_deployed_revision(tmp_path: Path) -> None:
    """Found in review: helm killed while upgrading to new values leaves revision 4 pending-upgrade, part
    of it applied; a pass that wants revision 3's values again took 3 as current and ran no helm, so
    the half-applied objects stayed. helm runs (and its stuck release is recovered first)."""
    helm = Upgrading()
    step = release_step(helm, tmp_path)
    ctx, aim, licence, revisions, digest = step.ctx, step.aim, LICENCE, step.revisions, step.digest
    revisions[4] = {"status": "pending-upgrade", c.LABEL_VALUES_HASH: "newer"}
    running = step.release()
    outcome = await ensure_release(ctx, aim, licence, running, may_exist=True)
    assert (outcome.result, helm.upgrades) == ("upgraded", 1)

    revisions[4]["status"] = "superseded"  # an older failed one below a deployed revision is history
    revisions[5] = {"status": "deployed", c.LABEL_VALUES_HASH: digest}
    outcome = await ensure_release(ctx, aim, licence, running, may_exist=True)
    assert (outcome.result, helm.upgrades) == ("unchanged", 1)


async def test_a_failed_upgrade_is_not_left_behind_a_deployed_revision(tmp_path: Path) -> None:
    """Found in review: an upgrade to new values that failed part-way leaves revision 4 failed, part of it
    applied, and 3 deployed; a pass that wants revision 3's values again (the spec changed back, a
    rollout rolled back) took 3 as current and ran no helm, so the half-applied objects stayed."""
    helm = Upgrading()
    step = release_step(helm, tmp_path)
    step.revisions[4] = {"status": "failed", c.LABEL_VALUES_HASH: "newer"}
    running = step.release(deployments=list(INSTANCE_DEPLOYMENTS))
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, running, may_exist=True)
    assert (outcome.result, outcome.message, helm.upgrades) == ("upgraded", "upgraded to revision 4", 1)


class InProgress(Upgrading):
    """helm that finds the release's newest revision `status` since `began` (another operation in
    progress) until it is rolled back or uninstalled; `helm status` answers as helm v4 does."""

    def __init__(self, revision: int, status: str, began: datetime) -> None:
        super().__init__()
        self.revision, self.pending, self.began = revision, status, began
        self.recoveries: list[str] = []

    async def upgrade_install(self, name: str, namespace: str, *args: Any, **kwargs: Any) -> HelmRelease:
        if self.pending:
            message = "Error: UPGRADE FAILED: another operation (install/upgrade/rollback) is in progress"
            raise HelmError("upgrade", message)
        return await super().upgrade_install(name, namespace, *args, **kwargs)

    async def status(self, name: str, namespace: str) -> HelmRelease | None:
        when = self.began.isoformat().replace("+00:00", "Z")
        info = {"first_deployed": when, "last_deployed": when, "status": self.pending}
        return _release({"name": name, "namespace": namespace, "version": self.revision, "info": info})

    async def rollback(self, name: str, namespace: str, revision: int | None = None) -> None:
        self.recoveries.append("rollback" if revision is None else f"rollback to {revision}")
        self.pending = ""

    async def uninstall(self, name: str, namespace: str) -> bool:
        self.recoveries.append("uninstall")
        self.pending = ""
        return True


@pytest.mark.parametrize(
    ("pending", "recovery", "reason"),
    [
        # To revision 3, the deployed one before it.
        ("pending-upgrade", "rollback to 3", c.UPGRADE_FAILED),
        ("pending-rollback", "rollback to 3", c.UPGRADE_FAILED),
        # Onto itself: an uninstall deleted what the install had made (the generated passwords), while the
        # database's volume outlives it with the old ones.
        ("pending-install", "rollback to 1", c.INSTALL_FAILED),
    ],
)
async def test_a_pending_revision_is_recovered_only_once_its_helm_would_have_been_killed(
    tmp_path: Path, pending: str, recovery: str, reason: str
) -> None:
    """Found in review: helm's "another operation is in progress" rolled the release back (or
    uninstalled it) at once, also when the pending revision was another process's helm still running
    (a Customer relabelled to another shard while the old shard's pass was in helm). A revision younger
    than HELM_TIMEOUT is left to its helm, a failure retried; an older one's helm was killed or died."""
    installing = pending == "pending-install"
    revision = 1 if installing else 4
    helm = InProgress(revision, pending, NOW - timedelta(seconds=30))
    step = release_step(helm, tmp_path)
    if installing:
        step.revisions.clear()
    step.revisions[revision] = {"status": pending, c.LABEL_VALUES_HASH: "newer"}
    running = None if installing else step.release()
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, running, may_exist=True)
    assert (outcome.result, outcome.reason, outcome.permanent) == ("failed", reason, False)
    assert "another operation (install/upgrade/rollback) is in progress" in outcome.message
    assert f"revision {revision} has been {pending} for 30 s" in outcome.message, outcome.message
    assert (helm.recoveries, helm.upgrades) == ([], 0)

    helm.began = NOW - timedelta(seconds=step.ctx.settings.helm_timeout + 1)
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, running, may_exist=True)
    assert outcome.deployed and (helm.recoveries, helm.upgrades) == ([recovery], 1)


@pytest.mark.parametrize(
    ("pending", "runner", "began", "recovered"),
    [
        # The process before this one here, killed with its helm.
        ("pending-upgrade", "here", NOW - timedelta(seconds=30), True),
        ("pending-install", "here", NOW - timedelta(seconds=30), True),
        # Another replica's or shard's: maybe still at work.
        ("pending-upgrade", "elsewhere", NOW - timedelta(seconds=30), False),
        # Begun since this process started: not a predecessor's.
        ("pending-upgrade", "here", NOW + timedelta(seconds=30), False),
        # A revision from before the label.
        ("pending-upgrade", None, NOW - timedelta(seconds=30), False),
        # A rollback's revision has the labels of the one it goes back to: they say nothing of who rolls back.
        ("pending-rollback", "here", NOW - timedelta(seconds=30), False),
    ],
)
async def test_a_pending_revision_its_predecessor_here_began_is_recovered_at_once(
    tmp_path: Path, pending: str, runner: str | None, began: datetime, recovered: bool
) -> None:
    """Found in CI (the fleet rollout's operator killed mid-upgrade): the operator restarted in its place
    left the revision its predecessor's helm had begun pending for HELM_TIMEOUT (6 min by default), the
    Customer's upgrade stalled as long, though that helm had died with the process. The revision's
    helm-runner label names where it was begun: an upgrade or install begun in this process's place
    before it started is recovered at once; any other stays left until HELM_TIMEOUT."""
    installing = pending == "pending-install"
    revision = 1 if installing else 4
    helm = InProgress(revision, pending, began)
    helm.runner, helm.started = "here", NOW
    step = release_step(helm, tmp_path)
    if installing:
        step.revisions.clear()
    step.revisions[revision] = {"status": pending, c.LABEL_VALUES_HASH: "newer"}
    if runner is not None:
        step.revisions[revision][c.LABEL_HELM_RUNNER] = runner
    running = None if installing else step.release()
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, running, may_exist=True)
    if recovered:
        recovery = "rollback to 1" if installing else "rollback to 3"
        assert outcome.deployed and (helm.recoveries, helm.upgrades) == ([recovery], 1), outcome
    else:
        assert (outcome.result, outcome.reason) == ("failed", c.UPGRADE_FAILED), outcome
        assert f"has been {pending}" in outcome.message and helm.recoveries == [], outcome.message


@pytest.mark.parametrize(
    ("revisions", "recovery"),
    [
        # helm's default, the revision before, is the upgrade that failed (chart 0.3.0).
        ({5: "deployed", 6: "failed", 7: "pending-upgrade"}, "rollback to 5"),
        # The deployed one's history kept past those older (helm keeps the deployed revision).
        ({2: "superseded", 5: "deployed", 6: "failed", 7: "pending-rollback"}, "rollback to 5"),
        # Nothing deployed, an upgrade after an install that failed: onto itself, as a pending install.
        ({6: "failed", 7: "pending-upgrade"}, "rollback to 7"),
    ],
)
async def test_a_pending_revision_is_rolled_back_to_the_newest_deployed_not_the_one_before(
    tmp_path: Path, revisions: dict[int, str], recovery: str
) -> None:
    """Found in review: a pending upgrade was rolled back with no revision, helm's current-1, which may
    be an upgrade that failed: {5 deployed, 6 failed (chart 0.3.0), 7 pending-upgrade} rolled every pod
    to the failed 0.3.0 manifest, and the pass's upgrade then rolled them all again. The recovery goes
    back to the newest deployed revision, the one the pods ran before the pending upgrade."""
    helm = InProgress(7, revisions[7], NOW - timedelta(hours=1))  # older than HELM_TIMEOUT
    step = release_step(helm, tmp_path)
    step.revisions.clear()
    for revision, status in revisions.items():
        step.revisions[revision] = {"status": status, c.LABEL_VALUES_HASH: "older"}
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, step.release(), may_exist=True)
    assert outcome.deployed and (helm.recoveries, helm.upgrades) == ([recovery], 1), outcome


# The uid of the operator Pod whose helm began the pending revision, and of a later Pod of its name.
HELM_POD_UID = "6c1f3a2e-8d4b-4f0a-9e7c-2b5d1a0f3c4e"
LATER_POD_UID = "0a9b8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d"


def _pod(uid: str, created: datetime, *, terminating: bool = False) -> dict[str, Any]:
    """A Pod's metadata as the API server answers a read of it (its clock, whole seconds)."""
    stamp = created.replace(microsecond=0).isoformat().replace("+00:00", "Z")
    meta = {"name": "operator-7d9f-abcde", "uid": uid, "creationTimestamp": stamp}
    return {"metadata": meta | ({"deletionTimestamp": stamp} if terminating else {})}


@pytest.mark.parametrize(
    ("pending", "labelled_uid", "pod", "recovered"),
    [
        # The Pod whose helm began it is gone (a rollout, a lost node, kubectl delete pod): helm with it.
        ("pending-upgrade", HELM_POD_UID, None, True),
        ("pending-install", HELM_POD_UID, None, True),
        # A Pod of that name with another uid (a StatefulSet's, made again): not its helm's, whatever its
        # creation time says (the API server's clock, here behind the operator's).
        ("pending-upgrade", HELM_POD_UID, _pod(LATER_POD_UID, NOW - timedelta(hours=1)), True),
        # The Pod itself, Terminating too: its helm may still be running. Its creation time, by the API
        # server's clock ahead of the operator's, says "after the revision began": no matter.
        ("pending-upgrade", HELM_POD_UID, _pod(HELM_POD_UID, NOW - timedelta(seconds=10)), False),
        (
            "pending-upgrade",
            HELM_POD_UID,
            _pod(HELM_POD_UID, NOW - timedelta(hours=1), terminating=True),
            False,
        ),
        # Labelled with the name alone (before the uid label): no Pod of that name is its helm gone; one
        # there may be that Pod, whenever it was made: it waits.
        ("pending-upgrade", None, None, True),
        ("pending-upgrade", None, _pod(LATER_POD_UID, NOW - timedelta(seconds=10)), False),
        # A rollback's revision has the labels of the one it goes back to: they name who wrote that one.
        ("pending-rollback", HELM_POD_UID, None, False),
    ],
)
async def test_a_pending_revision_whose_operator_pod_is_gone_is_recovered_at_once(
    tmp_path: Path, pending: str, labelled_uid: str | None, pod: dict[str, Any] | None, recovered: bool
) -> None:
    """Found with the container-restart recovery: an operator in a new Pod (a Deployment's rollout, a
    node lost, `kubectl delete pod`) left every revision its predecessor's helm had begun pending for
    HELM_TIMEOUT, as another process's helm might still run. The revision's helm-pod labels name the
    operator's Pod and its uid; when no Pod of that name is in the billing namespace, or one with
    another uid, that helm is dead, whichever process looks: recovered at once. The Pod still there
    keeps today's wait. Found in review: a Pod "made after the revision began" by its creation time was
    taken for a later one, comparing the API server's clock with the operator's: a skew longer than a
    live Pod's age rolled back a revision under its running helm."""
    installing = pending == "pending-install"
    revision = 1 if installing else 4
    helm = InProgress(revision, pending, NOW - timedelta(seconds=30) + timedelta(milliseconds=200))
    helm.runner, helm.started = "here", NOW - timedelta(hours=2)
    step = release_step(helm, tmp_path)
    kube = cast(DeployedRevisions, step.ctx.kube)
    if pod is not None:
        kube.pods["operator-7d9f-abcde"] = pod
    if installing:
        step.revisions.clear()
    step.revisions[revision] = {
        "status": pending,
        c.LABEL_VALUES_HASH: "newer",
        c.LABEL_HELM_RUNNER: "elsewhere",
        c.LABEL_HELM_POD: "operator-7d9f-abcde",
    }
    if labelled_uid is not None:
        step.revisions[revision][c.LABEL_HELM_POD_UID] = labelled_uid
    running = None if installing else step.release()
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, running, may_exist=True)
    if recovered:
        recovery = "rollback to 1" if installing else "rollback to 3"
        assert outcome.deployed and (helm.recoveries, helm.upgrades) == ([recovery], 1), outcome
        assert kube.pod_reads == [f"{step.ctx.settings.billing_namespace}/operator-7d9f-abcde"]
    else:
        assert (outcome.result, outcome.reason) == ("failed", c.UPGRADE_FAILED), outcome
        assert f"has been {pending} for 30 s, maybe under a helm still running" in outcome.message
        assert helm.recoveries == [], outcome.message


@pytest.mark.parametrize("cause", ["no label", "refused"])
async def test_a_pending_revision_whose_pod_cannot_be_told_waits_as_before_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cause: str
) -> None:
    """A revision written before the helm-pod label (or outside a Pod), or a Pod read the API server
    refuses (the chart's RBAC from before its operator Role): the revision waits for HELM_TIMEOUT as
    before, and the log says why once, not on every pass of every stuck Customer."""
    helm = InProgress(4, "pending-upgrade", NOW - timedelta(seconds=30))
    step = release_step(helm, tmp_path)
    kube = cast(DeployedRevisions, step.ctx.kube)
    step.revisions[4] = {"status": "pending-upgrade", c.LABEL_VALUES_HASH: "newer"}
    if cause == "refused":
        step.revisions[4][c.LABEL_HELM_POD] = "operator-7d9f-abcde"
        kube.pods_refused = True
    for _ in range(2):
        outcome = await ensure_release(step.ctx, step.aim, LICENCE, step.release(), may_exist=True)
        assert (outcome.result, outcome.reason) == ("failed", c.UPGRADE_FAILED), outcome
        assert "maybe under a helm still running" in outcome.message and helm.recoveries == []
    said = [record.getMessage() for record in caplog.records if "HELM_TIMEOUT" in record.getMessage()]
    expected = "refuses to read Pods" if cause == "refused" else f"without the label {c.LABEL_HELM_POD}"
    assert len(said) == 1 and expected in said[0], said


class FinishedMeanwhile(Upgrading):
    """helm whose first upgrade finds another helm at work on the release (in progress), which then
    finishes, deploying revision 4 with `digest`, before `helm status` looks."""

    def __init__(self, revisions: dict[int, dict[str, str]], digest: str) -> None:
        super().__init__()
        self.revisions, self.digest, self.attempts = revisions, digest, 0

    async def upgrade_install(self, name: str, namespace: str, *args: Any, **kwargs: Any) -> HelmRelease:
        self.attempts += 1
        if self.attempts == 1:
            self.revisions[3]["status"] = "superseded"
            self.revisions[4] = {"status": "deployed", c.LABEL_VALUES_HASH: self.digest}
            message = "Error: UPGRADE FAILED: another operation (install/upgrade/rollback) is in progress"
            raise HelmError("upgrade", message)
        return await super().upgrade_install(name, namespace, *args, **kwargs)

    async def status(self, name: str, namespace: str) -> HelmRelease | None:
        info = {"first_deployed": "2026-01-01T00:00:00Z", "last_deployed": "2026-01-01T00:00:00Z"}
        return _release(
            {"name": name, "namespace": namespace, "version": 4, "info": info | {"status": "deployed"}}
        )


async def test_a_stuck_upgrade_whose_other_helm_deployed_the_same_values_is_not_repeated(
    tmp_path: Path,
) -> None:
    """Found in review: helm answered "another operation is in progress" (the old shard's pass of a
    relabelled Customer, a helm run by hand), that helm finished with the values this pass wants, and the
    pass upgraded to them again: a revision more, the instance's pods rolled for nothing."""
    step = release_step(Upgrading(), tmp_path)
    # The wanted values, not revision 3's: a new licence.
    renewed = LICENCE.model_copy(update={"sha256": "b" * 64})
    wanted = values_hash(desired_release_values(step.aim, step.ctx.settings, renewed.sha256), "0.1.0")
    helm = FinishedMeanwhile(step.revisions, wanted)
    step.ctx.helm = helm  # type: ignore[misc]
    outcome = await ensure_release(step.ctx, step.aim, renewed, step.release(), may_exist=True)
    assert (outcome.result, outcome.reason, helm.attempts, helm.upgrades) == (
        "unchanged",
        c.RELEASE_UNCHANGED,
        1,
        0,
    )
    assert outcome.deployed and outcome.release is not None and outcome.release.revision == 4


class RollbackRefused(InProgress):
    """helm whose release is pending-install since long ago, and whose rollback onto it is refused (its
    manifest no longer accepted: an admission webhook, a quota)."""

    async def rollback(self, name: str, namespace: str, revision: int | None = None) -> None:
        self.recoveries.append(f"rollback to {revision}")
        raise HelmError(
            "rollback", 'Error: release instance failed: admission webhook "quota" denied the request'
        )


async def test_a_recovery_that_helm_refuses_is_a_failed_install_retried_not_an_exception(
    tmp_path: Path,
) -> None:
    """Found in review: the rollback's error escaped the pass (a traceback, no status written, the
    condition still saying the revision would be recovered)."""
    helm = RollbackRefused(1, "pending-install", NOW - timedelta(hours=1))
    step = release_step(helm, tmp_path)
    step.revisions.clear()
    step.revisions[1] = {"status": "pending-install", c.LABEL_VALUES_HASH: "newer"}
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, None, may_exist=True)
    assert (outcome.result, outcome.reason, outcome.permanent) == ("failed", c.INSTALL_FAILED, False)
    assert "its recovery failed: Error: release instance failed: admission webhook" in outcome.message
    assert (helm.recoveries, helm.upgrades) == (["rollback to 1"], 0)


async def test_a_pending_install_rolled_back_and_run_again_is_reported_installed(tmp_path: Path) -> None:
    """The pending install is recovered, then helm runs with the values wanted (its fresh Deployments
    read, not the watch's): the Customer's first install, whatever revision it took."""
    helm = InProgress(1, "pending-install", NOW - timedelta(hours=1))
    step = release_step(helm, tmp_path)
    step.revisions.clear()
    # The rollback copies the pending revision's labels: the values wanted.
    step.revisions[1] = {"status": "pending-install", c.LABEL_VALUES_HASH: step.digest}
    outcome = await ensure_release(step.ctx, step.aim, LICENCE, None, may_exist=True)
    assert (outcome.result, outcome.reason) == ("installed", c.INSTALL_SUCCEEDED)
    assert (helm.recoveries, helm.upgrades) == (["rollback to 1"], 1)
    assert outcome.message == "installed chart 0.1.0 at revision 4 (a pending install recovered)"
