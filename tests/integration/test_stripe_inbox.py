"""The Stripe inbox on the real parts (PostgreSQL, the control plane): a Customer's pending events
coalesced into one server-side apply, each still recorded with its own result and notices; a Customer
PostgreSQL refuses leaves its events pending and the others recorded, and a batch lost so after its
Customer was written gives the notices it would have given; a batch's limit of Customers; the
route's wake reaching the inboxes (NOTIFY); and two replicas' inboxes (each `python -m
iotistic_billing.webhook_server --role inbox`, as a replica's server starts it) on one database, one of
them killed in the middle of a batch. Applies are counted by the API server itself (its request
counter), so an apply that changes nothing is counted too."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import kubernetes
import pytest
import stripe
from kubernetes.client.exceptions import ApiException
from sqlalchemy import func, null, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from iotistic_billing.db import migrate, models
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.db.engine import create_engine, plain_url, session_factory
from iotistic_billing.db.pool import Pool, open_pool
from iotistic_billing.db.retention import prune_batch, retention_cutoff
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.directory import CustomerRecord, Directory
from iotistic_billing.errors import DependencyUnavailable
from iotistic_billing.k8s import FieldManager, Kube, KubeApi, KubernetesUnavailable
from iotistic_billing.prices import PriceCatalog
from iotistic_billing.processes import free_port
from iotistic_billing.stripe_api import _stripe
from iotistic_billing.stripe_inbox.apply import EventApplier, InvoiceLines
from iotistic_billing.stripe_inbox.events import StripeEvent
from iotistic_billing.stripe_inbox.inbox import BATCH_LOCK, INBOX_CHANNEL, PENDING, EventInbox, store_event
from iotistic_billing.stripe_inbox.retention import expired
from tests.conftest import eventually, unique_name, waiting_on_a_row_lock, waiting_on_an_advisory_lock
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    PRICES,
    Customers,
    ServerProcess,
    customer_id_for,
    customers_fixture,
    event,
    invoice_object,
    random_id,
    server_env,
    subscription_object,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def inbox_database(postgres: EmbeddedPostgres) -> str:
    """A database of the test's own: no other test's pending events, and no other inbox on it."""
    url = postgres.create_database(f"inbox_{uuid.uuid4().hex[:12]}")
    migrate.upgrade(url)
    return url


@pytest.fixture
async def inbox_engine(inbox_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(inbox_database)
    yield engine
    await engine.dispose()


@pytest.fixture
async def inbox_pool(inbox_database: str) -> AsyncIterator[Pool]:
    """The webhook route's pool (db.pool), on the test's database."""
    pool = await open_pool(inbox_database)
    yield pool
    await pool.close()


def iso(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def overdue_key(kind: str, subscriber: Subscriber, since: int) -> str:
    """A payment notice's key: the subscription and when it became past_due (its pastDueSince)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(since))
    return f"payment-{kind}:{subscriber.customer_id}:{subscriber.subscription}:{stamp}"


def customer_applies(client: kubernetes.client.ApiClient) -> int:
    """Server-side applies of Customers the API server has answered, from its own request counter: a
    no-op apply changes nothing in the object, but it is counted here."""
    return customer_requests(client, "APPLY")


def customer_requests(client: kubernetes.client.ApiClient, verb: str) -> int:
    """Requests of `verb` on Customers the API server has answered (its request counter)."""
    response = client.call_api("GET", f"{client.configuration.host}/metrics")
    response.read()
    total = 0
    for line in response.data.decode().splitlines():
        if (
            line.startswith("apiserver_request_total{")
            and f'verb="{verb}"' in line
            and 'resource="customers"' in line
            and 'subresource=""' in line
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


class Subscriber:
    """One Customer in stripe billing and its Stripe subscription, with events in Stripe's shapes."""

    def __init__(self, customers: Customers, prefix: str) -> None:
        self.name = unique_name(prefix)
        self.customer_id = customer_id_for(self.name)
        self.subscription = random_id("sub_")
        self.stripe_customer = random_id("cus_")
        customers.create(self.name, customerId=self.customer_id, billing={"mode": "stripe"})

    def updated(self, created: int, *, status: str = "active", plan: str = "starter") -> dict[str, Any]:
        return event(
            "customer.subscription.updated",
            subscription_object(
                self.subscription,
                customer=self.stripe_customer,
                price=PRICES[plan],
                status=status,
                period_end=created + 30 * 86400,
                metadata={"customerId": self.customer_id},
            ),
            created=created,
        )

    def deleted(self, created: int, *, plan: str = "starter") -> dict[str, Any]:
        return event(
            "customer.subscription.deleted",
            subscription_object(
                self.subscription,
                customer=self.stripe_customer,
                price=PRICES[plan],
                status="canceled",
                metadata={"customerId": self.customer_id},
            ),
            created=created,
        )

    def invoice(self, created: int, *, paid: bool, plan: str = "starter") -> dict[str, Any]:
        return event(
            "invoice.payment_succeeded" if paid else "invoice.payment_failed",
            invoice_object(
                customer=self.stripe_customer,
                subscription_id=self.subscription,
                price=PRICES[plan],
                paid=paid,
                customer_id=self.customer_id,
                period_end=created + 30 * 86400,
            ),
            created=created,
        )


def first_lines_alone(body: dict[str, Any], prorations: int = 10) -> list[dict[str, Any]]:
    """An invoice event made to carry its first lines alone (`has_more`), as Stripe sends an invoice of
    more than 10: `prorations` proration lines first (an upgrade's), its plan line past them. Every
    line of it, as GET /v1/invoices/{id}/lines lists them."""
    lines = body["data"]["object"]["lines"]
    [plan] = lines["data"]
    details = plan["parent"]["subscription_item_details"]
    proration = {
        **plan,
        "parent": {**plan["parent"], "subscription_item_details": {**details, "proration": True}},
    }
    every = [{**proration, "id": f"{plan['id']}_{n}"} for n in range(prorations)] + [plan]
    lines.update(data=every[:10], has_more=True)
    return every


async def store(pool: Pool, inbox: EventInbox, bodies: list[dict[str, Any]]) -> None:
    """Each event as the webhook route stores it (its own statement), then the route's wake."""
    for body in bodies:
        assert await store_event(pool, StripeEvent.model_validate(body), json.dumps(body).encode())
        inbox.wake()


async def store_at_once(engine: AsyncEngine, bodies: list[dict[str, Any]]) -> None:
    """All in one transaction, so that one claim sees them all (a burst of deliveries)."""
    async with engine.begin() as connection:
        for body in bodies:
            await connection.execute(
                insert(models.StripeEvent).values(
                    event_id=body["id"],
                    type=body["type"],
                    created=body["created"],
                    result=PENDING,
                    payload=body,
                )
            )
        await connection.execute(select(func.pg_notify(INBOX_CHANNEL, "test")))


async def results(engine: AsyncEngine, bodies: list[dict[str, Any]]) -> dict[str, str]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(models.StripeEvent.event_id, models.StripeEvent.result).where(
                models.StripeEvent.event_id.in_([body["id"] for body in bodies])
            )
        )
        return {row.event_id: row.result for row in rows}


async def all_recorded(engine: AsyncEngine, bodies: list[dict[str, Any]]) -> dict[str, str] | None:
    found = await results(engine, bodies)
    done = len(found) == len(bodies) and PENDING not in found.values()
    return found if done else None


async def notice_keys(engine: AsyncEngine, customer_ids: list[str]) -> Counter[str]:
    async with engine.connect() as connection:
        keys = await connection.scalars(
            select(models.Notice.key).where(models.Notice.customer_id.in_(customer_ids))
        )
        return Counter(keys)


async def subscription_row(engine: AsyncEngine, subscription_id: str) -> Any:
    """The `subscriptions` row of a Stripe subscription."""
    async with engine.connect() as connection:
        return (
            await connection.execute(
                select(models.Subscription).where(
                    models.Subscription.stripe_subscription_id == subscription_id
                )
            )
        ).one()


@asynccontextmanager
async def inbox_in_process(
    engine: AsyncEngine,
    kubeconfig: Path,
    database_url: str = "",
    clock: Callable[[], float] = time.monotonic,
    workers: int = 0,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    restore_interval: float = 60.0,
    livemode: bool | None = None,
    invoice_lines: InvoiceLines | None = None,
) -> AsyncIterator[EventInbox]:
    """An inbox with no loop of its own, as in the webhook server's process: the test calls
    `apply_pending`; with `database_url`, its `wake` NOTIFYs the inboxes of other processes. With
    `workers`, it runs its loops too (looking for Customers to restore every `restore_interval`),
    LISTENing when it has `database_url`, as the inbox process does. `invoice_lines`: Stripe's listing
    of an invoice's lines (None: no STRIPE_SECRET_KEY)."""
    client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    kube = Kube(KubeApi(client, FieldManager.SIGNUP), 8)
    catalog = PriceCatalog(PRICES)  # type: ignore[arg-type]
    applier = EventApplier(
        kube=kube,
        directory=Directory(kube),
        catalog=catalog,
        livemode=livemode,
        invoice_lines=invoice_lines,
    )
    inbox = EventInbox(
        sessions=session_factory(engine),
        applier=applier,
        count=lambda event_type, result: None,
        workers=workers,
        database_url=database_url,
        clock=clock,
        now=now,
        restore_interval=restore_interval,
    )
    await inbox.start()
    try:
        yield inbox
    finally:
        await inbox.stop()
        client.close()


async def refuse_records_of(engine: AsyncEngine, customer_id: str) -> None:
    """PostgreSQL refuses the customer's mirror row (a trigger of this test's database) until
    `accept_records`: a batch of that customer's events fails after its Customer was written."""
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "CREATE FUNCTION refuse_customer() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.customer_id = '{customer_id}' THEN RAISE EXCEPTION 'refused by the test'; "
                "END IF; RETURN NEW; END $$"
            )
        )
        await connection.execute(
            text(
                "CREATE TRIGGER refuse_customer BEFORE INSERT OR UPDATE ON customers "
                "FOR EACH ROW EXECUTE FUNCTION refuse_customer()"
            )
        )


async def accept_records(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(text("DROP TRIGGER refuse_customer ON customers"))
        await connection.execute(text("DROP FUNCTION refuse_customer()"))


async def test_a_customer_s_pending_events_are_one_apply_and_each_is_recorded(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    one, two = Subscriber(customers, "coalesce"), Subscriber(customers, "coalesce")
    base = int(time.time())
    events_one = [
        one.updated(base + 1),
        one.invoice(base + 2, paid=False),
        one.updated(base + 3, status="past_due", plan="professional"),
        one.invoice(base + 4, paid=True, plan="professional"),
    ]
    events_two = [two.updated(base + 1), two.updated(base + 2, plan="enterprise")]
    generations = {s.name: (customers.get(s.name) or {})["metadata"]["generation"] for s in (one, two)}
    applies = customer_applies(k8s_client)

    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        # Stored newest first: the inbox applies in Stripe's order (`created`), not the order of arrival.
        await store(inbox_pool, inbox, [*reversed(events_one), *reversed(events_two)])
        assert await inbox.apply_pending() == 6
        # A claim found events: the process's notice sender waits from then until a claim finds none.
        sender_turn = asyncio.create_task(inbox.precedence.wait_turn())
        await asyncio.sleep(0)
        assert not sender_turn.done()
        assert await inbox.apply_pending() == 0
        await asyncio.wait_for(sender_turn, 5)

        # One server-side apply of each Customer for all of its events (each says something new).
        assert customer_applies(k8s_client) == applies + 2
        for subscriber in (one, two):
            body = customers.get(subscriber.name) or {}
            assert body["metadata"]["generation"] == generations[subscriber.name] + 1
        assert customers.subscription(one.name) == {
            "status": "active",
            "plan": "professional",
            "stripeSubscriptionId": one.subscription,
            "currentPeriodStart": iso(base + 4),
            "currentPeriodEnd": iso(base + 4 + 30 * 86400),
            "cancelAtPeriodEnd": False,
            "lastEventCreated": base + 4,
        }
        assert (customers.subscription(two.name) or {})["plan"] == "enterprise"
        # Each event is still recorded on its own, with its own notices: the failure and the recovery.
        assert await results(inbox_engine, events_one + events_two) == {
            body["id"]: "applied" for body in events_one + events_two
        }
        assert await notice_keys(inbox_engine, [one.customer_id]) == {
            overdue_key("failed", one, base + 2): 1,
            overdue_key("recovered", one, base + 2): 1,
        }
        row = await subscription_row(inbox_engine, one.subscription)
        assert (row.status, row.plan, row.last_event_created) == ("active", "professional", base + 4)

        # An event older than what was applied is recorded as stale and writes nothing.
        late = one.updated(base, status="past_due")
        await store(inbox_pool, inbox, [late])
        assert await inbox.apply_pending() == 1
        assert await results(inbox_engine, [late]) == {late["id"]: "stale"}
        assert customer_applies(k8s_client) == applies + 2


async def test_a_deletion_stripe_retried_after_the_final_invoice_ends_the_subscription_for_good(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """The deletion did not get through (PostgreSQL away) and Stripe retried it after the final usage
    invoice, paid an hour later, was applied: the subscription ends all the same, in the Customer and in
    its row (where a checkout looks for a live subscription), and an invoice of it paid later is stale."""
    subscriber = Subscriber(customers, "ended")
    base = int(time.time()) - 7200
    final_invoice, deletion = subscriber.invoice(base + 3600, paid=True), subscriber.deleted(base + 1)
    later_invoice = subscriber.invoice(base + 3700, paid=True)
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        for body in (subscriber.updated(base), final_invoice, deletion, later_invoice):
            await store(inbox_pool, inbox, [body])  # each its own batch, in this order of arrival
            assert await inbox.apply_pending() == 1
    assert await results(inbox_engine, [final_invoice, deletion, later_invoice]) == {
        final_invoice["id"]: "applied",
        deletion["id"]: "applied",
        later_invoice["id"]: "stale",
    }
    assert (customers.subscription(subscriber.name) or {})["status"] == "canceled"
    async with inbox_engine.connect() as connection:
        status = await connection.scalar(
            select(models.Subscription.status).where(
                models.Subscription.stripe_subscription_id == subscriber.subscription
            )
        )
    assert status == "canceled"
    assert await notice_keys(inbox_engine, [subscriber.customer_id]) == {
        f"subscription-canceled:{subscriber.customer_id}:{subscriber.subscription}": 1
    }


async def test_an_event_of_the_other_stripe_mode_than_the_key_s_is_recorded_ignored(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: livemode was never read, so a test-mode event reaching a live deployment (a
    staging cluster sharing customer ids) was applied to the Customer. It is recorded `ignored`, the
    Customer left as it is; an event of the key's mode applies."""
    subscriber = Subscriber(customers, "livemode")
    base = int(time.time()) - 60
    test_mode = subscriber.updated(base)  # livemode false, as Stripe's test mode sends it
    live = {**subscriber.updated(base + 1), "livemode": True}
    async with inbox_in_process(inbox_engine, kubeconfig, livemode=True) as inbox:
        await store(inbox_pool, inbox, [test_mode])
        assert await inbox.apply_pending() == 1
        assert await results(inbox_engine, [test_mode]) == {test_mode["id"]: "ignored"}
        assert customers.subscription(subscriber.name) is None
        await store(inbox_pool, inbox, [live])
        assert await inbox.apply_pending() == 1
    assert await results(inbox_engine, [live]) == {live["id"]: "applied"}
    assert (customers.subscription(subscriber.name) or {})["status"] == "active"


async def test_a_late_plan_change_applies_and_an_older_live_subscription_takes_over_from_an_ended_one(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Each event its own batch, as Stripe may deliver them: an upgrade's subscription event delivered
    after the next second's invoice still changes the plan (the invoice's newer state stands). Then a
    second checkout's newer subscription takes over, and when it is canceled the first one, still
    billed, is the Customer's again, with no "subscription ended" notice."""
    subscriber = Subscriber(customers, "twosubs")
    base = int(time.time()) - 7200
    upgrade = subscriber.updated(base + 10, plan="professional")
    second = random_id("sub_")

    def second_subscription(kind: str, created: int, status: str) -> dict[str, Any]:
        body = subscription_object(
            second,
            customer=subscriber.stripe_customer,
            price=PRICES["enterprise"],
            status=status,
            metadata={"customerId": subscriber.customer_id},
        )
        return event(kind, {**body, "created": int(time.time())}, created=created)

    started = second_subscription("customer.subscription.created", base + 20, "active")
    ended = second_subscription("customer.subscription.deleted", base + 30, "canceled")
    bodies = [subscriber.updated(base), subscriber.invoice(base + 11, paid=True), upgrade, started, ended]
    held = []
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        for body in bodies:
            await store(inbox_pool, inbox, [body])  # each its own batch, in this order of arrival
            assert await inbox.apply_pending() == 1
            held.append(customers.subscription(subscriber.name) or {})
    assert await results(inbox_engine, bodies) == {
        **{body["id"]: "applied" for body in bodies[:4]},
        ended["id"]: "superseded",
    }
    assert [(one["stripeSubscriptionId"], one["plan"], one["status"]) for one in held[2:]] == [
        (subscriber.subscription, "professional", "active"),
        (second, "enterprise", "active"),
        (subscriber.subscription, "professional", "active"),
    ]
    assert held[2]["lastEventCreated"] == base + 11 == held[4]["lastEventCreated"]
    async with inbox_engine.connect() as connection:
        rows = {
            row.stripe_subscription_id: (row.status, row.plan, row.own_event_created)
            for row in await connection.execute(
                select(models.Subscription).where(models.Subscription.customer_id == subscriber.customer_id)
            )
        }
    assert rows == {
        subscriber.subscription: ("active", "professional", base + 10),
        second: ("canceled", "enterprise", base + 30),
    }
    assert await notice_keys(inbox_engine, [subscriber.customer_id]) == {}


async def test_a_live_subscription_whose_events_come_after_the_held_one_ended_takes_the_customer(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: sales made a second subscription (enterprise) and then canceled the first; the
    second's events, delayed (a 503 Stripe retried an hour later), came after the first's deletion and
    were each recorded superseded, older than it: the Customer stayed canceled, unlicensed, while Stripe
    billed enterprise. They now apply, each its own batch, as Stripe delivered them."""
    subscriber = Subscriber(customers, "lateheir")
    base = int(time.time()) - 7200
    second = random_id("sub_")
    body = subscription_object(
        second,
        customer=subscriber.stripe_customer,
        price=PRICES["enterprise"],
        status="active",
        metadata={"customerId": subscriber.customer_id},
    )
    started = event("customer.subscription.created", {**body, "created": base + 20}, created=base + 20)
    paid = event(
        "invoice.payment_succeeded",
        invoice_object(
            customer=subscriber.stripe_customer,
            subscription_id=second,
            price=PRICES["enterprise"],
            paid=True,
            customer_id=subscriber.customer_id,
            billing_reason="subscription_create",
        ),
        created=base + 21,
    )
    ended = subscriber.deleted(base + 30)
    bodies = [subscriber.updated(base), ended, started, paid]
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        for each in bodies:
            await store(inbox_pool, inbox, [each])  # each its own batch, in this order of arrival
            assert await inbox.apply_pending() == 1
    assert await results(inbox_engine, bodies) == {each["id"]: "applied" for each in bodies}
    held = customers.subscription(subscriber.name) or {}
    assert (held["stripeSubscriptionId"], held["plan"], held["status"], held["lastEventCreated"]) == (
        second,
        "enterprise",
        "active",
        base + 21,
    )
    assert (await subscription_row(inbox_engine, subscriber.subscription)).status == "canceled"
    assert await notice_keys(inbox_engine, [subscriber.customer_id]) == {
        f"subscription-canceled:{subscriber.customer_id}:{subscriber.subscription}": 1
    }


async def test_a_customer_whose_records_are_refused_stays_pending_and_the_others_are_recorded(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """PostgreSQL refuses one Customer's mirror row (a trigger of this test's database): that Customer's
    events stay pending with the error, the other's are recorded. A newer event of that Customer waits
    with them through their backoff (applied alone, it would leave them stale and the payment failure
    unnoticed), and the other Customer's events go on. The refused Customer was written already; the
    retry finds it ahead of its row, decides its events as the first time and records them, with no
    second apply."""
    good, refused = Subscriber(customers, "records"), Subscriber(customers, "records")
    base = int(time.time())
    bodies = [good.updated(base), refused.updated(base), refused.invoice(base + 1, paid=False)]
    await refuse_records_of(inbox_engine, refused.customer_id)
    frozen = time.monotonic()  # the backoff of the failed events never ends for this inbox
    async with inbox_in_process(inbox_engine, kubeconfig, clock=lambda: frozen) as inbox:
        await store(inbox_pool, inbox, bodies)
        applies = customer_applies(k8s_client)
        assert await inbox.apply_pending() == 3
        assert customer_applies(k8s_client) == applies + 2  # both Customers were written
        assert await results(inbox_engine, bodies) == {
            bodies[0]["id"]: "applied",
            bodies[1]["id"]: PENDING,
            bodies[2]["id"]: PENDING,
        }
        await accept_records(inbox_engine)
        newer = refused.updated(base + 2, status="past_due")
        other = good.updated(base + 3, plan="professional")
        await store(inbox_pool, inbox, [newer, other])
        # The failed events are left out of the claim, so that a batch of two still reaches the other
        # Customer's event; the newer event of the refused Customer waits.
        inbox.batch = 2
        assert await inbox.apply_pending() == 1
        assert await results(inbox_engine, [newer, other]) == {newer["id"]: PENDING, other["id"]: "applied"}
    bodies.append(newer)
    applies += 1  # the other Customer's plan
    async with inbox_engine.connect() as connection:
        attempts = await connection.execute(
            select(models.StripeEvent.attempts, models.StripeEvent.last_error).where(
                models.StripeEvent.event_id == bodies[1]["id"]
            )
        )
        assert [(row.attempts, "refused by the test" in (row.last_error or "")) for row in attempts] == [
            (1, True)
        ]
    assert (customers.subscription(refused.name) or {})["status"] == "past_due"

    async with inbox_in_process(inbox_engine, kubeconfig) as restarted:  # a new process retries at once
        assert await restarted.apply_pending() == 3
    assert await results(inbox_engine, bodies) == {body["id"]: "applied" for body in bodies}
    assert customer_applies(k8s_client) == applies + 3  # the newer event's status
    assert await notice_keys(inbox_engine, [refused.customer_id]) == {
        overdue_key("failed", refused, base + 1): 1
    }


@pytest.mark.parametrize("meanwhile", ["deleted", "made-again", "made-again-first", "still-there"])
async def test_a_customer_deleted_between_its_read_and_its_apply_leaves_its_events_unmatched(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    monkeypatch: pytest.MonkeyPatch,
    meanwhile: str,
) -> None:
    """Found in review: a server-side apply of a missing Customer tries to create it, which the API
    server refuses 422 (the CRD requires spec.email and companyName), never 404: the events were
    recorded as a failed attempt ("Unprocessable Entity", listed as failing in the console) until a
    later batch found them unmatched. Deleted after the batch read it, the Customer's events are
    unmatched at once. Made again under its name (a new uid: `kubectl replace --force`, GitOps), before
    or after the apply, nothing is written to it by this batch (the apply names the uid read: it wrote the
    deleted one's subscription onto one made before it), and the events stay pending for the next batch,
    which applies them to it (the same customer id). One still there keeps the refusal, pending."""
    subscriber = Subscriber(customers, "gone")
    body = subscriber.updated(int(time.time()))
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        kube = inbox.applier.kube
        subscription = {
            "status": "active",
            "plan": "starter",
            "stripeSubscriptionId": subscriber.subscription,
        }
        with pytest.raises(ApiException) as refused:  # what the apply of a missing Customer is answered
            await kube.apply_customer_spec(unique_name("missing"), {"subscription": subscription})
        assert refused.value.status == 422
        apply = kube.apply_customer_spec

        async def apply_after_a_deletion(
            name: str, spec: dict[str, Any], manager: Any = None, **uid: Any
        ) -> Any:
            if meanwhile == "still-there":
                raise ApiException(status=422, reason="Unprocessable Entity")
            customers.delete(name)
            if meanwhile == "made-again-first":
                customers.create(name, customerId=subscriber.customer_id, billing={"mode": "stripe"})
            try:
                return await apply(name, spec, manager, **uid)
            finally:
                if meanwhile == "made-again":
                    customers.create(name, customerId=subscriber.customer_id, billing={"mode": "stripe"})

        monkeypatch.setattr(kube, "apply_customer_spec", apply_after_a_deletion)
        await store(inbox_pool, inbox, [body])
        assert await inbox.apply_pending() == 1
    async with inbox_engine.connect() as connection:
        row = (
            await connection.execute(
                select(
                    models.StripeEvent.result, models.StripeEvent.attempts, models.StripeEvent.last_error
                ).where(models.StripeEvent.event_id == body["id"])
            )
        ).one()
    if meanwhile == "still-there":
        assert (row.result, row.attempts, "Unprocessable Entity" in row.last_error) == (PENDING, 1, True)
        return
    if meanwhile == "deleted":
        assert (row.result, row.attempts, row.last_error) == ("unmatched", 0, None)
        assert customers.get(subscriber.name) is None
        return
    assert (row.result, row.attempts, "was made again under its name" in row.last_error) == (PENDING, 1, True)
    assert customers.subscription(subscriber.name) is None
    async with inbox_in_process(inbox_engine, kubeconfig) as restarted:  # a new process retries at once
        assert await restarted.apply_pending() == 1
    assert await results(inbox_engine, [body]) == {body["id"]: "applied"}
    assert (customers.subscription(subscriber.name) or {}).get(
        "stripeSubscriptionId"
    ) == subscriber.subscription


async def attempts_of(engine: AsyncEngine, body: dict[str, Any]) -> tuple[str, int]:
    """An event's result and its failed attempts."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                select(models.StripeEvent.result, models.StripeEvent.attempts).where(
                    models.StripeEvent.event_id == body["id"]
                )
            )
        ).one()
    return row.result, row.attempts


async def test_a_replayed_failing_event_is_tried_at_once_and_a_delivery_s_wake_leaves_its_backoff(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    inbox_database: str,
    kubeconfig: Path,
    customers: Customers,
) -> None:
    """Found in review: the console's replay (pending again, a NOTIFY naming the event) woke the inbox,
    which left the event out of its claims for the rest of its backoff (up to a minute, the console
    saying it was replayed). The NOTIFY of a replay forgets the event's backoff and its Customer's;
    a delivery's (no event named) forgets none, or a failing Customer would be retried on each."""
    subscriber = Subscriber(customers, "replayed")
    older, body = subscriber.updated(int(time.time()) - 1), subscriber.invoice(int(time.time()), paid=False)
    await refuse_records_of(inbox_engine, subscriber.customer_id)
    frozen = time.monotonic()  # the backoff of the failed events never ends for this inbox
    async with inbox_in_process(
        inbox_engine, kubeconfig, inbox_database, clock=lambda: frozen, workers=1
    ) as inbox:
        # In one claim: stored one by one, a batch of the first alone held its Customer (and so the
        # second) back for good on the frozen clock.
        await store_at_once(inbox_engine, [older, body])

        async def failed() -> bool:
            return [await attempts_of(inbox_engine, one) for one in (older, body)] == [(PENDING, 1)] * 2

        await eventually(failed, within=10, message="the events' failed attempt")
        await accept_records(inbox_engine)
        inbox.wake()  # a delivery's: this loop, and a NOTIFY with no event named
        await asyncio.sleep(3 * inbox.poll)
        assert await failed()

        # The console's replay of the newer event (console/pages.py `replay_event`): the Customer's
        # older failed event is tried with it, as it must come first.
        async with inbox_engine.begin() as connection:
            await connection.execute(
                update(models.StripeEvent)
                .where(models.StripeEvent.event_id == body["id"])
                .values(result=PENDING, attempts=0, last_error=None, applied_at=None)
            )
            await connection.execute(select(func.pg_notify(INBOX_CHANNEL, body["id"])))
        found = await eventually(
            lambda: all_recorded(inbox_engine, [older, body]), within=5, message="the replayed event applied"
        )
    assert found == {older["id"]: "applied", body["id"]: "applied"}
    assert (customers.subscription(subscriber.name) or {})["status"] == "past_due"


async def test_a_pending_row_without_a_payload_is_its_own_failure_and_the_batch_goes_on(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: a row without a payload (recorded unmatched before migration 0002, then replayed
    from the console) had no size, and the claim's sum of sizes failed every batch of every replica."""
    subscriber = Subscriber(customers, "nopayload")
    body = subscriber.updated(int(time.time()))
    empty = random_id("evt_", 24)
    async with inbox_engine.begin() as connection:
        await connection.execute(
            insert(models.StripeEvent).values(
                event_id=empty,
                type="customer.subscription.updated",
                created=1,
                result=PENDING,
                payload=null(),
            )
        )
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await store(inbox_pool, inbox, [body])
        assert await inbox.apply_pending() == 2
    assert (await results(inbox_engine, [body]))[body["id"]] == "applied"
    assert await attempts_of(inbox_engine, {"id": empty}) == (PENDING, 1)


class LookupsOf(Directory):
    """A directory whose lookups of a Stripe customer fail while `failing` (the API server, or the
    lookup's session, away for that one lookup of the batch)."""

    def __init__(self, kube: Kube, stripe_customer: str) -> None:
        super().__init__(kube)
        self.stripe_customer = stripe_customer
        self.failing = True

    def for_batch(self) -> Directory:
        return self

    async def by_stripe_customer(
        self, session: AsyncSession, stripe_customer_id: str
    ) -> CustomerRecord | None:
        if self.failing and stripe_customer_id == self.stripe_customer:
            raise KubernetesUnavailable("the test's lookup")
        return await super().by_stripe_customer(session, stripe_customer_id)


async def test_an_event_whose_lookup_failed_holds_back_the_newer_events_naming_its_ids(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: an invoice event naming only Stripe's ids, whose lookup failed, was left for its
    retry while a newer event of the same subscription, found through our customer id, was applied; the
    invoice then came back stale, its payment failure (and its notice) lost. The newer events naming one
    of its ids, and so their Customer's, now wait with it, in its batch and in the next ones."""
    subscriber = Subscriber(customers, "lookup")
    base = int(time.time())
    now = [time.monotonic()]
    failed = event(
        "invoice.payment_failed",
        invoice_object(
            customer=subscriber.stripe_customer,
            subscription_id=subscriber.subscription,
            price=PRICES["starter"],
            paid=False,
            period_end=base + 30 * 86400,
        ),
        created=base + 1,
    )
    newer = subscriber.updated(base + 2, status="past_due")
    async with inbox_in_process(inbox_engine, kubeconfig, clock=lambda: now[0]) as inbox:
        await store(inbox_pool, inbox, [subscriber.updated(base)])
        assert await inbox.apply_pending() == 1  # the mirror knows the Customer and its Stripe ids now
        lookups = LookupsOf(inbox.applier.directory.kube, subscriber.stripe_customer)
        inbox.applier = replace(inbox.applier, directory=lookups)
        await store_at_once(inbox_engine, [failed, newer])
        assert await inbox.apply_pending() == 1  # the invoice's failure; the newer event waits with it
        assert await results(inbox_engine, [failed, newer]) == {failed["id"]: PENDING, newer["id"]: PENDING}
        assert await inbox.apply_pending() == 0  # in its backoff, it still holds the newer event back
        assert (customers.subscription(subscriber.name) or {})["lastEventCreated"] == base
        lookups.failing = False
        now[0] += 60
        assert await inbox.apply_pending() == 2
    assert await results(inbox_engine, [failed, newer]) == {failed["id"]: "applied", newer["id"]: "applied"}
    assert (customers.subscription(subscriber.name) or {})["status"] == "past_due"
    keys = await notice_keys(inbox_engine, [subscriber.customer_id])
    assert any(key.startswith(f"payment-failed:{subscriber.customer_id}:") for key in keys), keys


async def test_an_event_a_replay_holds_locked_is_waited_for_not_skipped(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: the claim skipped the rows another transaction held (the console's Replay locks
    its event while it writes), so a Customer's newer event was applied before the older one, which then
    came back stale: what it alone said (here, the plan it moved to) was lost."""
    subscriber = Subscriber(customers, "waited")
    base = int(time.time())
    older, newer = subscriber.updated(base + 1, plan="professional"), subscriber.invoice(base + 2, paid=True)
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await store(inbox_pool, inbox, [older, newer])
        async with inbox_engine.connect() as replay, replay.begin():
            await replay.execute(
                select(models.StripeEvent.event_id)
                .where(models.StripeEvent.event_id == older["id"])
                .with_for_update()
            )
            batch = asyncio.create_task(inbox.apply_pending())
            await eventually(
                lambda: waiting_on_a_row_lock(inbox_engine, "stripe_events"), message="the claim at the lock"
            )
        assert await asyncio.wait_for(batch, 30) == 2
    assert await results(inbox_engine, [older, newer]) == {older["id"]: "applied", newer["id"]: "applied"}


async def test_a_batch_lost_after_its_customer_was_written_notices_each_failure_s_recovery_once(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: a batch lost after its Customer was written (here a record PostgreSQL refuses)
    was decided again with the pastDueSince of the Customer, which carried the lost batch's outcome: its
    payment's recovery was keyed by the new failure that followed, and that failure's own recovery,
    later, found its key taken and was never sent. The row keeps the pastDueSince it was written with."""
    subscriber = Subscriber(customers, "lostbatch")

    async def row_since() -> int | None:
        async with inbox_engine.connect() as connection:
            since = await connection.scalar(
                select(models.Subscription.past_due_since).where(
                    models.Subscription.stripe_subscription_id == subscriber.subscription
                )
            )
        return int(since.timestamp()) if since is not None else None

    base = int(time.time())
    lost = [subscriber.invoice(base + 2, paid=True), subscriber.invoice(base + 3, paid=False)]
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await store(inbox_pool, inbox, [subscriber.updated(base), subscriber.invoice(base + 1, paid=False)])
        assert await inbox.apply_pending() == 2
        await refuse_records_of(inbox_engine, subscriber.customer_id)
        await store(inbox_pool, inbox, lost)
        assert await inbox.apply_pending() == 2
        assert set((await results(inbox_engine, lost)).values()) == {PENDING}
    # The Customer holds the lost batch's outcome: past due since its new failure.
    assert (customers.subscription(subscriber.name) or {})["pastDueSince"] == iso(base + 3)
    await accept_records(inbox_engine)

    async with inbox_in_process(inbox_engine, kubeconfig) as restarted:  # a new process retries at once
        assert await restarted.apply_pending() == 2
        assert await results(inbox_engine, lost) == {body["id"]: "applied" for body in lost}
        retried = await row_since()
        paid = subscriber.invoice(base + 4, paid=True)
        await store(inbox_pool, restarted, [paid])
        assert await restarted.apply_pending() == 1
    assert await notice_keys(inbox_engine, [subscriber.customer_id]) == {
        overdue_key("failed", subscriber, base + 1): 1,
        overdue_key("recovered", subscriber, base + 1): 1,
        overdue_key("failed", subscriber, base + 3): 1,
        overdue_key("recovered", subscriber, base + 3): 1,
    }
    assert (retried, await row_since()) == (base + 3, None)  # overdue since the new failure, then paid


async def test_a_payment_failure_and_its_recovery_notice_once_whichever_of_stripe_s_events_comes_first(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Stripe sends an invoice's event and the subscription's about one change in no set order, a second
    or so apart. When the subscription's later-created event is applied first, the invoice's is stale:
    the notice comes from the subscription's status moving, whichever event moves it."""
    late, timely = Subscriber(customers, "order"), Subscriber(customers, "order")
    base = int(time.time())

    def arrivals(s: Subscriber) -> list[dict[str, Any]]:
        failed = [s.invoice(base + 1, paid=False), s.updated(base + 2, status="past_due")]
        paid = [s.invoice(base + 3, paid=True), s.updated(base + 4)]
        return [*reversed(failed), *reversed(paid)] if s is late else [*failed, *paid]

    late_events, timely_events = arrivals(late), arrivals(timely)
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await store(inbox_pool, inbox, [late.updated(base), timely.updated(base)])
        assert await inbox.apply_pending() == 2
        for late_one, timely_one in zip(late_events, timely_events, strict=True):
            await store(inbox_pool, inbox, [late_one, timely_one])  # each its own batch
            assert await inbox.apply_pending() == 2
    assert [(await results(inbox_engine, [body]))[body["id"]] for body in late_events] == [
        "applied",
        "stale",  # invoice.payment_failed, older than the past_due applied
        "applied",
        "stale",  # invoice.payment_succeeded, older than the active applied
    ]
    assert set((await results(inbox_engine, timely_events)).values()) == {"applied"}
    assert await notice_keys(inbox_engine, [late.customer_id, timely.customer_id]) == {
        overdue_key("failed", late, base + 2): 1,
        overdue_key("recovered", late, base + 2): 1,
        overdue_key("failed", timely, base + 1): 1,
        overdue_key("recovered", timely, base + 1): 1,
    }


async def test_a_batch_applies_all_events_of_its_first_customers_and_leaves_the_others_pending(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """A batch's cost grows with its Customers: past its limit, the events of the Customers it has no
    room for stay pending, and the next batch applies them; a Customer it applies has all of its claimed
    events applied, the later ones too."""
    first, second, third = (Subscriber(customers, "prefix") for _ in range(3))
    base = int(time.time())
    bodies = [
        first.updated(base),
        second.updated(base + 1),
        third.updated(base + 2),
        first.updated(base + 3),
        third.updated(base + 4),
    ]
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        inbox.batch_customers = 2
        await store(inbox_pool, inbox, bodies)
        assert await inbox.apply_pending() == 3
        assert await results(inbox_engine, bodies) == {
            bodies[0]["id"]: "applied",
            bodies[1]["id"]: "applied",
            bodies[2]["id"]: PENDING,
            bodies[3]["id"]: "applied",
            bodies[4]["id"]: PENDING,
        }
        assert (customers.subscription(first.name) or {})["lastEventCreated"] == base + 3
        assert customers.subscription(third.name) is None
        assert await inbox.apply_pending() == 2
        assert set((await results(inbox_engine, bodies)).values()) == {"applied"}
        assert (customers.subscription(third.name) or {})["lastEventCreated"] == base + 4


async def test_a_batch_claims_events_up_to_its_size_and_the_next_batch_the_rest(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """A batch holds its payloads in memory: it claims events in Stripe's order until their JSON reaches
    its size, and the next batch the others. A row stored before migration 0016 has no size stored and is
    measured; the route stores each event's size as received."""
    first, second = (Subscriber(customers, "bytes") for _ in range(2))
    base = int(time.time())
    bodies = [
        first.updated(base),
        second.updated(base + 1),
        first.updated(base + 2),
        second.updated(base + 3),
    ]
    sizes = [len(json.dumps(body).encode()) for body in bodies]
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        inbox.batch_bytes = sizes[0] + sizes[1] + sizes[2] // 2
        await store_at_once(inbox_engine, bodies[:3])  # no payload_bytes, as before migration 0016
        await store(inbox_pool, inbox, bodies[3:])
        async with inbox_engine.connect() as connection:
            stored = await connection.scalar(
                select(models.StripeEvent.payload_bytes).where(models.StripeEvent.event_id == bodies[3]["id"])
            )
        assert stored == sizes[3]
        assert await inbox.apply_pending() == 2
        assert await results(inbox_engine, bodies) == {
            bodies[0]["id"]: "applied",
            bodies[1]["id"]: "applied",
            bodies[2]["id"]: PENDING,
            bodies[3]["id"]: PENDING,
        }
        inbox.batch_bytes = 1  # below any event: a batch still takes its first one
        assert await inbox.apply_pending() == 1
        assert (customers.subscription(first.name) or {})["lastEventCreated"] == base + 2
        assert await inbox.apply_pending() == 1
        assert (customers.subscription(second.name) or {})["lastEventCreated"] == base + 3


async def test_a_batch_of_customers_the_mirror_does_not_know_lists_the_fleet_once(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Customers made by GitOps are in no mirror row until their first event: a lookup then lists the
    fleet. A batch lists it once for all of them, not once per Customer (the database is the test's
    own, so its mirror is empty)."""
    subscribers = [Subscriber(customers, "unmirrored") for _ in range(5)]
    base = int(time.time())
    bodies = [s.updated(base) for s in subscribers]
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await store(inbox_pool, inbox, bodies)
        lists = customer_requests(k8s_client, "LIST")
        assert await inbox.apply_pending() == 5
        assert customer_requests(k8s_client, "LIST") == lists + 1
    assert set((await results(inbox_engine, bodies)).values()) == {"applied"}


async def test_the_route_s_wake_reaches_every_listening_inbox(
    inbox_engine: AsyncEngine, inbox_database: str, kubeconfig: Path
) -> None:
    """The webhook server's process stores events without a NOTIFY in their transactions; its wake
    sends one for a burst, which the inboxes of every replica LISTEN for (two listeners here)."""
    received: tuple[list[str], list[str]] = ([], [])
    listeners = [await asyncpg.connect(plain_url(inbox_database)) for _ in received]
    try:
        for listener, heard in zip(listeners, received, strict=True):
            await listener.add_listener(INBOX_CHANNEL, lambda *args, heard=heard: heard.append(args[3]))
        async with inbox_in_process(inbox_engine, kubeconfig, inbox_database) as route:
            for _ in range(50):  # one burst: the loop does not yield, so the notifier sees it once
                route.wake()

            async def notified() -> bool:
                return all(received)

            await eventually(notified, within=10, message="a NOTIFY on the inbox channel at each listener")
            await asyncio.sleep(0.5)  # room for a second NOTIFY the burst must not have sent
        assert [len(heard) for heard in received] == [1, 1]
    finally:
        for listener in listeners:
            await listener.close()


# ----- two replicas -----


def inbox_process(env: dict[str, str], log: Path) -> ServerProcess:
    """One replica's inbox, the process its webhook server starts (`--role inbox`), logging JSON to a
    file: each event it records is a line with its `event_id` and `result`, written after the commit."""
    return ServerProcess({**env, "PORT": str(free_port()), "LOG_FORMAT": "json"}, log, role="inbox").start()


def recorded_by(process: ServerProcess) -> list[str]:
    """The event ids the process recorded a result for, one per commit of a result."""
    ids = []
    for line in process.log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("name") == "iotistic_billing.stripe_inbox.inbox" and "result" in entry:
            ids.append(entry["event_id"])
    return ids


@pytest.fixture
def replica_env(
    inbox_database: str, stripe_mock: StripeMock, license_keys: tuple[Path, Path], kubeconfig: Path
) -> dict[str, str]:
    return server_env(inbox_database, stripe_mock, license_keys, kubeconfig, free_port())


@pytest.fixture
async def route(
    inbox_engine: AsyncEngine, kubeconfig: Path, inbox_database: str
) -> AsyncIterator[EventInbox]:
    """The webhook server's side: it stores each event and wakes the replicas' inboxes (a NOTIFY)."""
    async with inbox_in_process(inbox_engine, kubeconfig, inbox_database) as inbox:
        yield inbox


@pytest.fixture
def replicas() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for process in started:
        process.stop()


async def test_two_replicas_apply_each_event_once_also_when_one_is_killed_mid_batch(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    replica_env: dict[str, str],
    replicas: list[ServerProcess],
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
    route: EventInbox,
    tmp_path: Path,
) -> None:
    """Replica A claims a batch, writes its Customers and is killed before it commits; replica B then
    applies that batch: every event recorded once (by one committed batch, in one replica's log), its
    notices once, no Customer written again by B (it holds the batch's state already), and A's restart
    and B share what comes next."""
    subscribers = [Subscriber(customers, "replicas") for _ in range(4)]
    ids = [s.customer_id for s in subscribers]
    base = int(time.time())
    a = inbox_process(replica_env, tmp_path / "a.log")
    replicas.append(a)
    first = [s.updated(base) for s in subscribers]
    await store(inbox_pool, route, first)
    await eventually(lambda: all_recorded(inbox_engine, first), within=60, message="first events")

    # A Customer in the middle (in A's name order) whose mirror row the test holds: A's batch writes
    # every Customer (its server-side applies come first), then stops at that row before its commit.
    held = sorted(subscribers, key=lambda s: s.name)[1]
    batch = [
        body
        for s in subscribers
        for body in (
            s.updated(base + 10),
            s.invoice(base + 11, paid=False),
            s.updated(base + 12, status="past_due"),
        )
    ]
    applies = customer_applies(k8s_client)
    async with inbox_engine.connect() as holder:
        await holder.begin()
        await holder.execute(
            select(models.Customer).where(models.Customer.customer_id == held.customer_id).with_for_update()
        )
        await store_at_once(inbox_engine, batch)
        await eventually(
            lambda: waiting_on_a_row_lock(inbox_engine, "customers"),
            within=60,
            message="A stopped at the held row",
        )
        # A has claimed the batch and written every Customer, and committed nothing.
        assert set((await results(inbox_engine, batch)).values()) == {PENDING}
        for s in subscribers:
            assert customers.subscription(s.name) == {
                "status": "past_due",
                "plan": "starter",
                "stripeSubscriptionId": s.subscription,
                "currentPeriodStart": iso(base + 12),
                "currentPeriodEnd": iso(base + 12 + 30 * 86400),
                "cancelAtPeriodEnd": False,
                "pastDueSince": iso(base + 11),
                "lastEventCreated": base + 12,
            }
        # One server-side apply per Customer for its three events.
        assert customer_applies(k8s_client) == applies + len(subscribers)

        b = inbox_process(replica_env, tmp_path / "b.log")
        replicas.append(b)
        a.kill()
        await holder.rollback()

    recorded = await eventually(
        lambda: all_recorded(inbox_engine, batch), within=60, message="B applied A's batch"
    )
    # Each event of the batch got the result it would have had without the crash...
    assert set(recorded.values()) == {"applied"}
    # ...and B sent no Customer a second apply: they held the batch's state.
    assert customer_applies(k8s_client) == applies + len(subscribers)

    a_again = inbox_process(replica_env, tmp_path / "a-again.log")
    replicas.append(a_again)
    stream = [
        body
        for offset in (20, 21, 22)
        for s in subscribers
        for body in ([s.invoice(base + offset, paid=True)] if offset == 20 else [s.updated(base + offset)])
    ]
    await store(inbox_pool, route, stream)
    await eventually(lambda: all_recorded(inbox_engine, stream), within=60, message="the stream")

    everything = first + batch + stream

    async def logged() -> dict[str, list[str]] | None:
        """The replicas' logs once they name every event (a replica logs each result after its commit)."""
        logs = {name: recorded_by(process) for name, process in (("a", a), ("b", b), ("a-again", a_again))}
        named = {event_id for ids_ in logs.values() for event_id in ids_}
        return logs if named >= {body["id"] for body in everything} else None

    logs = await eventually(logged, within=30, message="every result in a replica's log")
    per_event = Counter(event_id for ids_ in logs.values() for event_id in ids_)
    assert {body["id"]: per_event[body["id"]] for body in everything} == {
        body["id"]: 1 for body in everything
    }
    assert not {body["id"] for body in batch} & set(logs["a"])  # A's batch never committed
    assert set((await results(inbox_engine, everything)).values()) == {"applied"}

    # Each fact noticed once: every Customer's failed payment of the batch and its recovery after it.
    assert await notice_keys(inbox_engine, ids) == Counter(
        [overdue_key(kind, s, base + 11) for s in subscribers for kind in ("failed", "recovered")]
    )
    for s in subscribers:
        subscription = customers.subscription(s.name) or {}
        assert (subscription["status"], subscription["lastEventCreated"]) == ("active", base + 22)
        assert "pastDueSince" not in subscription


async def test_a_batch_stopped_during_its_customer_write_holds_its_lock_until_the_write_is_done(
    inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: an inbox stopped mid-batch (every rollout stops one) rolled back and released the
    batch lock at once while its thread's write of the Customer was still on its way: another replica's
    batch could read the Customer before it, apply newer events (a cancellation), and have this stale
    write land after them, the plan back for good. The write in flight ends before the lock goes."""
    subscriber = Subscriber(customers, "stopped")
    body = subscriber.updated(int(time.time()))
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        api = inbox.applier.kube.api
        apply = api.apply_customer_spec
        started, written = asyncio.Event(), []
        loop = asyncio.get_running_loop()

        def slow_apply(*args: Any, **kwargs: Any) -> Any:
            loop.call_soon_threadsafe(started.set)
            time.sleep(1.0)  # the API server's answer on its way
            try:
                return apply(*args, **kwargs)
            finally:
                written.append(time.monotonic())

        monkeypatch.setattr(api, "apply_customer_spec", slow_apply)
        await store_at_once(inbox_engine, [body])
        batch = asyncio.create_task(inbox.apply_pending())
        await asyncio.wait_for(started.wait(), 10)
        batch.cancel()
        loop.call_later(0.3, batch.cancel)  # stop_tasks cancels again while the task runs on
        async with inbox_engine.connect() as connection:  # another replica's batch, waiting for the lock
            await connection.execute(select(func.pg_advisory_lock(BATCH_LOCK)))
            locked = time.monotonic()
            await connection.execute(select(func.pg_advisory_unlock(BATCH_LOCK)))
        with pytest.raises(asyncio.CancelledError):
            await batch
    assert written and written[0] <= locked


async def kept_events(engine: AsyncEngine, ids: list[str]) -> set[str]:
    async with engine.connect() as connection:
        found = await connection.scalars(
            select(models.StripeEvent.event_id).where(models.StripeEvent.event_id.in_(ids))
        )
        return set(found)


async def test_final_stripe_events_past_the_retention_are_pruned_in_batches_and_the_others_kept(
    inbox_engine: AsyncEngine, kubeconfig: Path
) -> None:
    now = datetime.now(UTC)
    long_ago, within = now - timedelta(days=100), now - timedelta(days=89)
    # (result, failed attempts, received, last recorded): each a row as the inbox leaves it.
    rows = {
        # A final result past the retention: pruned.
        "applied": ("applied", 0, long_ago, long_ago),
        "ignored": ("ignored", 0, long_ago, long_ago),
        "stale": ("stale", 0, long_ago, long_ago),
        "superseded": ("superseded", 0, long_ago, long_ago),
        "applied too": ("applied", 0, long_ago, long_ago),
        # Kept whatever their age: due, failing (retried), and unmatched (the console replays it).
        "pending": (PENDING, 0, long_ago, None),
        "failing": (PENDING, 5, long_ago, None),
        "unmatched": ("unmatched", 0, long_ago, long_ago),
        # Received long ago, unmatched, replayed 10 days ago and applied: within the retention.
        "replayed lately": ("applied", 0, long_ago, now - timedelta(days=10)),
        # Recorded 89 days ago: kept until the clock is two days on.
        "within": ("applied", 0, within, within),
    }
    ids = {label: random_id("evt_", 24) for label in rows}
    async with inbox_engine.begin() as connection:
        for label, (result, attempts, received, recorded) in rows.items():
            await connection.execute(
                insert(models.StripeEvent).values(
                    event_id=ids[label],
                    type="customer.subscription.updated",
                    created=int(received.timestamp()) - 5,
                    result=result,
                    attempts=attempts,
                    received_at=received,
                    applied_at=recorded,
                    payload={"id": ids[label]},
                )
            )
    clock = {"now": now}

    def kept(found: set[str]) -> set[str]:
        return {label for label, event_id in ids.items() if event_id in found}

    always = {"pending", "failing", "unmatched", "replayed lately"}
    async with inbox_in_process(inbox_engine, kubeconfig, now=lambda: clock["now"]) as inbox:
        # One batch deletes `limit` events at most.
        async with session_factory(inbox_engine)() as session, session.begin():
            cutoff = retention_cutoff(now, inbox.retention)
            deleted, picked = await prune_batch(session, models.StripeEvent.event_id, expired(cutoff), 2)
        assert (deleted, len(picked)) == (2, 2)
        assert len(kept(await kept_events(inbox_engine, list(ids.values())))) == len(rows) - 2

        # The inbox's prune goes on, batch after batch, while a batch is full.
        assert await inbox.prune_finished(batch=2) == 3
        assert kept(await kept_events(inbox_engine, list(ids.values()))) == always | {"within"}
        assert await inbox.prune_finished(batch=2) == 0

        clock["now"] = now + timedelta(days=2)
        assert await inbox.prune_finished() == 1
        assert kept(await kept_events(inbox_engine, list(ids.values()))) == always


async def test_a_redelivered_pruned_event_is_stale_and_changes_nothing(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Its row gone, the redelivery of an event older than the retention is stored and applied again:
    decided against the newer state its subscription's row and the Customer hold, it is stale, writes
    nothing and notices nothing (even with its notices pruned too)."""
    subscriber = Subscriber(customers, "pruned")
    now = datetime.now(UTC)
    base = int(now.timestamp()) - 100 * 86400
    old = [
        subscriber.updated(base),
        subscriber.invoice(base + 60, paid=False),
        subscriber.invoice(base + 120, paid=True),
    ]
    newer = subscriber.updated(int(now.timestamp()) - 10 * 86400, plan="professional")
    async with inbox_in_process(inbox_engine, kubeconfig, now=lambda: now) as inbox:
        await store(inbox_pool, inbox, [*old, newer])
        assert await inbox.apply_pending() == 4
        assert await results(inbox_engine, [*old, newer]) == {body["id"]: "applied" for body in [*old, newer]}
        held = customers.subscription(subscriber.name)
        assert held is not None and held["plan"] == "professional"
        assert await notice_keys(inbox_engine, [subscriber.customer_id]) == {
            overdue_key("failed", subscriber, base + 60): 1,
            overdue_key("recovered", subscriber, base + 60): 1,
        }
        # The old ones received and recorded 100 days ago, the newer one 10 days ago.
        async with inbox_engine.begin() as connection:
            for bodies, age in (([*old], 100), ([newer], 10)):
                await connection.execute(
                    update(models.StripeEvent)
                    .where(models.StripeEvent.event_id.in_([body["id"] for body in bodies]))
                    .values(received_at=now - timedelta(days=age), applied_at=now - timedelta(days=age))
                )
            await connection.execute(
                models.Notice.__table__.delete().where(models.Notice.customer_id == subscriber.customer_id)
            )
        assert await inbox.prune_finished() == 3
        assert await kept_events(inbox_engine, [body["id"] for body in [*old, newer]]) == {newer["id"]}

        applies = customer_applies(k8s_client)
        await store(inbox_pool, inbox, old)  # no row stops them now
        assert await inbox.apply_pending() == 3
        assert await results(inbox_engine, old) == {body["id"]: "stale" for body in old}
        assert customers.subscription(subscriber.name) == held
        assert customer_applies(k8s_client) == applies
        assert await notice_keys(inbox_engine, [subscriber.customer_id]) == Counter()
        row = await subscription_row(inbox_engine, subscriber.subscription)
        assert (row.status, row.plan, row.last_event_created) == ("active", "professional", newer["created"])


def made_again(customers: Customers, subscriber: Subscriber, **spec: Any) -> dict[str, Any]:
    """The subscriber's Customer deleted and created again under its name and customer id, from a
    manifest (no spec.subscription unless `spec` gives one), as GitOps rebuilding a cluster does."""
    customers.delete(subscriber.name)
    return customers.create(
        subscriber.name, customerId=subscriber.customer_id, **({"billing": {"mode": "stripe"}} | spec)
    )


async def subscribed(
    inbox: EventInbox,
    inbox_pool: Pool,
    customers: Customers,
    subscriber: Subscriber,
    base: int,
    plan: str = "professional",
) -> dict[str, Any]:
    """The subscriber's events applied (its subscription active, then past due since `base` + 2);
    the spec.subscription they gave its Customer."""
    await store(inbox_pool, inbox, [subscriber.updated(base + 1, plan=plan)])
    await store(inbox_pool, inbox, [subscriber.invoice(base + 2, paid=False, plan=plan)])
    assert await inbox.apply_pending() == 2
    held = customers.subscription(subscriber.name) or {}
    assert (held.get("status"), held.get("pastDueSince")) == ("past_due", iso(base + 2))
    return held


def without_period_start(subscription: dict[str, Any]) -> dict[str, Any]:
    """A spec.subscription as its row keeps it: a row keeps no period start."""
    return {key: value for key, value in subscription.items() if key != "currentPeriodStart"}


async def test_a_customer_made_again_without_its_subscription_gets_the_newest_live_one_back(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """Found in review: a Stripe-billed Customer deleted and made again from its manifest (a cluster
    rebuilt from Git, Argo CD's replace) had no spec.subscription until Stripe's next event, maybe a
    month later: its trial's entitlement meanwhile, a checkout refused (the live subscription), and that
    next event decided from no state at all. The inbox gives it back the newest live subscription of
    its rows (not an older one still billed beside it), with its pastDueSince, with no Stripe event,
    and tells the Customer, a batch's number of Customers a transaction; a Customer in manual billing
    and one that holds a subscription are left as they are."""
    remade, remade_too = Subscriber(customers, "remade"), Subscriber(customers, "remadetoo")
    manual, holding = Subscriber(customers, "remademanual"), Subscriber(customers, "remadeheld")
    base = int(time.time()) - 3600
    older = random_id("sub_")
    older_body = subscription_object(
        older,
        customer=remade.stripe_customer,
        price=PRICES["enterprise"],
        metadata={"customerId": remade.customer_id},
    )
    # A live subscription Stripe made a day before the Customer's: still billed, not the Customer's.
    older_created = event(
        "customer.subscription.created", {**older_body, "created": base - 86400}, created=base + 3
    )
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        before = await subscribed(inbox, inbox_pool, customers, remade, base)
        await store(inbox_pool, inbox, [older_created])
        assert await inbox.apply_pending() == 1
        assert await results(inbox_engine, [older_created]) == {older_created["id"]: "superseded"}
        too = await subscribed(inbox, inbox_pool, customers, remade_too, base, plan="starter")
        await subscribed(inbox, inbox_pool, customers, manual, base, plan="starter")
        await subscribed(inbox, inbox_pool, customers, holding, base, plan="starter")
        pending = await pending_count(inbox_engine)

        made_again(customers, remade)
        made_again(customers, remade_too)
        made_again(customers, manual, billing={"mode": "manual"})
        given = {"status": "active", "plan": "enterprise", "stripeSubscriptionId": random_id("sub_")}
        made_again(customers, holding, subscription=given)
        untouched = {
            s.name: (customers.get(s.name) or {})["metadata"]["resourceVersion"] for s in (manual, holding)
        }
        assert customers.subscription(remade.name) is None
        applies = customer_applies(k8s_client)

        inbox.batch_customers = 1
        assert await inbox.restore_subscriptions() == 2
        assert customers.subscription(remade_too.name) == without_period_start(too)
        restored = customers.subscription(remade.name)
        assert restored == without_period_start(before)
        assert restored["stripeSubscriptionId"] == remade.subscription
        assert restored["pastDueSince"] == iso(base + 2)  # the dunning's grace goes on, not afresh
        assert customers.managers_of_subscription(remade.name) == [(str(FieldManager.STRIPE), "Apply")]
        assert customer_applies(k8s_client) == applies + 2
        assert {
            s.name: (customers.get(s.name) or {})["metadata"]["resourceVersion"] for s in (manual, holding)
        } == untouched
        assert customers.subscription(manual.name) is None
        assert customers.subscription(holding.name) == given
        uid = (customers.get(remade.name) or {})["metadata"]["uid"]
        told = await inbox.applier.kube.list_customer_events(remade.name, uid)
        assert [(e["reason"], remade.subscription in e["message"]) for e in told] == [
            ("SubscriptionRestored", True)
        ]

        # Once restored there is nothing left to do: nothing is written again.
        assert await inbox.restore_subscriptions() == 0
        assert customer_applies(k8s_client) == applies + 2
    assert await pending_count(inbox_engine) == pending == 0  # no Stripe event needed


async def pending_count(engine: AsyncEngine) -> int:
    """The Stripe events stored and not recorded yet."""
    async with engine.connect() as connection:
        count = await connection.scalar(
            select(func.count()).select_from(models.StripeEvent).where(models.StripeEvent.result == PENDING)
        )
    return int(count or 0)


async def test_a_restore_waits_for_the_batch_lock_and_leaves_a_subscription_written_meanwhile(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two replicas' inboxes look for Customers to restore while batches apply events: a restore waits
    for the batch lock (no batch decides the Customer's events meanwhile), and a spec.subscription
    written between its read and its write (by a person here) is not overwritten: its write names the
    resourceVersion read, and the next look finds nothing to do."""
    subscriber = Subscriber(customers, "restorelock")
    base = int(time.time()) - 3600
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        before = await subscribed(inbox, inbox_pool, customers, subscriber, base)
        made_again(customers, subscriber)
        async with inbox_engine.connect() as connection:  # another replica's batch holds the lock
            await connection.execute(select(func.pg_advisory_lock(BATCH_LOCK)))
            waiting = asyncio.create_task(inbox.restore_subscriptions())
            await eventually(
                lambda: waiting_on_an_advisory_lock(inbox_engine), message="the restore at the lock"
            )
            assert not waiting.done()
            assert customers.subscription(subscriber.name) is None
            await connection.execute(select(func.pg_advisory_unlock(BATCH_LOCK)))
        assert await asyncio.wait_for(waiting, 30) == 1
        assert customers.subscription(subscriber.name) == without_period_start(before)

        made_again(customers, subscriber)
        kube = inbox.applier.kube
        apply = kube.apply_customer_spec
        given = {"status": "active", "plan": "starter", "stripeSubscriptionId": random_id("sub_")}

        async def written_meanwhile(name: str, spec: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            customers.kube.patch_customer(name, {"spec": {"subscription": given}}, FieldManager.CLI)
            return await apply(name, spec, *args, **kwargs)

        monkeypatch.setattr(kube, "apply_customer_spec", written_meanwhile)
        assert await inbox.restore_subscriptions() == 0
        assert customers.subscription(subscriber.name) == given
        monkeypatch.undo()
        assert await inbox.restore_subscriptions() == 0
        assert customers.subscription(subscriber.name) == given


async def test_an_event_for_a_customer_made_again_is_decided_from_its_subscription_s_row(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """An event that comes for a Customer made again before the inbox gave it its subscription back is
    decided from the newest live row, as if the Customer had never lost it: a failed retry of the
    overdue payment keeps the pastDueSince of the first failure (decided from nothing, the dunning's
    grace started afresh)."""
    subscriber = Subscriber(customers, "remadeevent")
    base = int(time.time()) - 3600
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await subscribed(inbox, inbox_pool, customers, subscriber, base)
        made_again(customers, subscriber)
        retry = subscriber.invoice(base + 100, paid=False, plan="professional")
        await store(inbox_pool, inbox, [retry])
        assert await inbox.apply_pending() == 1
    assert await results(inbox_engine, [retry]) == {retry["id"]: "applied"}
    held = customers.subscription(subscriber.name) or {}
    assert (held.get("status"), held.get("plan"), held.get("pastDueSince"), held.get("lastEventCreated")) == (
        "past_due",
        "professional",
        iso(base + 2),
        base + 100,
    )


async def test_an_event_no_customer_matches_still_moves_its_subscription_s_row(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: an admin cancelled a subscription (`"immediately": true`) and deleted its
    Customer before the inbox applied Stripe's deletion. Unmatched, the deletion wrote no row: the row
    stayed live, and the Customer applied again from Git was given that subscription back by the
    restore, for free, for good. An event no Customer matches still moves its subscription's row as a
    batch would (an older one does not), and is recorded unmatched (the console replays it), with no
    notice; the restore then finds nothing to give."""
    subscriber = Subscriber(customers, "unmatchedend")
    base = int(time.time()) - 3600
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        await subscribed(inbox, inbox_pool, customers, subscriber, base)
        noticed = await notice_keys(inbox_engine, [subscriber.customer_id])
        customers.delete(subscriber.name)

        late = subscriber.updated(base, status="active")  # older than the row's state: changes nothing
        await store(inbox_pool, inbox, [late])
        assert await inbox.apply_pending() == 1
        row = await subscription_row(inbox_engine, subscriber.subscription)
        assert (row.status, row.last_event_created) == ("past_due", base + 2)

        ended = subscriber.deleted(base + 10)
        await store(inbox_pool, inbox, [ended])
        assert await inbox.apply_pending() == 1
        assert await results(inbox_engine, [late, ended]) == {
            late["id"]: "unmatched",
            ended["id"]: "unmatched",
        }
        row = await subscription_row(inbox_engine, subscriber.subscription)
        # Ended overdue, as the Customer's own deletion would have left it: the failed payment still owed.
        assert (row.status, row.plan, row.last_event_created, row.past_due_since) == (
            "canceled",
            "starter",
            base + 10,
            datetime.fromtimestamp(base + 2, UTC),
        )
        assert await notice_keys(inbox_engine, [subscriber.customer_id]) == noticed

        made_again(customers, subscriber)
        assert await inbox.restore_subscriptions() == 0
        assert customers.subscription(subscriber.name) is None


async def test_a_restore_goes_on_after_a_status_write_between_its_read_and_its_write(
    inbox_pool: Pool,
    inbox_engine: AsyncEngine,
    kubeconfig: Path,
    customers: Customers,
    k8s_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: the restore's write names the resourceVersion read, which the operator's status
    writes move too: during a fleet's rebuild from Git (the operator writing each new Customer's status)
    many restores were refused and waited a minute each. Refused so, the Customer is read again under
    the locks still held and written once more, in the same pass (a subscription written meanwhile is
    still left as it is: the test of the batch lock above)."""
    subscriber = Subscriber(customers, "restorestatus")
    base = int(time.time()) - 3600
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        before = await subscribed(inbox, inbox_pool, customers, subscriber, base)
        made_again(customers, subscriber)
        kube = inbox.applier.kube
        apply = kube.apply_customer_spec
        status_writes = 0

        async def status_written_meanwhile(name: str, *args: Any, **kwargs: Any) -> Any:
            nonlocal status_writes
            if status_writes == 0:  # the operator's first pass, between the restore's read and its write
                status_writes += 1
                customers.kube.patch_customer_status(
                    name, {"phase": "Provisioning"}, manager=FieldManager.OPERATOR
                )
            return await apply(name, *args, **kwargs)

        monkeypatch.setattr(kube, "apply_customer_spec", status_written_meanwhile)
        applies = customer_applies(k8s_client)
        assert await inbox.restore_subscriptions() == 1
        assert customer_applies(k8s_client) == applies + 2  # refused once, then written
        assert customers.subscription(subscriber.name) == without_period_start(before)
        assert (customers.get(subscriber.name) or {})["status"]["phase"] == "Provisioning"


async def test_the_inbox_restores_at_its_start_and_every_interval(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """The inbox process looks for Customers to restore when it starts and then every interval (a
    minute; a fraction of a second here), without being asked."""
    subscriber = Subscriber(customers, "restoreloop")
    base = int(time.time()) - 3600
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        before = await subscribed(inbox, inbox_pool, customers, subscriber, base)

    async def restored() -> dict[str, Any] | None:
        return customers.subscription(subscriber.name)

    made_again(customers, subscriber)
    async with inbox_in_process(inbox_engine, kubeconfig, workers=1, restore_interval=0.2):
        assert await eventually(restored, within=10, message="at its start") == without_period_start(before)
        made_again(customers, subscriber)
        assert await eventually(restored, within=10, message="later") == without_period_start(before)


async def test_an_invoice_event_whose_lines_stripe_refuses_to_list_does_not_hold_its_customer(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: with a restricted key without "Invoices: read" (the README accepts restricted
    keys), Stripe answers the listing of an invoice's lines 403; the event carrying its first lines
    alone stayed pending, retried with backoff without end, and every newer event of its Customer, its
    cancellation too, waited behind it. A refusal no retry clears reads it from the lines it carries
    (a warning naming it), and the Customer's events go on."""
    subscriber = Subscriber(customers, "linesrefused")
    base = int(time.time()) - 3600
    asked: list[str] = []

    async def invoice_lines(invoice_id: str) -> list[dict[str, Any]]:
        async def forbidden() -> list[dict[str, Any]]:
            raise stripe.PermissionError(
                "The provided key does not have the required permissions", http_status=403
            )

        asked.append(invoice_id)
        return await _stripe(forbidden(), "list the invoice's lines")

    async with inbox_in_process(inbox_engine, kubeconfig, invoice_lines=invoice_lines) as inbox:
        await subscribed(inbox, inbox_pool, customers, subscriber, base)
        paid = subscriber.invoice(base + 10, paid=True, plan="professional")
        first_lines_alone(paid)
        ended = subscriber.deleted(base + 20, plan="professional")
        await store(inbox_pool, inbox, [paid, ended])
        assert await inbox.apply_pending() == 2
    assert asked == [paid["data"]["object"]["id"]]
    assert await results(inbox_engine, [paid, ended]) == {paid["id"]: "applied", ended["id"]: "applied"}
    held = customers.subscription(subscriber.name) or {}
    assert (held.get("status"), held.get("lastEventCreated")) == ("canceled", base + 20)


async def test_an_unmatched_invoice_event_carrying_its_first_lines_alone_is_read_with_every_line(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: an invoice event no Customer matched was read from the lines it carried (the
    listing ran for Customers' events alone): Stripe retried an older invoice of a deleted Customer's
    overdue subscription, its plan line past an upgrade's 10 prorations, which read as billing no
    period, so its row was made active and its pastDueSince cleared, and a Customer made again under
    its customer id was given back an active subscription. It is read with every line, as a
    Customer's is: older, it leaves the row overdue."""
    subscriber = Subscriber(customers, "unmatchedlines")
    base = int(time.time()) - 3600
    every: dict[str, list[dict[str, Any]]] = {}

    async def invoice_lines(invoice_id: str) -> list[dict[str, Any]]:
        return every[invoice_id]

    async with inbox_in_process(inbox_engine, kubeconfig, invoice_lines=invoice_lines) as inbox:
        await subscribed(inbox, inbox_pool, customers, subscriber, base)
        customers.delete(subscriber.name)
        # The period before the one whose payment failed (that one began at base + 2), paid late.
        older = subscriber.invoice(base + 10, paid=True, plan="professional")
        plan_line = older["data"]["object"]["lines"]["data"][0]
        plan_line["period"] = {"start": base + 2 - 30 * 86400, "end": base + 2}
        every[older["data"]["object"]["id"]] = first_lines_alone(older)
        await store(inbox_pool, inbox, [older])
        assert await inbox.apply_pending() == 1
    assert await results(inbox_engine, [older]) == {older["id"]: "unmatched"}
    row = await subscription_row(inbox_engine, subscriber.subscription)
    assert (row.status, row.past_due_since) == ("past_due", datetime.fromtimestamp(base + 2, UTC))


class OverlappingListings:
    """A fake `invoice_lines` over `every` (invoice id: its lines): what it was asked (`asked`), and the
    invoices whose listing was still running once `pair` (by default any two) had been asked (`met`),
    each waiting up to 2 s for that, so listings one after the other never meet. `failing`: an invoice
    whose listing fails as a retry may clear."""

    def __init__(
        self, every: dict[str, list[dict[str, Any]]], pair: set[str] | None = None, failing: str | None = None
    ) -> None:
        self.every, self.pair, self.failing = every, pair, failing
        self.asked: list[str] = []
        self.met: set[str] = set()
        self._all_asked = asyncio.Event()

    async def __call__(self, invoice_id: str) -> list[dict[str, Any]]:
        self.asked.append(invoice_id)
        if (len(set(self.asked)) >= 2) if self.pair is None else self.pair <= set(self.asked):
            self._all_asked.set()
        try:
            async with asyncio.timeout(2):
                await self._all_asked.wait()
            self.met.add(invoice_id)
        except TimeoutError:
            pass
        if invoice_id == self.failing:
            raise DependencyUnavailable("Stripe")
        return self.every[invoice_id]


async def test_unmatched_invoice_events_list_their_invoices_at_once_each_invoice_once(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: the invoices of events no Customer matched were listed one after another under
    the batch lock (each listing up to INVOICE_LINES_TIMEOUT), while the Customers' are listed `workers`
    at once. They are listed as those are, and an invoice two of them name (invoice.paid and
    invoice.payment_succeeded) still once in the batch."""
    base = int(time.time()) - 3600
    every: dict[str, list[dict[str, Any]]] = {}
    listings = OverlappingListings(every)
    older: list[dict[str, Any]] = []
    subscribers = [Subscriber(customers, "unmatchedboth"), Subscriber(customers, "unmatchedboth")]
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        for subscriber in subscribers:
            await subscribed(inbox, inbox_pool, customers, subscriber, base)
            customers.delete(subscriber.name)
            paid = subscriber.invoice(base + 10, paid=True, plan="professional")
            plan_line = paid["data"]["object"]["lines"]["data"][0]
            plan_line["period"] = {"start": base + 2 - 30 * 86400, "end": base + 2}
            every[paid["data"]["object"]["id"]] = first_lines_alone(paid)
            older.append(paid)
    # Its invoice's other event, after both (with 2 workers, one waiting on its invoice's listing holds a
    # slot: the other invoice's listing would wait for it).
    twin = json.loads(json.dumps(older[0])) | {
        "id": random_id("evt_", 24),
        "type": "invoice.paid",
        "created": base + 11,
    }
    async with inbox_in_process(inbox_engine, kubeconfig, workers=2, invoice_lines=listings):
        await store_at_once(inbox_engine, [*older, twin])  # one claim: one batch
        found = await eventually(
            lambda: all_recorded(inbox_engine, [*older, twin]), within=20, message="the events recorded"
        )
    assert found == dict.fromkeys([older[0]["id"], older[1]["id"], twin["id"]], "unmatched")
    assert listings.met == set(every) and sorted(listings.asked) == sorted(every)
    for subscriber in subscribers:  # read with every line: older, it leaves the row overdue
        row = await subscription_row(inbox_engine, subscriber.subscription)
        assert (row.status, row.past_due_since) == ("past_due", datetime.fromtimestamp(base + 2, UTC))


async def test_unmatched_events_of_a_subscription_behind_its_failed_listing_are_not_listed(
    inbox_pool: Pool, inbox_engine: AsyncEngine, kubeconfig: Path, customers: Customers
) -> None:
    """Found in review: with the unmatched events' invoices listed at once, every one was listed, also
    those of a subscription whose earlier event's listing failed (they stay pending behind it anyway):
    with Stripe hanging, each took INVOICE_LINES_TIMEOUT under the batch lock instead of one, and one
    refused for good warned at every retry. A subscription's are listed in Stripe's order up to the
    first failure; another subscription's still at once."""
    base = int(time.time()) - 3600
    every: dict[str, list[dict[str, Any]]] = {}
    stuck, other = Subscriber(customers, "unmatchedstuck"), Subscriber(customers, "unmatchedother")
    async with inbox_in_process(inbox_engine, kubeconfig) as inbox:
        for subscriber in (stuck, other):
            await subscribed(inbox, inbox_pool, customers, subscriber, base)
            customers.delete(subscriber.name)
    first, behind = stuck.invoice(base + 10, paid=True), stuck.invoice(base + 12, paid=True)
    others = other.invoice(base + 11, paid=True)
    invoice_of = {body["id"]: body["data"]["object"]["id"] for body in (first, behind, others)}
    for body in (first, behind, others):
        every[invoice_of[body["id"]]] = first_lines_alone(body)

    # The first's listing fails as a retry may clear: it stays pending.
    listings = OverlappingListings(
        every, pair={invoice_of[first["id"]], invoice_of[others["id"]]}, failing=invoice_of[first["id"]]
    )
    async with inbox_in_process(inbox_engine, kubeconfig, workers=2, invoice_lines=listings):
        await store_at_once(inbox_engine, [first, others, behind])  # one claim: one batch

        async def first_failed() -> bool:
            return (await attempts_of(inbox_engine, first))[1] >= 1

        await eventually(first_failed, within=20, message="the first event's listing failed")
    assert await results(inbox_engine, [first, others, behind]) == {
        first["id"]: PENDING,
        others["id"]: "unmatched",
        behind["id"]: PENDING,
    }
    assert invoice_of[behind["id"]] not in listings.asked
    assert listings.met == {invoice_of[first["id"]], invoice_of[others["id"]]}
