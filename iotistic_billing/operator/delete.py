"""Deletion behind the finalizer: mark the Customer Terminating, keep the webhook signing secret for the
pending webhooks (read first: a foreground deletion has it deleted meanwhile), uninstall the release,
revoke the licence and the usage keys, request the namespace's deletion. A Stripe subscription the Customer
leaves billing is not cancelled (Stripe is asked nothing here) but said, in a Warning, with how to cancel
it (subscription_left_billing). A step that fails raises
DeletionFailed, which names it; an uninstall that cannot succeed (an object of the release of a kind whose
CRD is gone: helm cannot build the release's objects) leaves the release to the namespace's deletion.

It does not rely on garbage collection (a bare control plane runs none), and each step accepts that its
object is already gone, so a deletion retried after a crash completes. Only a namespace the operator made
for this Customer is touched: one someone else made (the Customer stalled as NamespaceTaken) keeps its
release and everything in it, and an earlier Customer's of the same name is that one's finalizer's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from iotistic_billing.customer import (
    KIND,
    LICENSE_SECRET_NAME,
    PAID_STATUSES,
    USAGE_API_KEY_KEY,
    CustomerStatus,
    InvalidSpecError,
    SubscriptionSpec,
    customer_id_in_use,
    deletion_mark,
    namespace_for,
    parse_spec,
)
from iotistic_billing.db.license_history import DELETION_REASON
from iotistic_billing.directory import cancel_body
from iotistic_billing.k8s import refusal_message
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.events import post_events
from iotistic_billing.operator.helm import HelmError
from iotistic_billing.operator.license import revoke_license, revoke_usage_keys
from iotistic_billing.operator.manifests import namespace_holder
from iotistic_billing.operator.metrics import forget_customer
from iotistic_billing.operator.reconcile import current_customer, other_holder, write_status
from iotistic_billing.operator.state import terminating_status
from iotistic_billing.operator.webhook_secret import (
    drop_marked_webhook_secret,
    keep_webhook_secret,
    signing_secret_copy,
)
from iotistic_billing.stripe_inbox.events import OPEN_STATUSES

log = logging.getLogger(__name__)


class DeletionFailed(Exception):
    """A step of a Customer's deletion failed: `step` says which, the message also why."""

    def __init__(self, step: str, cause: Exception) -> None:
        if isinstance(cause, ApiException):
            # Not str(cause): it has the answer's headers (Audit-Id, Date), new every try, and the handler
            # posts a Warning once a message.
            why = f"the API server refused it ({cause.status}): {refusal_message(cause)}"
        else:
            why = str(cause) or type(cause).__name__
        super().__init__(f"{step} failed: {why}")
        self.step = step


@dataclass(frozen=True)
class Deletion:
    """What a completed deletion did, for its Deleted Event."""

    namespace: str
    own_namespace: bool  # the Customer's own: its deletion requested (another's is left as it is)
    # helm uninstall ran (not in a namespace already being deleted) and found the release; False when it
    # did not run or found none (the first pass failed before helm, or an earlier try uninstalled it).
    uninstalled: bool
    license_revoked: bool  # False: there was none (a Customer stalled since its creation)
    namespace_terminating: bool  # found already being deleted: no uninstall ran
    # Why helm could not uninstall the release, left to the namespace's deletion (release_left_to_namespace).
    uninstall_failed: str | None = None
    # The Stripe subscription left billing (subscription_left_billing) and the customer id it bills.
    subscription_left: SubscriptionSpec | None = None
    customer_id: str = ""

    def message(self) -> str:
        deleting = self.own_namespace and not self.namespace_terminating
        done = ["release uninstalled"] if self.uninstalled else []
        if self.uninstall_failed is not None:
            done.append("release left to the namespace's deletion (helm could not uninstall it)")
        elif deleting and not self.uninstalled:
            done.append("no release left to uninstall")
        done.append("licence revoked" if self.license_revoked else "no licence to revoke")
        if deleting:
            return f"{', '.join(done)}, namespace deletion requested"
        if self.own_namespace:
            left = "already being deleted, which removes the release"
        else:
            left = "not the Customer's own (or gone): left as it is"
        return f"{', '.join(done)}; namespace {self.namespace} {left}"

    def subscription_warning(self) -> str | None:
        """What its Warning says of the subscription left billing; None when there is none."""
        left = self.subscription_left
        if left is None:
            return None
        subscription_id = left.stripe_subscription_id or ""  # subscription_left_billing: never None
        return (
            f"Stripe subscription {subscription_id} ({left.status}) of customer id {self.customer_id} was"
            " open when the Customer was deleted, and Stripe bills it until it is cancelled: cancel it in"
            " the Stripe Dashboard, or with POST /api/subscriptions/cancel"
            f" {cancel_body(self.customer_id, subscription_id)} (naming it, a retry cancels no other"
            " subscription). The console's overview lists it, and iotistic_subscriptions_left_billing counts"
            " it, until it is cancelled. A cancel sent moments before the deletion may not have reached this"
            " Customer yet"
        )


@contextmanager
def _step(doing: str) -> Iterator[None]:
    """A step of the deletion: whatever fails in it is a DeletionFailed naming it."""
    try:
        yield
    except Exception as error:
        raise DeletionFailed(doing, error) from error


async def finalize(ctx: OperatorContext, body: dict[str, Any]) -> Deletion:
    """The Customer's deletion, and what it did."""
    meta = body["metadata"]
    name = str(meta["name"])
    async with ctx.locks.held(name):
        # A pass that held the lock meanwhile wrote what Kopf's copy lacks (the customer id, the licence,
        # the release): marked Terminating over that, not over the older copy (which undid it).
        with _step("reading the Customer"):
            current = await current_customer(ctx, name, body)
        if current is not None and current["metadata"].get("uid") == meta.get("uid"):
            body = current
        with _step("marking the Customer Terminating"):
            await _mark_terminating(ctx, body)
        # Read from the raw object: a Customer must be deletable even with a spec we now refuse.
        customer_id = customer_id_in_use(body)
        namespace = namespace_for(name)
        with _step(f"reading namespace {namespace}"):
            found = await ctx.kube.read_namespace(namespace)
        ours = found is not None and namespace_holder(found, name, str(meta.get("uid"))) == "this"
        # Read first: a foreground deletion (Argo CD's prune) has the garbage collector delete the copy, a
        # dependent of the Customer, while this runs. The holder before anything is kept: a key kept under
        # the id would sign the holder's webhooks (the sender looks there first).
        with _step(f"reading the webhook signing secret of {namespace}"):
            signing = await signing_secret_copy(ctx, customer_id, namespace) if ours else None
        # Whether `holder` is the answer of a list made since the last step that takes seconds: each list
        # is of the whole fleet, and a thousand Customers deleted at once listed it thousands of times.
        looked, holder = False, None
        if signing is not None:
            with _step(f"looking for another Customer with customer id {customer_id}"):
                holder = await other_holder(ctx, body, customer_id)
            looked = True
            if holder is None:
                with _step("keeping the webhook signing secret"):
                    await keep_webhook_secret(
                        ctx,
                        customer_id,
                        signing,
                        running_deletion=deletion_mark(name, str(meta.get("uid") or "")),
                    )
        terminating = found is not None and bool(found["metadata"].get("deletionTimestamp"))
        uninstalled = False
        uninstall_failed = None
        if ours and not terminating:
            looked = False  # an uninstall takes seconds, a Customer may be applied under the id meanwhile
            with _step(f"uninstalling release {c.RELEASE_NAME} from {namespace}"):
                try:
                    # helm's answer, not the attempt: a Customer whose first pass failed before helm has none.
                    uninstalled = await ctx.helm.uninstall(c.RELEASE_NAME, namespace)
                except HelmError as error:
                    if not release_left_to_namespace(error):
                        raise
                    uninstall_failed = str(error)
                    log.warning(
                        "release %s in %s left to the namespace's deletion: %s",
                        c.RELEASE_NAME,
                        namespace,
                        error,
                    )
        with _step(f"reading the licence Secret of {namespace}"):
            secret = await ctx.kube.read_secret_data(namespace, LICENSE_SECRET_NAME) if ours else None
        # Looked for right before the revocations, not before the uninstall (seconds): a Customer applied
        # meanwhile under the id has had its first licence and usage key, which revoking every key of the id
        # would end, and its customer would be told the licence was revoked. Without an uninstall since,
        # the look above is a moment old and holds.
        if not looked:
            with _step(f"looking for another Customer with customer id {customer_id}"):
                holder = await other_holder(ctx, body, customer_id)
        if holder is None:
            try:
                notify = (name, parse_spec(body.get("spec") or {}))
            except InvalidSpecError:
                notify = None  # a spec we refuse has no addresses we trust
            with _step("revoking the licence"):
                revoked = await revoke_license(
                    ctx, customer_id, secret, reason=DELETION_REASON, notify=notify
                )
            with _step("revoking the usage keys"):
                await revoke_usage_keys(ctx, customer_id)
            # Again once the notice is written, now for the sender to drop when nothing is pending, with
            # the time until which it signs the id's notices (a Customer created again under the id signs
            # its own); also when this try found no copy (the namespace or the copy gone: the garbage
            # collector's), so that what an earlier try kept and marked is not kept for ever, nor signs
            # every later notice (nothing when nothing was kept).
            with _step("keeping the webhook signing secret"):
                await keep_webhook_secret(ctx, customer_id, signing, running_deletion=None)
            left = subscription_left_billing(body)
        else:
            # A rename that kept spec.customerId (GitOps applies the new Customer before it prunes the
            # old): the customer goes on under `holder`, so only this Customer's own licence and usage
            # key end, nobody is told the licence was revoked, and its webhooks are the holder's to sign.
            reported = ((body.get("status") or {}).get("license") or {}).get("jti")
            with _step("revoking the licence"):
                revoked = await revoke_license(
                    ctx,
                    customer_id,
                    secret,
                    reason=f"Customer {name} deleted; customer id {customer_id} stays with Customer {holder}",
                    held_by=holder,
                    reported_jti=reported,
                )
            # An earlier try, before the holder was applied, may have kept this Customer's key: it must
            # not sign the holder's webhooks.
            with _step("dropping the webhook signing secret an earlier try kept"):
                await drop_marked_webhook_secret(ctx, customer_id)
            own_key = secret[0].get(USAGE_API_KEY_KEY) if secret is not None else None
            if own_key:
                with _step("revoking the usage key"):
                    await revoke_usage_keys(ctx, customer_id, only=own_key.decode(errors="replace"))
            left = None  # the holder's now, billed for its instance
        ctx.applied_namespaces.pop(namespace, None)
        ctx.mirrored.discard(customer_id)
        if ours:
            with _step(f"deleting namespace {namespace}"):
                await ctx.kube.delete_namespace(namespace)
        # The holder's licence expiry is exported under the same customer id: kept.
        forget_customer(name, customer_id if holder is None else None)
    ctx.written.pop(name, None)
    ctx.deletion_holders.record(str(meta.get("uid") or ""), holder)
    return Deletion(
        namespace,
        own_namespace=ours,
        uninstalled=uninstalled,
        license_revoked=revoked,
        namespace_terminating=terminating,
        uninstall_failed=uninstall_failed,
        subscription_left=left,
        customer_id=customer_id,
    )


def subscription_left_billing(body: Mapping[str, Any]) -> SubscriptionSpec | None:
    """The Stripe subscription a deleted Customer leaves billing: spec.subscription while it is open
    (OPEN_STATUSES, as a cancel finds it), not an active or trialing one set to cancel at its period's end,
    which Stripe ends then (an unpaid or paused one it ends only when cancelled). Stripe bills it until it
    is cancelled, and a GitOps prune cannot cancel first. Read alone: a spec we refuse still leaves it."""
    try:
        subscription = SubscriptionSpec.model_validate((body.get("spec") or {}).get("subscription"))
    except ValidationError:
        return None
    if subscription.stripe_subscription_id is None or subscription.status not in OPEN_STATUSES:
        return None
    if subscription.status in PAID_STATUSES and subscription.cancel_at_period_end:
        return None
    return subscription


def release_left_to_namespace(error: HelmError) -> bool:
    """Whether an uninstall that failed so is left to the namespace's deletion rather than retried: an
    object of the release is of a kind the cluster no longer has (a ServiceMonitor whose CRD was removed),
    so helm cannot build the release's objects and fails every try, which held the licence's revocation
    and the namespace for ever. The objects of that kind went with their CRD; the rest of the release and
    its storage Secrets are in the Customer's namespace, whose deletion removes them (an object the
    release made outside it would be left: the instance chart makes none). Anything else (the API server
    away, helm killed at HELM_TIMEOUT, another operation in progress) is retried."""
    return error.missing_kind


async def _mark_terminating(ctx: OperatorContext, body: dict[str, Any]) -> None:
    """Phase Terminating and Ready False (state.terminating_status), with the phase's Event, so that
    `kubectl get` tells the truth while a step fails and is retried; nothing when the status says so
    already, as it does on every retry (Kopf hands over the Customer as it is now)."""
    try:
        previous = CustomerStatus.model_validate(body.get("status") or {})
    except ValidationError as error:  # a status we cannot read must not hold the deletion up
        log.warning("status of Customer %s not marked Terminating: %s", body["metadata"]["name"], error)
        return
    status = terminating_status(previous, int(body["metadata"].get("generation") or 0), ctx.clock())
    if status is not None:
        result = await write_status(ctx, body, previous, status)
        await post_events(ctx.kube, KIND, body, result.events)
