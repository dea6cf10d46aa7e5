"""The release step: `helm upgrade --install` when the chart or the values changed or the release is gone."""

from __future__ import annotations

from iotistic_billing.customer import LicenseStatus, ReleaseStatus
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.charts import ChartUnavailable
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.helm import HelmError
from iotistic_billing.operator.outcomes import ReleaseOutcome
from iotistic_billing.operator.state import PassTarget
from iotistic_billing.operator.values import desired_release_values, values_hash
from iotistic_billing.rollout import ROLLOUT_CHART_VERSION

# How a version's source is named in a ChartUnavailable message.
_VERSION_SOURCES = {
    "Pinned": "spec.instance.chartVersion",
    "Rollout": f"the annotation {ROLLOUT_CHART_VERSION}",
    "Fleet": "the fleet's version",
}


async def _recover_stuck(ctx: OperatorContext, namespace: str) -> None:
    """A helm killed mid-operation (an operator crash) leaves the release pending-*; put it back."""
    release = await ctx.helm.status(c.RELEASE_NAME, namespace)
    if release is None:
        return
    if release.status == "pending-install":
        await ctx.helm.uninstall(c.RELEASE_NAME, namespace)
    elif release.status in ("pending-upgrade", "pending-rollback"):
        await ctx.helm.rollback(c.RELEASE_NAME, namespace)


async def ensure_release(
    ctx: OperatorContext, target: PassTarget, license: LicenseStatus, previous: ReleaseStatus | None
) -> ReleaseOutcome:
    """`previous`: the release the last pass reported (status.release)."""
    namespace = target.namespace
    values = desired_release_values(target, ctx.settings.billing_url, license.sha256)
    try:
        chart = await ctx.charts.get(target.chart_version, _VERSION_SOURCES[target.version_source])
    except ChartUnavailable as error:
        return ReleaseOutcome("failed", c.CHART_VERSION_UNAVAILABLE, str(error), permanent=True)
    except HelmError as error:  # the registry is away: the next pass tries again
        return ReleaseOutcome("failed", c.CHART_PULL_FAILED, error.message)
    version = chart.version
    digest = values_hash(values, version)
    if previous is not None and previous.values_hash == digest and previous.chart_version == version:
        revisions = await ctx.kube.helm_release_revisions(namespace, c.RELEASE_NAME)
        if revisions.get(previous.revision or 0) == "deployed":
            return ReleaseOutcome(
                "unchanged", c.RELEASE_UNCHANGED, f"revision {previous.revision} is current", previous
            )

    for attempt in (1, 2):
        try:
            release = await ctx.helm.upgrade_install(c.RELEASE_NAME, namespace, chart.path, values)
            break
        except HelmError as error:
            if error.stuck and attempt == 1:
                await _recover_stuck(ctx, namespace)
                continue
            first = previous is None or not previous.revision
            return ReleaseOutcome(
                "failed",
                c.INSTALL_FAILED if first else c.UPGRADE_FAILED,
                error.message,
                permanent=error.permanent,
            )
    status = ReleaseStatus(
        name=release.name,
        namespace=release.namespace,
        revision=release.revision,
        chart_version=release.chart_version,
        values_hash=digest,
    )
    if release.revision == 1:
        return ReleaseOutcome(
            "installed", c.INSTALL_SUCCEEDED, f"installed chart {version} at revision 1", status
        )
    return ReleaseOutcome("upgraded", c.UPGRADE_SUCCEEDED, f"upgraded to revision {release.revision}", status)
