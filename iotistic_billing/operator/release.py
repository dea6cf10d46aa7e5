"""The release step: `helm upgrade --install` when the chart or the values changed or the release is gone."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import NamedTuple

from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import Condition, LicenseStatus, ReleaseStatus
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.charts import ChartUnavailable
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.helm import (
    LABELLED_BY_ITS_HELM,
    HelmError,
    HelmRelease,
    chart_values_schema,
    helm_pod,
    helm_pod_gone,
)
from iotistic_billing.operator.outcomes import LEFT_OUT_NOTE, ReleaseOutcome, split_left_out
from iotistic_billing.operator.state import PassTarget
from iotistic_billing.operator.values import desired_release_values, refused_env, values_hash
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION

log = logging.getLogger(__name__)

# How a version's source is named in a ChartUnavailable message.
_VERSION_SOURCES = {
    "Pinned": "spec.instance.chartVersion",
    "Rollout": f"the annotation {ROLLOUT_CHART_VERSION}",
    "Fleet": "the fleet's version",
}


class Recovery(NamedTuple):
    left: str | None = None  # why a pending revision is left as it is (its helm may still be running)
    recovered: str = ""  # the pending status put back ("pending-install", ...); "" when none was


async def _recover_stuck(ctx: OperatorContext, namespace: str) -> Recovery:
    """A helm killed mid-operation (an operator crash, HELM_TIMEOUT) or that lost its last write (the API
    server away) leaves the release pending-*; put it back, or say why it is left as it is. A pending
    upgrade or rollback is rolled back to the newest deployed revision (_rollback_target). A pending
    install is rolled back onto itself (its manifest applied again): an uninstall would delete what it
    made, the instance's generated passwords among them, while its database volume keeps the old ones.
    A pending revision younger than HELM_TIMEOUT may be another process's helm still at work (the old
    and the new shard of a relabelled Customer, each in a pass), which a rollback would undo under it:
    the pass fails and is retried, and by then that helm has finished or been killed. An upgrade or an
    install that this process's predecessor in the same place began (a container restarted after a
    crash), or whose operator Pod is gone or was made again (a rollout, a lost node), is recovered at
    once: its helm was killed with it."""
    release = await ctx.helm.status(c.RELEASE_NAME, namespace)
    if release is None or not release.status.startswith("pending-"):
        return Recovery()
    timeout = ctx.settings.helm_timeout
    revisions = await ctx.kube.helm_release_revisions(namespace, c.RELEASE_NAME)
    labels = revisions.get(release.revision, {})
    if release.last_deployed is not None and not ctx.helm.begun_by_predecessor(release, labels):
        age = (ctx.clock() - release.last_deployed).total_seconds()
        if age < timeout and not await _pod_gone(ctx, release, labels):
            return Recovery(
                left=f"revision {release.revision} has been {release.status} for {max(age, 0):.0f} s, maybe "
                f"under a helm still running; it is recovered once older than HELM_TIMEOUT ({timeout:g} s)"
            )
    await ctx.helm.rollback(c.RELEASE_NAME, namespace, _rollback_target(release, revisions))
    return Recovery(recovered=release.status)


def _rollback_target(release: HelmRelease, revisions: dict[int, dict[str, str]]) -> int:
    """The revision a pending one is rolled back to: the newest deployed before it (helm's default, the
    one just before, may be an upgrade that failed: {5 deployed, 6 failed, 7 pending-upgrade} rolled every
    pod to 6's manifest, and the pass upgraded them back). With none deployed (a pending install, an
    upgrade after an install that failed), the pending revision itself: its manifest applied again,
    nothing deleted, none that failed applied."""
    deployed = [
        revision
        for revision, labels in revisions.items()
        if revision < release.revision and labels.get("status") == "deployed"
    ]
    return max(deployed, default=release.revision)


async def _pod_gone(ctx: OperatorContext, release: HelmRelease, labels: dict[str, str]) -> bool:
    """Whether the operator Pod that began the pending revision is gone or was made again, its helm with
    it (helm_pod_gone: by its uid; a revision labelled with the name alone, only when no Pod has it).
    False when that cannot be known, said once: a revision without the label (written before it, or
    outside a Pod), or a Pod read the API server refuses (RBAC from before the chart's Role)."""
    pod = helm_pod(release, labels)
    if pod is None:
        if release.status in LABELLED_BY_ITS_HELM:
            _once(
                ctx,
                f"a pending revision without the label {c.LABEL_HELM_POD} (written before it, or by an "
                "operator outside a Pod) is recovered only once older than HELM_TIMEOUT",
            )
        return False
    pods = ctx.settings.billing_namespace
    try:
        found = await ctx.kube.read_pod_metadata(pods, pod)
    except ApiException as error:
        if error.status != 403:
            raise
        _once(
            ctx,
            f"the API server refuses to read Pods in {pods} (the chart's operator Role grants get): "
            "a pending revision is recovered only once older than HELM_TIMEOUT, also when its Pod is gone",
        )
        return False
    return helm_pod_gone(labels, found)


def _once(ctx: OperatorContext, why: str) -> None:
    if why not in ctx.pod_checks_skipped:
        ctx.pod_checks_skipped.add(why)
        log.warning("%s", why)


async def _deployed_already(
    ctx: OperatorContext, namespace: str, version: str, digest: str, previous: ReleaseStatus | None
) -> ReleaseStatus | None:
    """The release as it is, when helm's deployed revision is the one wanted: labelled with `digest`
    (helm.upgrade_install_args; the digest covers the chart's version), or, for a revision from before
    that label, the one the status reports."""
    revisions = await ctx.kube.helm_release_revisions(namespace, c.RELEASE_NAME)
    deployed = [revision for revision, labels in revisions.items() if labels.get("status") == "deployed"]
    if not deployed:
        return None
    newest = max(deployed)
    if any(labels.get("status") != "superseded" for r, labels in revisions.items() if r > newest):
        # A helm killed mid-upgrade (pending-*) or an upgrade that failed part-way (failed): its objects
        # half applied, which only another helm run undoes.
        return None
    if revisions[newest].get(c.LABEL_VALUES_HASH) == digest:
        known = previous is not None and previous.revision == newest
        return ReleaseStatus(
            name=c.RELEASE_NAME,
            namespace=namespace,
            revision=newest,
            chart_version=version,
            values_hash=digest,
            deployments=previous.deployments if known and previous is not None else None,
        )
    if previous is not None and (previous.values_hash, previous.chart_version) == (digest, version):
        return previous if previous.revision == newest else None
    return None


async def _current(
    ctx: OperatorContext, namespace: str, version: str, digest: str, previous: ReleaseStatus | None
) -> tuple[ReleaseOutcome | None, list[str]]:
    """The "unchanged" outcome when helm's deployed revision is the one wanted and none of its
    Deployments is missing; else None and the missing Deployments (an upgrade puts them back)."""
    current = await _deployed_already(ctx, namespace, version, digest, previous)
    if current is None:
        return None, []
    current = await _with_deployments(ctx, current)
    missing = await _missing_deployments(ctx, current)
    if missing:
        return None, missing
    return ReleaseOutcome(
        "unchanged", c.RELEASE_UNCHANGED, f"revision {current.revision} is current", current
    ), []


async def ensure_release(
    ctx: OperatorContext,
    target: PassTarget,
    license: LicenseStatus,
    previous: ReleaseStatus | None,
    *,
    may_exist: bool,
) -> ReleaseOutcome:
    """The release step's outcome (_ensure_release), saying in ReleaseDeployed which extraEnv entries of
    spec.instance.values were left out as the operator's (a Customer stored before the CRD refused them):
    left out in silence, its owner would go on thinking they applied."""
    outcome = await _ensure_release(ctx, target, license, previous, may_exist=may_exist)
    if not (left_out := refused_env(target.spec.instance.values)):
        return outcome
    return replace(outcome, message=f"{outcome.message}{LEFT_OUT_NOTE}{', '.join(left_out)}")


def log_left_out(name: str, release: ReleaseOutcome, said: Condition | None) -> None:
    """Log the extraEnv entries `release` left out when they are not the ones ReleaseDeployed (`said`, as
    the last pass wrote it) names already: logged at every pass, a Customer that kept them warned every
    minute for as long as nobody removed them."""
    if release.note and release.note != split_left_out(said.message if said is not None else "")[1]:
        log.warning("Customer %s: %s", name, release.note.removeprefix("; "), extra={"customer": name})


async def _ensure_release(
    ctx: OperatorContext,
    target: PassTarget,
    license: LicenseStatus,
    previous: ReleaseStatus | None,
    *,
    may_exist: bool,
) -> ReleaseOutcome:
    """`previous`: the release the last pass reported (status.release). `may_exist`: False when no
    release can be there yet, as the licence Secret, which helm runs only after, was not.

    Helm's deployed revision is looked at before upgrading, not only the status: a pass that died after
    helm and before its status write (a crash, the API server away) left the status a revision behind,
    and its next pass upgraded to the same values again. It is looked at before the chart is pulled
    too: the cache of an OCI chart is empty after every start, and a registry away then made every
    Ready Customer's pass fail with ChartPullFailed."""
    if (
        problem := target.chart_problem
    ):  # here, not before the licence: a bad annotation must not stop renewal
        return ReleaseOutcome("failed", c.CHART_VERSION_INVALID, problem, permanent=True)
    namespace = target.namespace
    values = desired_release_values(target, ctx.settings, license.sha256)
    # The version string is enough for the digest: ChartStore.get serves a version only as its chart's own.
    # So is it for the values of the operator's the version's schema leaves out (below): the digest is of
    # every value the operator wants, known before the chart is pulled.
    version = target.chart_version
    digest = values_hash(values, version)
    missing: list[str] = []
    if previous is not None or may_exist:
        unchanged, missing = await _current(ctx, namespace, version, digest, previous)
        if unchanged is not None:
            return unchanged
    try:
        chart = await ctx.charts.get(version, _VERSION_SOURCES[target.version_source])
    except ChartUnavailable as error:
        return ReleaseOutcome("failed", c.CHART_VERSION_UNAVAILABLE, str(error), permanent=True)
    except HelmError as error:  # the registry is away: the next pass tries again
        return ReleaseOutcome("failed", c.CHART_PULL_FAILED, error.message)
    # An older version (pinned, rolled back, the fleet's in a registry) declares fewer of the operator's
    # values, and its schema refuses the others.
    values = desired_release_values(target, ctx.settings, license.sha256, chart_values_schema(chart.path))

    recovery = Recovery()
    for attempt in (1, 2):
        try:
            release = await ctx.helm.upgrade_install(c.RELEASE_NAME, namespace, chart.path, values, digest)
            break
        except HelmError as error:
            message, permanent = error.message, error.permanent
            if error.stuck and attempt == 1:
                try:
                    recovery = await _recover_stuck(ctx, namespace)
                except HelmError as failed:  # the next pass looks again
                    message, permanent = f"{message}; its recovery failed: {failed.message}", False
                else:
                    if recovery.left is None and not recovery.recovered:
                        # The other helm finished meanwhile, maybe with these very values: upgrading
                        # again would roll the instance's pods for nothing.
                        unchanged, missing = await _current(ctx, namespace, version, digest, previous)
                        if unchanged is not None:
                            return unchanged
                    if recovery.left is None:
                        # After a rollback helm runs too: its outcome makes the pass read the
                        # Deployments afresh, not as the watch last had them.
                        continue
                    message = f"{message} ({recovery.left})"
            first = previous is None or not previous.revision
            return ReleaseOutcome(
                "failed", c.INSTALL_FAILED if first else c.UPGRADE_FAILED, message, permanent=permanent
            )
    status = ReleaseStatus(
        name=release.name,
        namespace=release.namespace,
        revision=release.revision,
        chart_version=release.chart_version,
        values_hash=digest,
        # An empty list too: None would have _with_deployments read the manifest on every pass.
        deployments=list(release.deployments),
    )
    if release.revision == 1 or recovery.recovered == "pending-install":
        recovered = " (a pending install recovered)" if release.revision != 1 else ""
        return ReleaseOutcome(
            "installed",
            c.INSTALL_SUCCEEDED,
            f"installed chart {version} at revision {release.revision}{recovered}",
            status,
        )
    repaired = f" ({', '.join(missing)} had been deleted)" if missing else ""
    return ReleaseOutcome(
        "upgraded", c.UPGRADE_SUCCEEDED, f"upgraded to revision {release.revision}{repaired}", status
    )


async def _with_deployments(ctx: OperatorContext, current: ReleaseStatus) -> ReleaseStatus:
    """`current` with the Deployments of its revision's manifest when the status lists none (a release
    installed before status.release.deployments, or whose status write after helm was lost): read once,
    the pass then writes them to the status, so a Deployment deleted later is put back as for any other.
    A read that fails leaves it as it was, for the next pass: it must not stop a licence renewal."""
    if current.deployments is not None or current.namespace is None or not current.revision:
        return current
    try:
        names = await ctx.helm.deployments(c.RELEASE_NAME, current.namespace, current.revision)
    except HelmError as error:
        log.warning("Deployments of release %s/%s not read: %s", current.namespace, c.RELEASE_NAME, error)
        return current
    return current.model_copy(update={"deployments": list(names)})


async def _missing_deployments(ctx: OperatorContext, current: ReleaseStatus) -> list[str]:
    """The release's Deployments (as its revision was rendered) that are not in the cluster: deleted
    behind helm's back, which an upgrade puts back (helm creates what its manifest has and the cluster
    lacks). The kept Deployments are read, no request when the watch keeps them."""
    if not current.deployments or current.namespace is None:
        return []
    present = {deployment.name for deployment in await ctx.deployments.of(current.namespace, helm_ran=False)}
    return sorted(set(current.deployments) - present)
