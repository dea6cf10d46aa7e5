"""Admin routes of customers: signup (creates the Customer resource), one customer, the list.

Signup keeps no password: the earlier system's clients send one, it is validated for size and discarded.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web
from kubernetes.client.exceptions import ApiException
from sqlalchemy import func, select

from iotistic_billing.customer import customer_id_in_use, resource_name_for
from iotistic_billing.db import models
from iotistic_billing.db.pool import database_unreachable
from iotistic_billing.directory import CustomerRecord, email_named, remember
from iotistic_billing.errors import ApiError, Conflict, Unavailable
from iotistic_billing.k8s import Kube, KubernetesUnavailable
from iotistic_billing.stripe_api import IdempotencyKeyReused, StripeApi
from iotistic_billing.webhook_server.context import (
    CLOCK,
    DIRECTORY,
    KUBE,
    OPTIONS,
    SESSIONS,
    SETTINGS,
    STRIPE,
)
from iotistic_billing.webhook_server.licenses import license_token
from iotistic_billing.webhook_server.messages import (
    IDEMPOTENCY_KEY_HEADER,
    idempotency_key_reused,
    json_model,
    key_digest,
    read_body,
    read_customer_id,
    read_idempotency_key,
    read_query,
)
from iotistic_billing.webhook_server.schemas import (
    CustomerList,
    LicenseToken,
    ListCustomersQuery,
    Pagination,
    SignupCustomer,
    SignupRequest,
    SignupResponse,
    SignupSubscription,
)
from iotistic_billing.webhook_server.views import (
    customer_view,
    name_suffix,
    new_customer_id,
    queue_stats,
    signup_manifest,
    sort_key,
    trial_ends_at,
)

log = logging.getLogger(__name__)
_NAME_ATTEMPTS = 5
# The class of signup's per-email advisory locks (the two-key form, apart from the one-bigint keys of
# the other locks); any int4 of ours, this one spells "sign".
SIGNUP_LOCK: Final = 0x7369676E


async def create_customer(request: web.Request) -> web.Response:
    """Sign up a customer: a Customer resource in trial, and its licence once the operator issued it."""
    app = request.app
    settings, kube, directory, billing = app[SETTINGS], app[KUBE], app[DIRECTORY], app[STRIPE]
    key = read_idempotency_key(request)
    body = await read_body(request, SignupRequest)
    customer_id = keyed_customer_id(body.email, key) if key is not None else new_customer_id()
    record: CustomerRecord | None = None
    stripe_customer_id: str | None = None
    try:
        async with app[SESSIONS]() as session, session.begin():
            # One signup of an email at a time across replicas, to this transaction's end: the next reads
            # the Customers after the one before it created its own (the list is the API server's quorum
            # read, not a cache). Taken before anything is created: a database that is down stops the
            # signup here. Not waited for: a second signup of the email meanwhile is a duplicate, and each
            # waiting one would hold a pooled connection through Stripe and the create.
            if not await session.scalar(
                select(func.pg_try_advisory_xact_lock(SIGNUP_LOCK, func.hashtext(func.lower(body.email))))
            ):
                if key is not None:
                    raise _signup_in_progress(customer_id)
                raise Conflict(
                    "Customer already exists",
                    "a signup with this email address is in progress",
                    [{"field": "email", "message": "being registered"}],
                )
            email, slug = body.email.lower(), resource_name_for(body.company_name)
            # The Customer named as the company's slug too, so that a company name in use goes straight
            # to a suffixed name, not through a create the API server refuses (a random suffix taken is
            # left to that 409).
            existing = await directory.where(
                lambda raw: (
                    email_named(raw) == email
                    or customer_id_in_use(raw) == customer_id
                    or raw["metadata"].get("name") == slug
                )
            )
            holder = next((o for o in existing if o.customer.spec.email.lower() == email), None)
            keyed = next((o for o in existing if o.customer_id == customer_id), None)
            if holder is None and keyed is not None:
                # A retry of a keyed signup whose Customer's spec.email was edited since: its customer.
                raise Conflict(
                    "Customer already exists",
                    f"customer {customer_id} (Customer {keyed.name}) was signed up with this Idempotency-Key",
                    [
                        {
                            "field": IDEMPOTENCY_KEY_HEADER,
                            "message": "already signed up",
                            "customer_id": customer_id,
                            "resource_name": keyed.name,
                        }
                    ],
                )
            if holder is not None:
                # Named: a retry of a signup whose answer was lost finds its customer here, and no query
                # finds a customer by email.
                raise Conflict(
                    "Customer already exists",
                    f"customer {holder.customer_id} (Customer {holder.name}) has this email address",
                    [
                        {
                            "field": "email",
                            "message": "already registered",
                            "customer_id": holder.customer_id,
                            "resource_name": holder.name,
                        }
                    ],
                )
            if billing is not None:
                try:
                    stripe_customer_id = await billing.create_customer(
                        email=body.email, company_name=body.company_name, customer_id=customer_id
                    )
                except Unavailable as away:
                    raise _stripe_maybe_made(away, customer_id, keyed=key is not None) from None
                except IdempotencyKeyReused:
                    if key is None:
                        raise
                    raise _key_reused(customer_id) from None
            try:
                created = await _create_resource(
                    kube,
                    taken={other.name for other in existing},
                    make=lambda name: signup_manifest(
                        name=name,
                        customer_id=customer_id,
                        request=body,
                        billing_mode="stripe" if billing is not None else "manual",
                        trial_days=settings.default_trial_days,
                        now=app[CLOCK](),
                        stripe_customer_id=stripe_customer_id,
                    ),
                    company_name=body.company_name,
                )
            except (ApiException, Conflict):
                # The API server refused every name: no Customer holds this id.
                if billing is not None and stripe_customer_id is not None:
                    await _delete_stripe_customer(billing, stripe_customer_id, customer_id)
                raise
            except KubernetesUnavailable as away:
                if not away.maybe_applied:  # not sent, or refused (429, 502, 503): no Customer holds the id
                    if billing is not None and stripe_customer_id is not None:
                        await _delete_stripe_customer(billing, stripe_customer_id, customer_id)
                    raise
                # Sent and not answered: the create can still land after any list of ours, and a Stripe
                # customer deleted under a Customer cannot be had back, so it is kept.
                raise _maybe_created(customer_id, stripe_customer_id) from None
            # From here the Stripe customer is the Customer's (its metadata names the customer id, and
            # checkout's create with the same idempotency key finds it again), so a failure keeps it.
            record = CustomerRecord.from_body(created)
            if record is None:
                raise ApiError("Internal server error", "the created Customer could not be read back")
            await remember(session, record.customer, record.customer_id, stripe_customer_id)
    except Exception as error:
        # The Customer exists once created: a database lost after that (at the mirror row or the commit)
        # is no "nothing was changed" 503, whose retry would be a 409 without the customer id. The
        # operator writes the mirror row when it mints the licence.
        if record is None or not database_unreachable(error):
            raise
        log.warning(
            "signup created Customer %s (%s), which could not be recorded in PostgreSQL (%s): the operator"
            " records it",
            record.name,
            customer_id,
            type(error).__name__,
        )
    log.info("signup created Customer %s (%s)", record.name, customer_id)
    token = await _wait_for_license(
        kube, record.namespace, customer_id, app[OPTIONS].license_wait, app[OPTIONS].license_poll_interval
    )
    response = SignupResponse(
        customer=SignupCustomer(
            customer_id=customer_id,
            resource_name=record.name,
            email=body.email,
            company_name=body.company_name,
            full_name=body.full_name,
            stripe_customer_id=stripe_customer_id,
            created_at=record.customer.metadata.creation_timestamp,
        ),
        subscription=SignupSubscription(
            plan="trial", status="trialing", trial_ends_at=trial_ends_at(record, app[CLOCK]())
        ),
        license=LicenseToken(jwt=token) if token else None,
    )
    location = f"/api/customers/{customer_id}"
    return json_model(response, status=201 if token else 202, headers={"Location": location})


def keyed_customer_id(email: str, key: str) -> str:
    """The customer id of a signup sent with an Idempotency-Key: the same for its retries (one Customer,
    one Stripe customer under Stripe's key of the id), another for the same key with another email."""
    return "cust_" + key_digest("POST /api/customers", email.lower(), key)[:16]


def _signup_in_progress(customer_id: str) -> Conflict:
    """A keyed signup of an email whose lock another try holds (this key's first, still waiting on Stripe
    or the API server, or another key's): no customer exists yet, and that try may still fail, so the
    client retries under its key, as the IETF draft answers a key whose request is in progress."""
    return Conflict(
        "Signup in progress",
        "a signup with this email address is in progress (this Idempotency-Key's first try, or another"
        f" one's): retry with the same Idempotency-Key; the customer this key signs up is {customer_id}"
        f" (GET /api/customers/{customer_id} finds it once made)",
        {"field": IDEMPOTENCY_KEY_HEADER, "message": "signup in progress", "customer_id": customer_id},
        headers={"Retry-After": "5"},
    )


def _key_reused(customer_id: str) -> ApiError:
    """Stripe's idempotency_error to a keyed signup's Stripe customer: an earlier try of the key, within
    Stripe's 24 hours, sent another company_name or the email in another case (one customer id)."""
    return idempotency_key_reused(
        f"this Idempotency-Key signed up this email (customer {customer_id}) within 24 hours with another"
        " company_name or the email in another case, and Stripe refused the change: send the first try's"
        " body again under this key, or sign up with a new Idempotency-Key (a Stripe customer with metadata"
        f" customerId {customer_id} that an earlier try made may then be left in Stripe)",
        customer_id=customer_id,
    )


def _stripe_maybe_made(away: Unavailable, customer_id: str, *, keyed: bool) -> Unavailable:
    """Stripe's 503 to the signup's Stripe customer, naming the customer id it was made for: no Customer
    exists (its GET is a 404), and a Stripe customer whose metadata names the id may."""
    away.details = {**(away.details or {}), "customer_id": customer_id}
    away.message += f"; no Customer was created (GET /api/customers/{customer_id} is a 404): " + (
        "a retry with the same Idempotency-Key takes up the Stripe customer it may have made"
        if keyed
        else f"a Stripe customer with metadata customerId {customer_id} may be left in Stripe"
    )
    away.args = (away.message,)
    return away


def _maybe_created(customer_id: str, stripe_customer_id: str | None) -> Unavailable:
    """The answer to a signup whose create the API server did not answer: its Customer may exist, so the
    client reads it before signing up again (a retry of one that exists is a 409 naming it)."""
    log.warning(
        "signup of %s got no answer to its create: its Customer may exist; its Stripe customer %s is kept",
        customer_id,
        stripe_customer_id,
    )
    return Unavailable(
        "Kubernetes API unavailable",
        f"the Kubernetes API did not answer the create of customer {customer_id}; it may have been made: "
        f"GET /api/customers/{customer_id} before signing up again",
        {
            "dependency": "Kubernetes API",
            "customer_id": customer_id,
            "stripe_customer_id": stripe_customer_id,
        },
        headers={"Retry-After": "5"},
    )


async def _delete_stripe_customer(billing: StripeApi, stripe_customer_id: str, customer_id: str) -> None:
    """Undo the Stripe customer of a signup that made no Customer (each retry would leave one more)."""
    try:
        await billing.delete_customer(stripe_customer_id)
    except Exception as error:  # the signup's own error is the answer; this one is for the operator
        log.error(
            "signup of %s failed and its Stripe customer %s was not deleted (%s); delete it in Stripe",
            customer_id,
            stripe_customer_id,
            error,
        )
    else:
        log.info("signup of %s failed: its Stripe customer %s was deleted", customer_id, stripe_customer_id)


async def _create_resource(
    kube: Kube, *, taken: set[str], make: Callable[[str], dict[str, Any]], company_name: str
) -> dict[str, Any]:
    """Create under the company's name, or with a random suffix when that name is taken."""
    candidates = [resource_name_for(company_name)]
    candidates += [resource_name_for(company_name, name_suffix()) for _ in range(_NAME_ATTEMPTS)]
    for name in candidates:
        if name in taken:
            continue
        try:
            return await kube.create_customer(make(name))
        except ApiException as error:
            if error.status != 409:
                raise
    raise Conflict("Name not available", "no free Customer name was found for this company; retry")


async def _wait_for_license(
    kube: Kube, namespace: str, customer_id: str, wait: float, interval: float
) -> str | None:
    """The licence JWT once the operator wrote its Secret, or None after `wait` seconds, or when the API
    server cannot answer: the Customer exists by then, and the answer must carry it (202, the licence
    to fetch later), not a 503 whose retry would be a 409."""
    try:
        token = await license_token(kube, namespace, customer_id)
        async with asyncio.timeout(wait):
            while token is None:
                await asyncio.sleep(interval)
                token = await license_token(kube, namespace, customer_id)
    except TimeoutError:
        return None
    except (KubernetesUnavailable, ApiException) as error:
        log.warning(
            "signup of %s: the licence could not be read (%s); answered without it", customer_id, error
        )
        return None
    return token


async def get_customer(request: web.Request) -> web.Response:
    """One customer, from its Customer resource."""
    customer_id = read_customer_id(request)
    async with request.app[SESSIONS]() as session:
        record = await request.app[DIRECTORY].existing(session, customer_id)
        stripe_customer_id = await request.app[DIRECTORY].stripe_customer_id(session, record)
    return json_model(customer_view(record, stripe_customer_id, request.app[CLOCK]()))


async def list_customers(request: web.Request) -> web.Response:
    """Customers, oldest first, a page at a time."""
    query = read_query(request, ListCustomersQuery)
    records = sorted(await request.app[DIRECTORY].all(), key=sort_key)
    page = records[(query.page - 1) * query.limit : query.page * query.limit]
    async with request.app[SESSIONS]() as session:
        rows = await session.execute(
            select(models.Customer.customer_id, models.Customer.stripe_customer_id).where(
                models.Customer.customer_id.in_([record.customer_id for record in page])
            )
        )
        stripe_ids = {customer_id: stripe_id for customer_id, stripe_id in rows}
    now = request.app[CLOCK]()
    return json_model(
        CustomerList(
            customers=[customer_view(record, stripe_ids.get(record.customer_id), now) for record in page],
            pagination=Pagination(
                page=query.page,
                limit=query.limit,
                total=len(records),
                pages=math.ceil(len(records) / query.limit),
            ),
        )
    )


async def get_queue_stats(request: web.Request) -> web.Response:
    """Customers counted by status.phase: what the earlier system's deployment queue showed, now the
    operator's work."""
    return json_model(queue_stats(await request.app[DIRECTORY].all()))


__all__ = ["create_customer", "get_customer", "get_queue_stats", "keyed_customer_id", "list_customers"]
