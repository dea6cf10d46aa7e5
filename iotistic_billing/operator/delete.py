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


async def finalize(ctx: OperatorContext, body: dict[str, Any]) -> None:
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
        try:
            notify = (name, parse_spec(body.get("spec") or {}))
        except InvalidSpecError:
            notify = None  # a spec we refuse has no addresses we trust
        await revoke_license(ctx, customer_id, secret, reason="Customer deleted", notify=notify)
        await revoke_usage_keys(ctx, customer_id)
        if ours:
            # After the notice is written (the sender keeps the copy while a delivery of it is pending)
            # and before the namespace, and the copy in it, go.
            await keep_webhook_secret(ctx, customer_id, namespace)
        ctx.applied_namespaces.pop(namespace, None)
        ctx.mirrored.discard(customer_id)
        if ours:
            await ctx.kube.delete_namespace(namespace)
        forget_customer(name, customer_id)
    ctx.written.pop(name, None)
