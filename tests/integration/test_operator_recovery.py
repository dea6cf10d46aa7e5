"""Crash safety and timers: kill -9 between the licence and the helm step; renewal and trial expiry by
moving an injected clock through the very check the housekeeping daemon runs; the daemon's cadence."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from iotistic_billing.api_keys import usage_key_hash
from iotistic_billing.customer import (
    GROUP,
    NOTIFICATIONS_SECRET_KEY,
    NOTIFICATIONS_SECRET_NAME,
    PLURAL,
    VERSION,
    CustomerSpec,
)
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine
from iotistic_billing.db.models import ApiKey, LicenseHistory, Notice
from iotistic_billing.db.models import Customer as MirrorRow
from iotistic_billing.directory import Directory
from iotistic_billing.k8s import FieldManager, KubeApi
from iotistic_billing.operator import handlers
from iotistic_billing.operator.__main__ import build_context
from iotistic_billing.operator.context import OperatorContext, PassRetries
from iotistic_billing.operator.helm import HelmError
from iotistic_billing.operator.license import revoke_license
from iotistic_billing.operator.reconcile import reconcile
from iotistic_billing.operator.webhook_secret import WEBHOOK_SECRET_CHECK
from iotistic_billing.settings import load_settings
from tests.conftest import OperatorProcess, Retries, eventually, unique_name, wait_until
from tests.integration.test_operator import (
    Cluster,
    NoFleetList,
    _namespace_or_none,
    customer_manifest,
    history,
    operator_metric_total,
)

pytestmark = pytest.mark.integration


@pytest.fixture(name="cluster")
def cluster_fixture(
    k8s_client: kubernetes.client.ApiClient, kubeconfig: Path, operator: OperatorProcess
) -> Cluster:
    return Cluster(k8s_client, kubeconfig)


@pytest.fixture(name="paused_operator")
def paused_operator_fixture(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session operator, which the test may stop or restart with other settings; it runs again,
    as configured for the session, after the test whatever happens."""
    try:
        yield operator
    finally:
        operator.kill()
        operator.start()


async def test_operator_killed_between_licence_and_helm_converges_without_a_second_row(
    cluster: Cluster, paused_operator: OperatorProcess, db_engine: AsyncEngine, tmp_path: Path
) -> None:
    stuck_helm = tmp_path / "helm"
    stuck_helm.write_text(
        "#!/bin/sh\n# a helm that never returns: the operator dies while waiting for it\nsleep 600\n"
    )
    stuck_helm.chmod(0o755)
    paused_operator.stop()
    paused_operator.start(HELM_BINARY=str(stuck_helm))

    name = unique_name("crash")
    customer_id = f"cust_{name.replace('-', '')}"
    cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
    minted = wait_until(lambda: _secret_jti(cluster, name), message="licence Secret written")
    rows = await eventually(lambda: history(db_engine, customer_id), message="history row written")
    assert [r[0] for r in rows] == ["generated"]
    assert cluster.release(name) is None

    paused_operator.kill()
    paused_operator.start()

    wait_until(
        lambda: (cluster.release(name) or {}).get("status") == "deployed", timeout=60, message="deployed"
    )
    assert _secret_jti(cluster, name) == minted
    assert [(action, jti) for action, _, jti in await history(db_engine, customer_id)] == [
        ("generated", minted)
    ]


async def _halfway(cluster: Cluster, db_engine: AsyncEngine, name: str, customer_id: str) -> str:
    """What a pass leaves when it dies right after writing the licence Secret (or PostgreSQL refuses its
    transaction): the Secret, but no history row, no usage key row, and status.license not reporting it.
    Returns the Secret's licence jti."""
    jti = _secret_jti(cluster, name)
    assert jti is not None
    async with db_engine.begin() as connection:
        await connection.execute(delete(LicenseHistory).where(LicenseHistory.customer_id == customer_id))
        await connection.execute(delete(ApiKey).where(ApiKey.customer_id == customer_id))
    cluster.objects.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, name, {"status": {"license": None}}
    )
    return jti


async def _usage_key_stored(cluster: Cluster, db_engine: AsyncEngine, name: str) -> bool:
    _, data = cluster.license(name, verify_times=False)
    async with db_engine.connect() as connection:
        found = await connection.scalar(
            select(ApiKey.id).where(ApiKey.key_hash == usage_key_hash(data["usage-api-key"].decode()))
        )
    return found is not None


def _licensed_then_paused(
    cluster: Cluster, operator: OperatorProcess, prefix: str
) -> tuple[str, str, dict[str, Any]]:
    """A starter Customer with its licence, then the operator stopped: the test's passes are the only
    ones acting on it. Returns its name, customer id and status.license."""
    name = unique_name(prefix)
    customer_id = f"cust_{name.replace('-', '')}"
    cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
    license = wait_until(
        lambda: (cluster.customer(name) or {}).get("status", {}).get("license"), message="licence"
    )
    operator.stop()
    return name, customer_id, license


def test_an_operator_stopped_while_helm_installs_lets_it_finish_so_no_release_is_left_pending(
    cluster: Cluster, paused_operator: OperatorProcess, helm_binary: Path, tmp_path: Path
) -> None:
    """Found by the CI failure's follow-up: Kopf cancels its handlers 2 s after SIGTERM (a rollout of the
    operator, a drained node), and a helm cut off by the process's exit left its release pending-*: the
    operator in the new Pod left it for HELM_TIMEOUT (6 min). The stop waits for the helm it runs."""
    calls = tmp_path / "calls"
    slow_helm = tmp_path / "helm"
    # An install 5 s slower than helm's own: stopped in those 5 s, the operator cut it off before helm ran.
    slow_helm.write_text(
        f'#!/bin/sh\necho "began $*" >> "{calls}"\nif [ "$1" = upgrade ]; then sleep 5; fi\n'
        f'"{helm_binary}" "$@"\nrc=$?\necho "ended $*" >> "{calls}"\nexit $rc\n'
    )
    slow_helm.chmod(0o755)
    paused_operator.stop()
    paused_operator.start(HELM_BINARY=str(slow_helm))
    name = unique_name("stopping")
    cluster.create(customer_manifest(name, plan="starter"))

    def upgrades(state: str) -> list[str]:
        lines = calls.read_text().splitlines() if calls.exists() else []
        return [line for line in lines if line.startswith(f"{state} upgrade") and f"customer-{name} " in line]

    wait_until(lambda: upgrades("began"), message="helm upgrade started")
    paused_operator.stop()  # SIGTERM, as the kubelet sends
    assert upgrades("ended"), calls.read_text()
    release = cluster.release(name) or {}
    assert release.get("status") == "deployed", release


async def test_a_pass_that_ended_after_the_secret_records_its_licence_and_usage_key_later(
    cluster: Cluster, paused_operator: OperatorProcess, operator_env: dict[str, str], db_engine: AsyncEngine
) -> None:
    name, customer_id, _ = _licensed_then_paused(cluster, paused_operator, "halfway")
    jti = await _halfway(cluster, db_engine, name, customer_id)
    assert not await _usage_key_stored(cluster, db_engine, name)

    context = _context(operator_env, datetime.now(UTC))
    await reconcile(context, name)
    await context.engine.dispose()

    assert [(a, j) for a, _, j in await history(db_engine, customer_id)] == [("generated", jti)]
    # Without its row the instance's usage reports and licence fetches would be refused (401).
    assert await _usage_key_stored(cluster, db_engine, name)
    assert _secret_jti(cluster, name) == jti


async def test_a_licence_replaced_before_its_row_was_written_is_recorded_first(
    cluster: Cluster, paused_operator: OperatorProcess, operator_env: dict[str, str], db_engine: AsyncEngine
) -> None:
    name, customer_id, _ = _licensed_then_paused(cluster, paused_operator, "replaced")
    first = await _halfway(cluster, db_engine, name, customer_id)
    cluster.patch_spec(name, {"plan": "professional"})  # changed while the pass was being retried

    context = _context(operator_env, datetime.now(UTC))
    await reconcile(context, name)
    await context.engine.dispose()

    rows = await history(db_engine, customer_id)
    assert [(a, p) for a, p, _ in rows] == [("generated", "starter"), ("upgraded", "professional")]
    assert rows[0][2] == first and rows[1][2] == _secret_jti(cluster, name) != first


@pytest.mark.parametrize("token", [b"not-a-licence", b"\xff\xfe"])
async def test_a_licence_secret_edited_into_garbage_is_replaced_and_still_revocable(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
    token: bytes,
) -> None:
    name, customer_id, status = _licensed_then_paused(cluster, paused_operator, "garbled")
    namespace = f"customer-{name}"
    garbled = {"data": {"license.jwt": base64.b64encode(token).decode()}}
    cluster.core.patch_namespaced_secret("iotistic-license", namespace, garbled)

    # Deletion first: the revoked row is the last licence the history knows, not an error retried forever.
    context = _context(operator_env, datetime.now(UTC))
    secret = await context.kube.read_secret_data(namespace, "iotistic-license")
    assert await revoke_license(context, customer_id, secret, reason="test") is True
    assert [(a, j) for a, _, j in await history(db_engine, customer_id)] == [
        ("generated", status["jti"]),
        ("revoked", status["jti"]),
    ]

    # A pass mints a licence in its place instead of failing the Customer.
    await reconcile(context, name)
    await context.engine.dispose()
    replaced = _secret_jti(cluster, name)
    assert replaced is not None and replaced != status["jti"]
    body = cluster.customer(name)
    assert body is not None and body["status"]["license"]["jti"] == replaced
    assert body["status"]["phase"] != "Failed"


async def test_a_finalizer_retried_after_its_namespace_went_revokes_no_second_licence(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    """Found in review: the Secret's licence L1 had no row yet (a pass died after the Secret); the
    finalizer revoked it, died after asking for the namespace's deletion, and its retry, finding no
    Secret, revoked L0 too: a second `revoked` row and a second notice under another key. Found in a
    later review: L1's revocation was the only row of it, its issue never recorded."""
    name, customer_id, status = _licensed_then_paused(cluster, paused_operator, "refinal")
    cluster.patch_spec(name, {"plan": "professional"})
    context = _context(operator_env, datetime.now(UTC))
    await reconcile(context, name)
    l1 = _secret_jti(cluster, name)
    assert l1 is not None and l1 != status["jti"]
    async with db_engine.begin() as connection:
        await connection.execute(delete(LicenseHistory).where(LicenseHistory.jti == l1))
    body = cluster.customer(name)
    assert body is not None
    notify = (name, CustomerSpec.model_validate(body["spec"]))

    secret = await context.kube.read_secret_data(f"customer-{name}", "iotistic-license")
    assert await revoke_license(context, customer_id, secret, reason="deleted", notify=notify)
    assert await revoke_license(context, customer_id, None, reason="deleted", notify=notify)  # the retry
    await context.engine.dispose()
    assert [(a, j) for a, _, j in await history(db_engine, customer_id)] == [
        ("generated", status["jti"]),
        ("upgraded", l1),  # its issue, recorded by the revocation: the history holds every licence held
        ("revoked", l1),
    ]
    async with db_engine.connect() as connection:
        keys = (await connection.scalars(select(Notice.key).where(Notice.customer_id == customer_id))).all()
    assert len([key for key in keys if key.startswith("license-revoked")]) == 1, keys


async def test_a_deletion_records_an_unrecorded_licence_whose_action_annotation_was_edited_by_hand(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    """Found in review: the revocation records the Secret's licence's issue when no row has it, under the
    Secret's action annotation; one edited into no action failed every try of the deletion. It is read
    as `generated`, and the licence revoked."""
    name, customer_id, status = _licensed_then_paused(cluster, paused_operator, "badaction")
    namespace = f"customer-{name}"
    async with db_engine.begin() as connection:
        await connection.execute(delete(LicenseHistory).where(LicenseHistory.jti == status["jti"]))
    cluster.core.patch_namespaced_secret(
        "iotistic-license", namespace, {"metadata": {"annotations": {"iotistic.io/license-action": "oops"}}}
    )
    context = _context(operator_env, datetime.now(UTC))
    secret = await context.kube.read_secret_data(namespace, "iotistic-license")
    assert await revoke_license(context, customer_id, secret, reason="deleted")
    await context.engine.dispose()
    assert [(a, j) for a, _, j in await history(db_engine, customer_id)] == [
        ("generated", status["jti"]),
        ("revoked", status["jti"]),
    ]


async def test_a_licence_secret_holding_another_customers_licence_is_not_taken_for_this_ones(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    """Found in review: a Customer made again under a new id over its predecessor's Secret (its old
    namespace still terminating) took that Secret's licence for its previous one: the old customer's
    revoked usage key in its Secret, `license.suspended` under the new id for the old one's suspension,
    and `reinstated` for its first licence. Whatever brings another customer's Secret into a Customer's
    namespace, it is replaced, and nothing of it is recorded or reused under this Customer's id."""
    other, other_id, _ = _licensed_then_paused(cluster, paused_operator, "theirs")
    cluster.patch_spec(other, {"suspended": True})
    context = _context(operator_env, datetime.now(UTC))
    await reconcile(context, other)  # the other customer's licence suspended, its Secret saying so
    name = unique_name("ours")
    customer_id = f"cust_{name.replace('-', '')}"
    cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
    first = await reconcile(context, name)
    assert first is not None and first.status.license is not None
    theirs = cluster.core.read_namespaced_secret("iotistic-license", f"customer-{other}")
    cluster.core.patch_namespaced_secret(
        "iotistic-license",
        f"customer-{name}",
        {"metadata": {"annotations": theirs.metadata.annotations}, "data": theirs.data},
    )
    assert cluster.license(name)[0]["customerId"] == other_id

    again = await reconcile(context, name)
    await context.engine.dispose()
    assert again is not None and again.status.license is not None
    claims, data = cluster.license(name)
    assert claims["customerId"] == customer_id and claims["plan"] == "starter"
    assert data["usage-api-key"] != base64.b64decode(theirs.data["usage-api-key"])
    assert await _usage_key_stored(cluster, db_engine, name)
    assert [action for action, _, _ in await history(db_engine, customer_id)] == ["generated", "generated"]
    assert [action for action, _, _ in await history(db_engine, other_id)] == ["generated", "suspended"]
    async with db_engine.connect() as connection:
        kinds = (
            (await connection.execute(select(Notice.kind).where(Notice.customer_id == customer_id)))
            .scalars()
            .all()
        )
        their_key = await connection.scalar(
            select(ApiKey.revoked_at).where(
                ApiKey.key_hash == usage_key_hash(base64.b64decode(theirs.data["usage-api-key"]).decode())
            )
        )
    assert kinds == [] and their_key is None


async def test_an_operator_started_over_customers_licensed_before_the_mirror_writes_their_rows(
    cluster: Cluster,
    k8s_client: kubernetes.client.ApiClient,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
) -> None:
    """Operator versions before the mirror row was written with the licence left none for a Customer
    made by kubectl: the first pass of a new process writes it, minting nothing."""
    name = unique_name("premirror")
    customer_id = f"cust_{name.replace('-', '')}"
    cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
    wait_until(lambda: (cluster.customer(name) or {}).get("status", {}).get("license"), message="licensed")
    async with AsyncSession(db_engine) as session, session.begin():  # as an earlier version left it
        await session.execute(delete(MirrorRow).where(MirrorRow.customer_id == customer_id))

    context = _context(operator_env, datetime.now(UTC))  # a new operator process's first pass
    result = await reconcile(context, name)
    await context.engine.dispose()

    assert result is not None and result.temporary_error is None, result
    assert [a for a, _, _ in await history(db_engine, customer_id)] == ["generated"]
    directory = Directory(NoFleetList(KubeApi(k8s_client, FieldManager.CLI)))
    async with AsyncSession(db_engine) as session:
        found = await directory.by_customer_id(session, customer_id)
    assert found is not None and found.name == name


async def test_a_pass_over_a_current_licence_does_not_fail_for_its_mirror_row_while_postgresql_is_away(
    cluster: Cluster, operator_env: dict[str, str]
) -> None:
    name = unique_name("mirrorless")
    cluster.create(customer_manifest(name, plan="starter"))
    wait_until(lambda: (cluster.customer(name) or {}).get("status", {}).get("license"), message="licensed")

    away = {**operator_env, "DATABASE_URL": "postgresql://billing@127.0.0.1:1/billing"}  # refused
    context = _context(away, datetime.now(UTC))
    result = await reconcile(context, name)
    await context.engine.dispose()

    assert result is not None and result.temporary_error is None and result.permanent_error is None
    assert context.mirrored == set()  # the next pass tries again


async def test_a_pass_starts_from_kopfs_copy_only_when_it_starts_at_once_and_wrote_nothing_since(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kopf hands each handler the Customer it saw: a pass that starts at once starts from it without a
    GET, unless this process has written the Customer since; one that waited reads the Customer."""
    name, customer_id, _ = _licensed_then_paused(cluster, paused_operator, "handed")
    before = cluster.customer(name)
    cluster.patch_spec(name, {"plan": "professional"})
    handed = cluster.customer(name)
    assert before is not None and handed is not None
    context = _context(operator_env, datetime.now(UTC))
    reads = _counted(monkeypatch, context, "read_customer")
    upgraded = await reconcile(context, name, handed=kopf.Body(handed))
    assert reads == [] and upgraded is not None and upgraded.status.plan == "professional"

    # Kopf's copy from before the plan change (its handler waited for the pass above): read again,
    # else the pass would mint a starter licence over the professional one.
    again = await reconcile(context, name, handed=kopf.Body(before))
    assert reads == [name] and again is not None and again.status.plan == "professional"

    # A pass that waited for a slot: Kopf's copy, current when handed over, may not be any more.
    current = cluster.customer(name)
    assert current is not None
    slots = context.pass_slots
    while not slots.locked():
        await slots.acquire()
    waiting = asyncio.create_task(reconcile(context, name, handed=kopf.Body(current)))
    await asyncio.sleep(0)  # the task runs up to its wait for a slot
    slots.release()
    assert await waiting is not None
    await context.engine.dispose()
    assert reads == [name, name]
    assert [(a, p) for a, p, _ in await history(db_engine, customer_id)] == [
        ("generated", "starter"),
        ("upgraded", "professional"),
    ]


async def test_a_pass_whose_status_write_was_lost_after_helm_does_not_run_helm_again(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed between helm and the status patch, a pass leaves the status a revision behind helm; the
    next pass finds helm's deployed revision labelled with the values it wants and reports it."""
    name, _, _ = _licensed_then_paused(cluster, paused_operator, "lost")
    assert wait_until(lambda: _reported_revision(cluster, name), message="release reported") == 1

    # The install's status write lost: status.release gone, the release and its licence Secret there.
    cluster.objects.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, name, {"status": {"release": None}}
    )
    context = _context(operator_env, datetime.now(UTC))
    await reconcile(context, name)
    assert _reported_revision(cluster, name) == 1 and cluster.release(name)["revision"] == "1"

    # An upgrade's status write lost: helm at revision 2, the status still at 1.
    cluster.patch_spec(name, {"plan": "professional"})
    patch_status = context.kube.patch_customer_status

    async def away(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise ApiException(status=503, reason="Service Unavailable")

    monkeypatch.setattr(context.kube, "patch_customer_status", away)
    with pytest.raises(ApiException):
        await reconcile(context, name)
    assert cluster.release(name)["revision"] == "2" and _reported_revision(cluster, name) == 1

    monkeypatch.setattr(context.kube, "patch_customer_status", patch_status)
    result = await reconcile(context, name)
    await context.engine.dispose()
    assert result is not None and result.status.plan == "professional"
    assert _reported_revision(cluster, name) == 2 and cluster.release(name)["revision"] == "2"


def _helm_commands(context: OperatorContext, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The helm commands the context runs from now on (their first two words), as they run."""
    commands: list[list[str]] = []
    run = context.helm._run

    async def recorded(*args: str, doing: str) -> str:
        commands.append(list(args[:2]))
        return await run(*args, doing=doing)

    monkeypatch.setattr(context.helm, "_run", recorded)
    return commands


def _reported_deployments(cluster: Cluster, name: str) -> list[str] | None:
    body = cluster.customer(name) or {}
    return body.get("status", {}).get("release", {}).get("deployments")


async def test_a_release_whose_status_lacks_its_deployments_reads_them_once_then_restores_a_deleted_one(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: status.release.deployments, by which a pass sees that an instance Deployment was
    deleted, was written only after helm ran; a Customer installed by an earlier operator (or whose
    status write after helm was lost) had none, and a Deployment deleted behind helm's back stayed away
    until its next upgrade. Its next pass reads the deployed revision's manifest, once."""
    name, _, _ = _licensed_then_paused(cluster, paused_operator, "unlisted")
    namespace = f"customer-{name}"
    listed = _reported_deployments(cluster, name)
    assert listed is not None and "instance-api" in listed
    # What an earlier operator left: the release at revision 1, a status without its Deployments.
    cluster.objects.patch_cluster_custom_object_status(
        GROUP, VERSION, PLURAL, name, {"status": {"release": {"deployments": None}}}
    )
    assert _reported_deployments(cluster, name) is None and _reported_revision(cluster, name) == 1
    context = _context(operator_env, datetime.now(UTC))
    helm = _helm_commands(context, monkeypatch)

    await reconcile(context, name)
    assert _reported_deployments(cluster, name) == listed
    assert helm == [["get", "manifest"]] and _reported_revision(cluster, name) == 1

    # Once: the next pass runs no helm; a Deployment deleted after it is put back as for any Customer.
    await reconcile(context, name)
    assert helm == [["get", "manifest"]]
    cluster.apps.delete_namespaced_deployment("instance-api", namespace)
    await reconcile(context, name)
    await context.engine.dispose()
    present = {d.metadata.name for d in cluster.apps.list_namespaced_deployment(namespace).items}
    assert "instance-api" in present
    assert helm == [["get", "manifest"], ["upgrade", "--install"]]
    released = cluster.condition(name, "ReleaseDeployed") or {}
    assert released.get("reason") == "UpgradeSucceeded"
    assert released.get("message", "").endswith("(instance-api had been deleted)")
    assert _reported_revision(cluster, name) == 2 and _reported_deployments(cluster, name) == listed


@pytest.mark.parametrize("freed", ["deleted", "handed over"])
async def test_a_customer_stalled_on_a_taken_namespace_recovers_by_itself_once_it_is_freed(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    freed: str,
) -> None:
    """Found in review: a Customer stalled as NamespaceTaken stayed Failed after the namespace's maker
    deleted it or handed it over: Kopf retries no stall until the spec changes, the housekeeping ran no
    pass for it, and the message asked for a Reconcile now. Its housekeeping reads that namespace (and
    runs no helm) until it is freed, then runs the pass."""
    name = unique_name("freed")
    namespace = f"customer-{name}"
    cluster.core.create_namespace({"metadata": {"name": namespace, "labels": {"team": "payments"}}})
    cluster.create(customer_manifest(name, plan="starter"))
    stalled = cluster.stalled(name)
    assert stalled["reason"] == "NamespaceTaken"
    paused_operator.stop()  # the checks under test are the only ones acting on this Customer
    context = _context(operator_env, datetime.now(UTC))
    helm = _helm_commands(context, monkeypatch)
    reads = _counted(monkeypatch, context, "read_namespace")

    await _housekeeping(context, cluster, name)  # still someone else's: stays stalled
    while_taken = list(reads)
    assert (cluster.condition(name, "Stalled") or {}).get("reason") == "NamespaceTaken"

    if freed == "deleted":  # what the namespace controller does, which this control plane lacks
        cluster.core.delete_namespace(namespace)
        cluster.core.replace_namespace_finalize(
            namespace, {"metadata": {"name": namespace}, "spec": {"finalizers": []}}
        )
        wait_until(lambda: _namespace_or_none(cluster, namespace) is None, message="namespace gone")
    else:
        cluster.core.patch_namespace(namespace, {"metadata": {"labels": {"iotistic.io/customer": name}}})
    await _housekeeping(context, cluster, name)
    body = cluster.customer(name)
    assert body is not None
    assert (cluster.condition(name, "Stalled") or {}).get("status") == "False"
    assert body["status"]["phase"] == "Provisioning" and body["status"]["license"]["jti"]
    assert _reported_revision(cluster, name) == 1 and helm == [["upgrade", "--install"]]
    owners = cluster.core.read_namespace(namespace).metadata.owner_references
    assert [owner.uid for owner in owners] == [body["metadata"]["uid"]]
    assert "Provisioning" in {event["reason"] for event in cluster.kube.list_customer_events(name)}
    # The stalled Customer's checks read its namespace, one GET each; a Customer not stalled so, none.
    assert while_taken == [namespace]
    reads.clear()
    await _housekeeping(context, cluster, name)
    await context.engine.dispose()
    assert reads == []
    assert "takes it up by itself within a minute" in stalled["message"]  # no Reconcile now asked for


def _reported_revision(cluster: Cluster, name: str) -> int | None:
    body = cluster.customer(name) or {}
    return body.get("status", {}).get("release", {}).get("revision")


def _secret_jti(cluster: Cluster, name: str) -> str | None:
    try:
        return str(cluster.license(name)[0]["jti"])
    except ApiException:
        return None


def _counted(monkeypatch: pytest.MonkeyPatch, context: OperatorContext, read: str) -> list[str]:
    """The names the context's `read` (a Kube method taking a name) is called with from now on."""
    names: list[str] = []
    original = getattr(context.kube, read)

    async def counted(name: str) -> dict[str, Any] | None:
        names.append(name)
        found: dict[str, Any] | None = await original(name)
        return found

    monkeypatch.setattr(context.kube, read, counted)
    return names


def _context(env: dict[str, str], clock: datetime) -> OperatorContext:
    settings = load_settings(**{k.lower(): v for k, v in env.items() if k in _SETTINGS})
    context = build_context(settings, env["DATABASE_URL"], kubeconfig=env["KUBECONFIG"])
    context.clock = lambda: clock
    return context


_SETTINGS = {
    "LICENSE_PRIVATE_KEY_PATH",
    "LICENSE_PUBLIC_KEY_PATH",
    "INSTANCE_CHART",
    "BASE_DOMAIN",
    "DATABASE_URL",
}


async def _housekeeping(context: OperatorContext, cluster: Cluster, name: str) -> None:
    body = cluster.customer(name)
    assert body is not None
    await handlers.housekeeping(name=name, body=kopf.Body(body), memo=kopf.Memo(context=context))


async def test_timer_renews_a_licence_once_a_third_of_its_lifetime_is_left(
    cluster: Cluster, paused_operator: OperatorProcess, operator_env: dict[str, str], db_engine: AsyncEngine
) -> None:
    name = unique_name("renew")
    customer_id = f"cust_{name.replace('-', '')}"
    cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
    first = wait_until(
        lambda: (cluster.customer(name) or {}).get("status", {}).get("license"), message="licence"
    )
    issued = datetime.fromisoformat(first["issuedAt"])
    paused_operator.stop()  # the clock under test is the only one acting on this Customer

    early = _context(operator_env, issued + timedelta(days=19))
    await _housekeeping(early, cluster, name)
    assert [a for a, _, _ in await history(db_engine, customer_id)] == ["generated"]  # 11 of 30 days left

    late = _context(operator_env, issued + timedelta(days=21))
    await _housekeeping(late, cluster, name)
    rows = await history(db_engine, customer_id)
    assert [a for a, _, _ in rows] == ["generated", "renewed"]
    claims, _ = cluster.license(name, verify_times=False)  # issued at the moved clock's time
    assert claims["jti"] == rows[-1][2]
    assert datetime.fromtimestamp(claims["iat"], UTC) == (issued + timedelta(days=21)).replace(microsecond=0)
    for context in (early, late):
        await context.engine.dispose()


async def test_timer_expires_a_trial_when_the_clock_passes_its_end(
    cluster: Cluster, paused_operator: OperatorProcess, operator_env: dict[str, str], db_engine: AsyncEngine
) -> None:
    name = unique_name("trialend")
    customer_id = f"cust_{name.replace('-', '')}"
    cluster.create(customer_manifest(name, customerId=customer_id, plan="trial", trial={"days": 14}))
    status = wait_until(
        lambda: (cluster.customer(name) or {}).get("status", {}).get("trial"), message="trial"
    )
    assert status["isTrialMode"] is True
    ends = datetime.fromisoformat(status["endsAt"])
    paused_operator.stop()

    after = _context(operator_env, ends + timedelta(minutes=1))
    await _housekeeping(after, cluster, name)
    body = cluster.customer(name)
    assert (
        body is not None and body["status"]["phase"] == "Expired" and body["status"]["plan"] == "unlicensed"
    )
    claims, _ = cluster.license(name, verify_times=False)
    assert claims["plan"] == "unlicensed" and claims["features"]["maxDevices"] == 2
    assert [a for a, _, _ in await history(db_engine, customer_id)] == ["generated", "downgraded"]
    await after.engine.dispose()


async def test_transitions_the_deployment_watch_and_the_housekeeping_reach_are_events(
    cluster: Cluster, paused_operator: OperatorProcess, operator_env: dict[str, str]
) -> None:
    """Provisioning by the creation's pass, Ready by the Deployment watch's, Expired by the
    housekeeping's: each an Event, as `kubectl describe` and the console show them (only the first was)."""
    name = unique_name("told")
    cluster.create(customer_manifest(name, plan="trial", trial={"days": 14}))
    wait_until(lambda: _phase(cluster, name) == "Provisioning", message="provisioning")
    cluster.make_deployments_available(name)
    wait_until(lambda: _phase(cluster, name) == "Ready", message="ready by the Deployment watch")
    ends = datetime.fromisoformat((cluster.customer(name) or {})["status"]["trial"]["endsAt"])
    paused_operator.stop()

    after = _context(operator_env, ends + timedelta(minutes=1))
    await _housekeeping(after, cluster, name)
    await after.engine.dispose()
    assert _phase(cluster, name) == "Expired"
    events = cluster.kube.list_customer_events(name)
    assert sorted(event["reason"] for event in events) == ["Expired", "Provisioning", "Ready"]
    uid = (cluster.customer(name) or {})["metadata"]["uid"]
    assert all(event["involvedObject"]["uid"] == uid for event in events)


def _phase(cluster: Cluster, name: str) -> str | None:
    return (cluster.customer(name) or {}).get("status", {}).get("phase")


def _retried(context: OperatorContext, monkeypatch: pytest.MonkeyPatch) -> Retries:
    """The retries of the context's failed passes, for the test to fire; a pass they request at once.
    The context stands for an operator Kopf runs, not one its peering paused: a daemon of it runs."""
    retries = Retries()
    context.pass_retries = PassRetries(retries.later)
    context.housekeepers["uid-active"] = asyncio.get_running_loop().create_future()
    monkeypatch.setattr(handlers, "PASS_REQUEST_DELAY", 0)
    return retries


async def test_a_trial_end_helm_could_not_install_is_retried_until_it_is(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The housekeeping's pass fails on helm for a moment: the status it writes (Reconciling, the
    release failed) is nothing the housekeeping would run a pass for, and no Deployment changes to ask
    for one, so it stayed so (helm at revision 1) until the spec changed or the operator restarted."""
    name = unique_name("retried")
    cluster.create(customer_manifest(name, plan="trial", trial={"days": 14}))
    wait_until(lambda: _reported_revision(cluster, name) == 1, message="installed")
    ends = datetime.fromisoformat((cluster.customer(name) or {})["status"]["trial"]["endsAt"])
    paused_operator.stop()

    context = _context(operator_env, ends + timedelta(minutes=1))
    retries = _retried(context, monkeypatch)
    upgrade_install = context.helm.upgrade_install

    async def unreachable(*_args: Any, **_kwargs: Any) -> Any:
        raise HelmError("upgrade", "Kubernetes cluster unreachable: dial tcp: connection refused")

    monkeypatch.setattr(context.helm, "upgrade_install", unreachable)
    await _housekeeping(context, cluster, name)
    assert _phase(cluster, name) == "Expired"
    failed = cluster.condition(name, "ReleaseDeployed") or {}
    assert (failed.get("status"), failed.get("reason")) == ("False", "UpgradeFailed")
    assert retries.delays == [5]

    monkeypatch.setattr(context.helm, "upgrade_install", upgrade_install)
    context.clock = lambda: ends + timedelta(minutes=2)
    retries.fire()

    async def deployed() -> bool:
        return (cluster.condition(name, "ReleaseDeployed") or {}).get("status") == "True"

    await eventually(deployed, message="the retry installed the unlicensed release")
    await context.engine.dispose()
    assert cluster.release(name)["revision"] == "2" and _reported_revision(cluster, name) == 2
    assert retries.scheduled == []  # converged: waiting for its Deployments is no failure


async def test_a_licence_secret_rewritten_while_postgresql_was_away_gets_its_rows_from_a_retry(
    cluster: Cluster,
    paused_operator: OperatorProcess,
    operator_env: dict[str, str],
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deleted licence Secret comes back by the Secret watch's pass, with a new licence and usage
    key; PostgreSQL refused its rows and nothing retried the pass: the instance's usage reports and
    licence fetches were refused (401) until the renewal about 20 days later."""
    name, customer_id, license = _licensed_then_paused(cluster, paused_operator, "dbaway")
    namespace = f"customer-{name}"
    cluster.core.delete_namespaced_secret("iotistic-license", namespace)
    context = _context(operator_env, datetime.now(UTC))
    retries = _retried(context, monkeypatch)
    away = _context(
        {**operator_env, "DATABASE_URL": "postgresql://billing@127.0.0.1:1/billing"}, context.clock()
    )
    sessions = context.sessions
    context.sessions = away.sessions

    handlers.managed_secret_changed(
        context, "DELETED", {"metadata": {"namespace": namespace, "name": "iotistic-license"}}
    )

    async def failed() -> bool:
        return retries.delays == [5]

    await eventually(failed, message="the pass failed on PostgreSQL and is to be retried")
    rewritten = _secret_jti(cluster, name)
    assert rewritten is not None and rewritten != license["jti"]
    assert not await _usage_key_stored(cluster, db_engine, name)

    context.sessions = sessions
    retries.fire()

    async def recorded() -> bool:
        return await _usage_key_stored(cluster, db_engine, name)

    await eventually(recorded, message="the retry stored the usage key")
    await eventually(
        lambda: _reported_jti(cluster, name, rewritten), message="the rewritten licence reported"
    )
    for each in (context, away):
        await each.engine.dispose()
    assert rewritten in [jti for _, _, jti in await history(db_engine, customer_id)]
    assert retries.scheduled == []


async def _reported_jti(cluster: Cluster, name: str, jti: str) -> bool:
    return bool((cluster.customer(name) or {}).get("status", {}).get("license", {}).get("jti") == jti)


def test_housekeeping_checks_every_customer_at_the_interval(
    cluster: Cluster, paused_operator: OperatorProcess
) -> None:
    name = unique_name("tick")
    cluster.create(customer_manifest(name, plan="starter"))
    wait_until(lambda: (cluster.customer(name) or {}).get("status", {}).get("license"), message="licence")
    paused_operator.stop()
    paused_operator.start(OPERATOR_TIMER_INTERVAL="0.5")
    # An upper bound of one round's checks: every Customer not being deleted (one whose spec does not
    # parse is skipped before the count). More than two rounds' worth of checks is a third round, which
    # the default interval (a first check after 30 s) could not give within the wait.
    customers = sum(
        1
        for item in cluster.objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        if not item["metadata"].get("deletionTimestamp")
    )

    def checks() -> float:
        return operator_metric_total(paused_operator, "iotistic_operator_housekeeping_checks_total")

    # Each Customer is checked 0.5 s after the start and every 0.5 s after: three rounds in about 1.5 s.
    wait_until(
        lambda: checks() > 2 * customers, timeout=20, message=f"3 rounds of at most {customers} checks"
    )


async def test_a_new_customer_says_database_unavailable_while_postgresql_is_away_then_converges(
    cluster: Cluster, paused_operator: OperatorProcess, own_postgres: tuple[EmbeddedPostgres, str]
) -> None:
    """Found in review: with PostgreSQL stopped a new Customer had no status or condition at all, and the
    operator logged a 9.8 KB traceback every 5 s (`Handler 'reconcile_customer' failed with an exception
    ... [Errno 111] Connect call failed`) that named no database. The operator runs on a PostgreSQL of
    this test's own, stopped and started again, so no other test's database goes away."""
    server, url = own_postgres
    restarted: EmbeddedPostgres | None = None
    try:
        paused_operator.stop()
        paused_operator.start(DATABASE_URL=url)
        server.stop()
        logged_from = paused_operator.log.stat().st_size

        name = unique_name("pgaway")
        customer_id = f"cust_{name.replace('-', '')}"
        cluster.create(customer_manifest(name, customerId=customer_id, plan="starter"))
        issued = wait_until(lambda: cluster.condition(name, "LicenseIssued"), message="LicenseIssued written")
        assert (issued["status"], issued["reason"]) == ("False", "DatabaseUnavailable"), issued
        assert issued["message"].startswith("PostgreSQL cannot be reached (ConnectionRefusedError)"), issued
        status = (cluster.customer(name) or {})["status"]
        assert status["phase"] == "Pending" and "license" not in status, status
        assert (cluster.condition(name, "Stalled") or {}).get("status") == "False"

        # The retry of the pass: one line a try, naming PostgreSQL, no traceback.
        failed = (
            f"pass of Customer {name} failed temporarily: "
            "PostgreSQL cannot be reached (ConnectionRefusedError)"
        )
        wait_until(
            lambda: any(failed in x for x in _logged_about(paused_operator, logged_from, name)),
            message="the failed pass logged",
        )
        lines = _logged_about(paused_operator, logged_from, name)
        assert not [x for x in lines if "Traceback" in x or "failed with an exception" in x], lines

        # Same data directory, same port: what a restarted database looks like to the operator.
        restarted = EmbeddedPostgres(server.data_dir, port=server.port).start()
        issued = wait_until(
            lambda: (c := cluster.condition(name, "LicenseIssued")) and c["status"] == "True" and c,
            timeout=90,
            message="licensed once PostgreSQL is back (the passes' retry: 5 s doubling)",
        )
        jti = _secret_jti(cluster, name)
        assert (cluster.customer(name) or {})["status"]["license"]["jti"] == jti
        engine = create_engine(url)
        try:
            assert [(a, j) for a, _, j in await history(engine, customer_id)] == [("generated", jti)]
        finally:
            await engine.dispose()
        cluster.objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
        wait_until(
            lambda: cluster.customer(name) is None, timeout=60, message="deleted while PostgreSQL is up"
        )
    finally:
        paused_operator.kill()  # before its database goes; the fixture starts the session's again
        if restarted is not None:
            restarted.stop()


def _logged_about(operator: OperatorProcess, offset: int, name: str) -> list[str]:
    """The operator's log lines since `offset` that name Customer `name`."""
    with operator.log.open("rb") as log:
        log.seek(offset)
        return [line for line in log.read().decode(errors="replace").splitlines() if name in line]


def _signing_secret(secret: str) -> dict[str, Any]:
    """The Secret a webhook's secretRef names (`hook`, key `k`), holding `secret`."""
    return {"metadata": {"name": "hook"}, "data": {"k": base64.b64encode(secret.encode()).decode()}}


def _copied(cluster: Cluster, namespace: str) -> str | None:
    """The operator's copy of the webhook signing secret, None while there is none."""
    try:
        copy = cluster.core.read_namespaced_secret(NOTIFICATIONS_SECRET_NAME, namespace)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    return base64.b64decode(copy.data[NOTIFICATIONS_SECRET_KEY]).decode()


async def test_a_deleted_webhook_secret_takes_its_copy_with_it_until_it_is_back(
    cluster: Cluster, paused_operator: OperatorProcess, operator_env: dict[str, str]
) -> None:
    """Found in review: the customer deleted the Secret its webhook's secretRef names (its key leaked);
    NotificationsReady said so, but the copy stayed, and the notice sender went on signing its webhooks
    with the leaked key. The housekeeping's check of the Secret deletes the copy; the Secret created again,
    the next check copies its new value."""
    name = unique_name("leaked")
    namespace = f"customer-{name}"
    webhook = {"url": "https://hooks.example/x", "secretRef": {"name": "hook", "key": "k"}}
    cluster.create(customer_manifest(name, plan="starter", notifications={"webhook": webhook}))
    wait_until(lambda: _reported_revision(cluster, name) == 1, message="installed")
    leaked = "whsec_" + base64.b64encode(b"l" * 32).decode()
    cluster.core.create_namespaced_secret(namespace, _signing_secret(leaked))
    paused_operator.stop()  # the checks under test are the only ones acting on this Customer

    def ready() -> tuple[str, str]:
        condition = cluster.condition(name, "NotificationsReady") or {}
        return condition.get("status", ""), condition.get("reason", "")

    now = datetime.now(UTC)
    context = _context(operator_env, now)
    await reconcile(context, name)
    assert ready() == ("True", "WebhookSecretReady") and _copied(cluster, namespace) == leaked
    await _housekeeping(context, cluster, name)  # the first check: the Secret compared from now on

    cluster.core.delete_namespaced_secret("hook", namespace)
    context.clock = lambda: now + WEBHOOK_SECRET_CHECK
    await _housekeeping(context, cluster, name)
    assert ready() == ("False", "SecretNotFound")
    assert _copied(cluster, namespace) is None

    rotated = "whsec_" + base64.b64encode(b"r" * 32).decode()
    cluster.core.create_namespaced_secret(namespace, _signing_secret(rotated))
    context.clock = lambda: now + WEBHOOK_SECRET_CHECK + timedelta(minutes=1)
    await _housekeeping(context, cluster, name)  # a False condition is looked at every check
    await context.engine.dispose()
    assert ready() == ("True", "WebhookSecretReady")
    assert _copied(cluster, namespace) == rotated
