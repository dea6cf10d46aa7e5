"""How the steps of a pass ended, as the status builder sees them (pure values)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from iotistic_billing.customer import LicenseStatus, ReleaseStatus
from iotistic_billing.operator import constants as c

# How ReleaseDeployed's message goes on when extraEnv entries of spec.instance.values were left out as the
# operator's (release.ensure_release), naming them after it.
LEFT_OUT_NOTE = "; left out as the operator's variables (remove them): "


def split_left_out(message: str) -> tuple[str, str]:
    """A ReleaseDeployed `message` as what it says before LEFT_OUT_NOTE and its end from LEFT_OUT_NOTE on
    ("" when it names no entry left out)."""
    head, note, names = message.partition(LEFT_OUT_NOTE)
    return head, note + names


@dataclass(frozen=True)
class ReleaseOutcome:
    result: Literal["installed", "upgraded", "unchanged", "failed", "disabled-pending"]
    reason: str
    message: str
    release: ReleaseStatus | None = None
    permanent: bool = False

    @property
    def note(self) -> str:
        """The end of `message` naming the extraEnv entries left out; "" when none was."""
        return split_left_out(self.message)[1]

    @property
    def deployed(self) -> bool:
        return self.result in ("installed", "upgraded", "unchanged")


@dataclass(frozen=True)
class InstanceHealth:
    available: bool
    reason: str
    message: str
    # While not available: no Deployment reports a problem, and each has its wanted replicas available
    # or is rolling out (a rollout in progress: RollingUpdate's old replicas serve, a Recreate singleton
    # restarts), not an instance gone wrong.
    serving: bool = False


@dataclass(frozen=True)
class NotificationsOutcome:
    """Whether the customer's webhook can be signed: the Secret spec.notifications.webhook.secretRef
    names exists, holds the key, and was copied for the webhook server."""

    ready: bool
    reason: str
    message: str
    # The copy of a key the customer withdrew (its Secret or the webhook gone) could not be deleted: the
    # sender still signs with it, so a Warning Event says so and the housekeeping tries again.
    copy_kept: bool = False


@dataclass(frozen=True)
class NamespaceRefused:
    """Why a pass may not work in the Customer's namespace, and so runs no step: someone else's namespace
    (permanent: NamespaceTaken), or one being deleted, this Customer's or an earlier one's of the same
    name (NamespaceTerminating: the pass is retried until it is gone), or a request for it the API server
    refused (NamespaceRefused: retried, the policy or RBAC may be mended)."""

    reason: str
    message: str
    permanent: bool
    # The namespace and what runs there are as they were (a read of it refused), so an instance that
    # served is Degraded meanwhile; not for a create refused (none there), Provisioning as for one going.
    runs_on: bool = False


@dataclass(frozen=True, kw_only=True)
class PassOutcome:
    """The steps' results: the licence (or why none), the release, the instance's health."""

    license: LicenseStatus | None = None
    license_error: str | None = None
    # Why the licence step could not finish for now (PostgreSQL away): retried, unlike license_error.
    license_unavailable: str | None = None
    # The licence Secret's write the API server refused (refusals.Refused's message): retried too.
    license_refused: str | None = None
    release: ReleaseOutcome | None = None
    health: InstanceHealth | None = None
    notifications: NotificationsOutcome | None = None

    @property
    def failure(self) -> str | None:
        """What failed this pass, if anything."""
        if self.license_error is not None:
            return self.license_error
        if self.license_unavailable is not None:
            return self.license_unavailable
        if self.license_refused is not None:
            return self.license_refused
        if self.release is not None and not self.release.deployed:
            return self.release.message
        return None

    @property
    def stalled_reason(self) -> str | None:
        """Set when retrying cannot help until the spec changes: a licence that cannot be minted, a
        chart the values break."""
        if self.license_error is not None:
            return c.LICENSE_FAILED
        if self.release is not None and self.release.permanent:
            return self.release.reason
        return None

    @property
    def ready(self) -> bool:
        return (
            self.stalled_reason is None
            and self.license is not None
            and self.release is not None
            and self.release.deployed
            and self.health is not None
            and self.health.available
        )

    @property
    def retrying(self) -> bool:
        """A step failed for now and is retried: the licence's record or its Secret, or the release."""
        failed = self.release is not None and self.release.result == "failed" and not self.release.permanent
        return self.license_unavailable is not None or self.license_refused is not None or failed

    @property
    def waiting_reason(self) -> str:
        """Reconciling's and Ready's reason while a pass that is not ready goes on."""
        if self.license_unavailable is not None:
            return c.DATABASE_UNAVAILABLE
        if self.license_refused is not None:
            return c.LICENSE_SECRET_REFUSED
        return c.PROGRESSING

    @property
    def waiting_on(self) -> str:
        """What a pass that is not ready waits for."""
        return self.failure or (self.health.message if self.health is not None else "provisioning")


__all__ = ["InstanceHealth", "NamespaceRefused", "NotificationsOutcome", "PassOutcome", "ReleaseOutcome"]
