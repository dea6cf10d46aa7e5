"""The notifications step: the Secret spec.notifications.webhook.secretRef names (in the Customer's
namespace) is checked and its key copied into the Secret the webhook server's notice sender reads
(the only one it may read besides the licence), and the outcome is the NotificationsReady condition,
naming the field when the Secret or its key is missing or invalid (the copy then deleted), or when the
URL's host is no host name. When the Customer is deleted, the copy is kept in the billing namespace for
the webhooks still to be sent."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from kubernetes.client.exceptions import ApiException

from iotistic_billing.customer import (
    DELETED_NOTIFICATIONS_SECRET_NAME,
    NOTIFICATIONS_SECRET_KEY,
    NOTIFICATIONS_SECRET_NAME,
    ConditionType,
    CustomerSpec,
    SecretKeyRef,
    deletion_running_annotation,
    signs_until_annotation,
    webhook_url_problem,
)
from iotistic_billing.k8s import SecretData
from iotistic_billing.notices.outbox import notices_written_until
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.manifests import notifications_secret_manifest
from iotistic_billing.operator.outcomes import NotificationsOutcome
from iotistic_billing.operator.refusals import Refused, refused_as
from iotistic_billing.operator.state import PassTarget
from iotistic_billing.settings import webhook_secret_bytes

FIELD = "spec.notifications.webhook.secretRef"
# How often the housekeeping compares a webhook's Secret with its copy (Flux's default interval): a
# rotated value is signed with within about that long, at two reads per Customer with a webhook.
WEBHOOK_SECRET_CHECK = timedelta(minutes=10)


async def ensure_webhook_secret(ctx: OperatorContext, target: PassTarget) -> NotificationsOutcome | None:
    """None for a Customer without a webhook. A Secret gone, its key gone or a value that is no signing
    secret also deletes the Customer's copy: no webhook is signed with a key its customer took back (one
    that leaked); the sender's deliveries fail, retried, until the Secret is back and copied again. So
    does the webhook removed from the spec (its NotificationsReady still on the status): the deliveries
    still pending are not signed with the key and posted to the URL the customer withdrew. A request the
    API server refuses (an admission policy, RBAC) raises refusals.Refused naming the Secret, except the
    copy's removal: that is NotificationsReady False with copy_kept, with or without a webhook, so that
    the housekeeping keeps trying (state.housekeeping_due) and an Event says the key still signs."""
    webhook = target.spec.notifications.webhook
    if webhook is None:
        if target.customer.status.condition(ConditionType.NOTIFICATIONS_READY) is not None:
            return await _copy_removed(ctx, target.namespace, target.customer_id)
        return None
    problem = webhook_url_problem(webhook.url)
    if problem is not None:
        return NotificationsOutcome(
            False, c.INVALID_WEBHOOK_URL, f"spec.notifications.webhook.url: {problem}"
        )
    ref, namespace = webhook.secret_ref, target.namespace
    with refused_as(f"to read Secret {namespace}/{ref.name}"):
        source = await ctx.kube.read_secret_data(namespace, ref.name)
    value = _signing_secret(source, ref, namespace)
    if isinstance(value, NotificationsOutcome):
        kept = await _copy_removed(ctx, namespace, target.customer_id)
        return replace(kept, message=f"{value.message}; {kept.message}") if kept is not None else value
    with refused_as(f"to read Secret {namespace}/{NOTIFICATIONS_SECRET_NAME}"):
        copied = _customers_copy(
            await ctx.kube.read_secret_data(namespace, NOTIFICATIONS_SECRET_NAME), target.customer_id
        )
    if copied is None or copied.data.get(NOTIFICATIONS_SECRET_KEY) != value:
        with refused_as(f"to apply Secret {namespace}/{NOTIFICATIONS_SECRET_NAME}"):
            await ctx.kube.apply(
                notifications_secret_manifest(
                    namespace=namespace,
                    name=target.name,
                    customer_id=target.customer_id,
                    owner=target.owner,
                    secret=value,
                )
            )
    return NotificationsOutcome(
        True, c.WEBHOOK_SECRET_READY, f"webhooks signed with {namespace}/{ref.name} key {ref.key}"
    )


# Deletes of the copy that found it changed since its read (409) before the pass fails and is retried.
COPY_DELETE_CONFLICTS = 3


async def _copy_removed(
    ctx: OperatorContext, namespace: str, customer_id: str
) -> NotificationsOutcome | None:
    """The customer's copy of its signing secret deleted (none, or another customer id's, left alone),
    at the resourceVersion read, and read again when it changed since (the 409 is no refusal); None once
    done. Its read or delete refused (an admission policy, RBAC): NotificationsReady False, copy_kept."""
    conflicts = 0
    try:
        while True:
            with refused_as(f"to read Secret {namespace}/{NOTIFICATIONS_SECRET_NAME}"):
                copied = _customers_copy(
                    await ctx.kube.read_secret_data(namespace, NOTIFICATIONS_SECRET_NAME), customer_id
                )
            if copied is None:
                return None
            try:
                with refused_as(f"to delete Secret {namespace}/{NOTIFICATIONS_SECRET_NAME}"):
                    await ctx.kube.delete_secret(
                        namespace, NOTIFICATIONS_SECRET_NAME, resource_version=copied.resource_version or None
                    )
                return None
            except ApiException as error:
                conflicts += 1
                if error.status != 409 or conflicts == COPY_DELETE_CONFLICTS:
                    raise
    except Refused as refused:
        return NotificationsOutcome(
            False,
            c.NOTIFICATIONS_SECRET_REFUSED,
            f"{refused}; the customer's notices are still signed with the copy, tried again every minute"
            " (a Stalled Customer's at its next pass)",
            copy_kept=True,
        )


def _signing_secret(
    source: SecretData | None, ref: SecretKeyRef, namespace: str
) -> bytes | NotificationsOutcome:
    """The signing secret the Secret `ref` names (`source`, as read in `namespace`) holds, or why it holds
    none (NotificationsReady False, naming the field)."""
    if source is None:
        return NotificationsOutcome(
            False, c.SECRET_NOT_FOUND, f"{FIELD}.name: no Secret {ref.name} in {namespace}"
        )
    value = source.data.get(ref.key)
    if value is None:
        return NotificationsOutcome(
            False, c.SECRET_KEY_NOT_FOUND, f"{FIELD}.key: Secret {namespace}/{ref.name} has no key {ref.key}"
        )
    try:
        webhook_secret_bytes(value.decode(errors="replace"))
    except ValueError as invalid:
        return NotificationsOutcome(
            False, c.INVALID_SECRET, f"{FIELD}: {namespace}/{ref.name} {ref.key} {invalid}"
        )
    return value


def _customers_copy(copied: SecretData | None, customer_id: str) -> SecretData | None:
    """The copy of the signing secret when its label names `customer_id`, as the sender asks before it
    signs that id's notices with it; None for none, or another customer id's (left alone)."""
    if copied is None or copied.labels.get(c.LABEL_CUSTOMER_ID) != customer_id:
        return None
    return copied


async def webhook_secret_changed(ctx: OperatorContext, spec: CustomerSpec, namespace: str) -> bool:
    """Whether the Secret the webhook's secretRef names no longer holds what its copy does (rotated,
    or gone): no watch sees that Secret, so the housekeeping asks now and then (WEBHOOK_SECRET_CHECK)."""
    webhook = spec.notifications.webhook
    if webhook is None:
        return False
    source = await ctx.kube.read_secret_data(namespace, webhook.secret_ref.name)
    copied = await ctx.kube.read_secret_data(namespace, NOTIFICATIONS_SECRET_NAME)
    value = source.data.get(webhook.secret_ref.key) if source is not None else None
    return value is None or copied is None or copied.data.get(NOTIFICATIONS_SECRET_KEY) != value


async def signing_secret_copy(ctx: OperatorContext, customer_id: str, namespace: str) -> bytes | None:
    """A deleted Customer's copy of the signing secret in its namespace, when it is `customer_id`'s (its
    label says so, as the sender asks); None when there is none: no webhook, or a deletion retried after
    the namespace went (what was kept then stays as it was)."""
    copied = _customers_copy(
        await ctx.kube.read_secret_data(namespace, NOTIFICATIONS_SECRET_NAME), customer_id
    )
    return copied.data.get(NOTIFICATIONS_SECRET_KEY) if copied is not None else None


async def keep_webhook_secret(
    ctx: OperatorContext, customer_id: str, secret: bytes | None, *, running_deletion: str | None
) -> None:
    """A deleted Customer's signing secret (signing_secret_copy) kept under its customer id in the
    billing namespace, so that its pending webhooks (the `license.revoked` its deletion writes, any still
    retrying) can be signed on every try once its namespace is gone; the notice sender drops it once none
    is pending (docs/architecture.md, "Notices"), but not while `running_deletion` marks it (kept before
    the deletion's notice is written: nothing is pending yet; the mark, `deletion_mark`, names the deleting
    Customer, None lifts it). `secret` None: the mark alone (a retry that found the copy gone keeps what an
    earlier try kept).

    While the mark is on, the key signs every notice of the id (no other Customer held it when the
    deletion looked); once it is lifted, only those written until then (`signs_until_annotation`): a
    Customer created again under the id later signs its own with its own key."""
    namespace = ctx.settings.billing_namespace
    annotations: dict[str, str | None] = {deletion_running_annotation(customer_id): running_deletion}
    if running_deletion is not None:
        annotations[signs_until_annotation(customer_id)] = None  # the key it keeps signs all until it ends
    elif secret is not None or await _marked(ctx, namespace, customer_id):
        # Read after the deletion's notice committed.
        annotations[signs_until_annotation(customer_id)] = (
            await notices_written_until(ctx.sessions)
        ).isoformat()
    # Else this deletion kept nothing: a key an earlier deletion of the id kept keeps its own time (moved
    # on, it would sign the notices written since, of a Customer created again under the id).
    await ctx.kube.merge_secret_data(
        namespace,
        DELETED_NOTIFICATIONS_SECRET_NAME,
        {customer_id: secret} if secret is not None else {},
        labels={c.LABEL_MANAGED_BY: c.MANAGED_BY},
        annotations=annotations,
    )


async def _marked(ctx: OperatorContext, namespace: str, customer_id: str) -> bool:
    """Whether a key is kept under `customer_id` with this deletion's mark (an earlier try of it kept the
    key, and this one found the copy gone)."""
    kept = await ctx.kube.read_secret_data(namespace, DELETED_NOTIFICATIONS_SECRET_NAME)
    return (
        kept is not None
        and customer_id in kept.data
        and deletion_running_annotation(customer_id) in kept.annotations
    )


async def drop_marked_webhook_secret(ctx: OperatorContext, customer_id: str) -> None:
    """The key kept under `customer_id` dropped, with its mark, when a deletion still running marked it
    (an earlier try of a deletion that now finds another Customer holding the id); nothing otherwise."""
    namespace = ctx.settings.billing_namespace
    kept = await ctx.kube.read_secret_data(namespace, DELETED_NOTIFICATIONS_SECRET_NAME)
    mark = deletion_running_annotation(customer_id)
    if kept is None or not kept.annotations.get(mark):
        return
    await ctx.kube.merge_secret_data(
        namespace,
        DELETED_NOTIFICATIONS_SECRET_NAME,
        {customer_id: None},
        annotations={mark: None, signs_until_annotation(customer_id): None},
        resource_version=kept.resource_version,
    )


__all__ = [
    "WEBHOOK_SECRET_CHECK",
    "drop_marked_webhook_secret",
    "ensure_webhook_secret",
    "keep_webhook_secret",
    "signing_secret_copy",
    "webhook_secret_changed",
]
