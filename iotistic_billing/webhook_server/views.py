"""Pure builders: the Customer a signup creates, and the API's views of a Customer resource."""

from __future__ import annotations

import secrets
import string
from datetime import datetime, timedelta
from typing import Any, Final

from iotistic_billing.customer import API_VERSION, KIND, BillingMode, Phase, SubscriptionSpec
from iotistic_billing.directory import CustomerRecord, stripe_customer_of
from iotistic_billing.webhook_server.schemas import (
    CustomerView,
    QueueStats,
    SignupRequest,
    SubscriptionStatusResponse,
    SubscriptionView,
    TrialView,
)

_ID_ALPHABET: Final = string.ascii_lowercase + string.digits
SIGNUP_LABEL: Final = "iotistic.io/created-by"


def new_customer_id() -> str:
    return "cust_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def name_suffix() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(6))


def signup_manifest(
    *,
    name: str,
    customer_id: str,
    request: SignupRequest,
    billing_mode: BillingMode,
    trial_days: int,
    now: datetime,
    stripe_customer_id: str | None = None,
) -> dict[str, Any]:
    """The Customer a signup creates; it names its Stripe customer itself, so the link outlives a signup
    that died before the mirror row was committed, and its trial's end (`trial.endsAt`), so a Customer
    restored from a backup or re-created keeps its trial's end rather than counting the days again from
    its new creationTimestamp."""
    billing: dict[str, Any] = {"mode": billing_mode}
    if stripe_customer_id is not None:
        billing["stripeCustomerId"] = stripe_customer_id
    spec: dict[str, Any] = {
        "customerId": customer_id,
        "email": request.email,
        "companyName": request.company_name,
        "plan": "trial",
        "billing": billing,
        "trial": {
            "days": trial_days,
            "endsAt": (now + timedelta(days=trial_days)).isoformat(timespec="seconds"),
        },
    }
    if request.full_name:
        spec["contactName"] = request.full_name
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name, "labels": {SIGNUP_LABEL: "signup"}},
        "spec": spec,
    }


def trial_ends_at(record: CustomerRecord, now: datetime) -> datetime | None:
    """The operator's word (status.trial.endsAt) once written: a re-created Customer's trial counted from
    its customer id's first licence, and kept while it is suspended; without an end, the Customer has no
    trial (a Stripe subscription's plan, whatever spec.plan says). Before its first pass, the spec's,
    counted from the object's creation."""
    if (trial := record.customer.status.trial) is not None:
        return trial.ends_at
    if record.customer.spec.plan != "trial":
        return None
    return record.customer.spec.trial.ends_at_for(record.customer.metadata.creation_timestamp or now)


def subscription_view(subscription: SubscriptionSpec | None) -> SubscriptionView | None:
    if subscription is None:
        return None
    return SubscriptionView.model_validate(subscription.model_dump())


def customer_view(record: CustomerRecord, stripe_customer_id: str | None, now: datetime) -> CustomerView:
    """`stripe_customer_id`: the mirror's link (the spec's, when it names one, comes first)."""
    spec, status = record.customer.spec, record.customer.status
    return CustomerView(
        customer_id=record.customer_id,
        resource_name=record.name,
        email=spec.email,
        company_name=spec.company_name,
        contact_name=spec.contact_name,
        plan=spec.plan,
        effective_plan=status.plan,
        phase=str(status.phase) if status.phase else None,
        billing_mode=spec.billing.mode,
        stripe_customer_id=stripe_customer_of(record.customer, stripe_customer_id),
        suspended=spec.suspended,
        trial_ends_at=trial_ends_at(record, now),
        instance_url=status.instance.url if status.instance else None,
        created_at=record.customer.metadata.creation_timestamp,
        subscription=subscription_view(spec.subscription),
    )


def subscription_status(record: CustomerRecord) -> SubscriptionStatusResponse:
    status = record.customer.status
    return SubscriptionStatusResponse(
        customer_id=record.customer_id,
        billing_mode=record.customer.spec.billing.mode,
        plan=status.plan,
        subscription=subscription_view(record.customer.spec.subscription),
        trial=TrialView(is_trial_mode=status.trial.is_trial_mode, ends_at=status.trial.ends_at)
        if status.trial
        else None,
    )


def queue_stats(records: list[CustomerRecord]) -> QueueStats:
    counts = {phase.value: 0 for phase in Phase}
    for record in records:
        # Not reconciled yet: waiting, as the earlier system's queue would say.
        counts[(record.customer.status.phase or Phase.PENDING).value] += 1
    return QueueStats.model_validate({**counts, "total": len(records)})


def sort_key(record: CustomerRecord) -> tuple[float, str]:
    created = record.customer.metadata.creation_timestamp
    return (created.timestamp() if created else 0.0, record.name)


__all__ = [
    "customer_view",
    "new_customer_id",
    "queue_stats",
    "signup_manifest",
    "subscription_status",
    "subscription_view",
]
