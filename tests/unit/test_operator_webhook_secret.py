"""The Secret a Customer's webhook names, rotated after it was copied: the housekeeping notices it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from iotistic_billing.customer import NOTIFICATIONS_SECRET_KEY, NOTIFICATIONS_SECRET_NAME
from iotistic_billing.k8s import KubernetesUnavailable, SecretData
from iotistic_billing.operator import handlers

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD, NEW = b"whsec_" + b"A" * 44, b"whsec_" + b"B" * 44


class Secrets:
    """The namespace's Secrets as the operator reads them; `away` makes every read fail."""

    def __init__(self) -> None:
        self.data = {"hook": {"k": OLD}, NOTIFICATIONS_SECRET_NAME: {NOTIFICATIONS_SECRET_KEY: OLD}}
        self.reads = 0
        self.away = False

    async def read_secret_data(self, namespace: str, name: str) -> SecretData | None:
        assert namespace == "customer-acme"
        self.reads += 1
        if self.away:
            raise KubernetesUnavailable("the API server cannot be reached")
        data = self.data.get(name)
        return SecretData(data, {}, {}) if data is not None else None


def signed_customer() -> dict[str, Any]:
    """A Customer whose webhook is signed with the copy (NotificationsReady True), nothing else due."""
    return {
        "metadata": {"name": "acme", "uid": "uid-acme", "creationTimestamp": "2026-05-01T00:00:00Z"},
        "spec": {
            "email": "ops@acme.example",
            "companyName": "Acme",
            "plan": "starter",
            "notifications": {
                "webhook": {"url": "https://hooks.acme.example/x", "secretRef": {"name": "hook", "key": "k"}}
            },
        },
        "status": {
            "plan": "starter",
            "license": {
                "jti": "j1",
                "issuedAt": NOW.isoformat(),
                "expiresAt": (NOW + timedelta(days=30)).isoformat(),
            },
            "conditions": [
                {
                    "type": "NotificationsReady",
                    "status": "True",
                    "reason": "WebhookSecretReady",
                    "message": "webhooks signed with customer-acme/hook key k",
                    "lastTransitionTime": NOW.isoformat(),
                }
            ],
        },
    }


async def test_a_rotated_webhook_secret_is_copied_without_a_spec_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the copy was made by passes only (a spec change, Reconcile now, a renewal about
    20 days on), so webhooks were signed with the old value after a rotation, refused by the receiver
    and dead hours later, while NotificationsReady said they were signed."""
    passes: list[str] = []

    async def refresh(ctx: Any, name: str, deployment_event: int | None = None) -> None:
        passes.append(name)

    monkeypatch.setattr(handlers, "_refresh", refresh)
    secrets, clock = Secrets(), [NOW]
    settings = SimpleNamespace(dunning_restrict_days=14, trial_notice_days=3)
    context = SimpleNamespace(
        clock=lambda: clock[0], settings=settings, noticed=set(), kube=secrets, webhook_secrets_checked={}
    )
    memo = kopf.Memo(context=context)
    body = kopf.Body(signed_customer())

    async def checks(minutes: int) -> None:
        for _minute in range(minutes):
            clock[0] += timedelta(minutes=1)
            await handlers.housekeeping(name="acme", body=body, memo=memo)

    await checks(30)
    assert passes == [] and secrets.reads == 2 * 2  # unchanged: two reads ten minutes apart, no pass

    secrets.data["hook"] = {"k": NEW}
    await checks(10)
    assert passes == ["acme"]  # the pass copies it (ensure_webhook_secret)

    # The API server away: the check says so and the next one looks again.
    secrets.away = True
    await checks(10)
    assert passes == ["acme"]
