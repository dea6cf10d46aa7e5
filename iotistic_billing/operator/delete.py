"""Deletion behind the finalizer: uninstall the release, revoke the licence and the usage keys, keep the
webhook signing secret for the pending webhooks, request the namespace's deletion.

It does not rely on garbage collection (a bare control plane runs none), and each step accepts that its
object is already gone, so a deletion retried after a crash completes. Only a namespace the operator made
for this Customer is touched: one someone else made (the Customer stalled as NamespaceTaken) keeps its
release and everything in it, and an earlier Customer's of the same name is that one's finalizer's.
"""

from __future__ import annotations

from typing import Any

from iotistic_billing.customer import (
    LICENSE_SECRET_NAME,
    USAGE_API_KEY_KEY,
    InvalidSpecError,
    customer_id_in_use,
    namespace_for,
    parse_spec,
)
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.license import revoke_license, revoke_usage_keys
from iotistic_billing.operator.manifests import namespace_holder
from iotistic_billing.operator.metrics import forget_customer
from iotistic_billing.operator.webhook_secret import keep_webhook_secret


async def finalize(ctx: OperatorContext, body: dict[str, Any]) -> bool:
    """The Customer's deletion; False when its namespace was not its own (or already gone) and was left."""
    meta = body["metadata"]
    name = str(meta["name"])
    async with ctx.locks.held(name):
        # Read from the raw object: a Customer must be deletable even with a spec we now refuse.
        customer_id = customer_id_in_use(body)
        namespace = namespace_for(name)
        found = await ctx.kube.read_namespace(namespace)
        ours = found is not None and namespace_holder(found, name, str(meta.get("uid"))) == "this"
        if ours and found is not None and not found["metadata"].get("deletionTimestamp"):
            await ctx.helm.uninstall(c.RELEASE_NAME, namespace)
        secret = await ctx.kube.read_secret_data(namespace, LICENSE_SECRET_NAME) if ours else None
        holder = await other_holder(ctx, body, customer_id)
        if holder is None:
            try:
                notify = (name, parse_spec(body.get("spec") or {}))
            except InvalidSpecError:
                notify = None  # a spec we refuse has no addresses we trust
            await revoke_license(ctx, customer_id, secret, reason="Customer deleted", notify=notify)
            await revoke_usage_keys(ctx, customer_id)
            if ours:
                # After the notice is written (the sender keeps the copy while a delivery of it is
                # pending) and before the namespace, and the copy in it, go.
                await keep_webhook_secret(ctx, customer_id, namespace)
        else:
            # A rename that kept spec.customerId (GitOps applies the new Customer before it prunes the
            # old): the customer goes on under `holder`, so only this Customer's own licence and usage
            # key end, nobody is told the licence was revoked, and its webhooks are the holder's to sign.
            reported = ((body.get("status") or {}).get("license") or {}).get("jti")
            await revoke_license(
                ctx,
                customer_id,
                secret,
                reason=f"Customer {name} deleted; customer id {customer_id} stays with Customer {holder}",
                held_by=holder,
                reported_jti=reported,
            )
            own_key = secret[0].get(USAGE_API_KEY_KEY) if secret is not None else None
            if own_key:
                await revoke_usage_keys(ctx, customer_id, only=own_key.decode(errors="replace"))
        ctx.applied_namespaces.pop(namespace, None)
        ctx.mirrored.discard(customer_id)
        if ours:
            await ctx.kube.delete_namespace(namespace)
        # The holder's licence expiry is exported under the same customer id: kept.
        forget_customer(name, customer_id if holder is None else None)
    ctx.written.pop(name, None)
    return ours


async def other_holder(ctx: OperatorContext, body: dict[str, Any], customer_id: str) -> str | None:
    """The name of another live Customer (not being deleted) whose customer id in use is `customer_id`,
    if any. A list of the Customers, once a deletion: nothing cheaper can tell (the directory's mirror
    keeps one name per customer id, whichever Customer minted last)."""
    uid = body["metadata"].get("uid")
    for other in await ctx.kube.list_customers():
        meta = other["metadata"]
        if meta.get("uid") == uid or meta.get("deletionTimestamp"):
            continue
        if customer_id_in_use(other) == customer_id:
            return str(meta["name"])
    return None
