"""Request and response bodies of the API, in the earlier system's snake_case shapes.

Requests are validated by these models (400s name the field), responses are built through them, and the
OpenAPI document takes its JSON schemas from them, so the three never disagree.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Final, Literal, overload

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    RootModel,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from iotistic_billing.customer import (
    CUSTOMER_ID_PATTERN,
    EMAIL_PATTERN,
    NOT_BLANK_TEXT_PATTERN,
    STRIPE_SUBSCRIPTION_ID_PATTERN,
    URL_PATTERN,
    BillingMode,
    EffectivePlanName,
    PaidPlanName,
    PlanName,
    SubscriptionStatus,
)
from iotistic_billing.stripe_inbox.events import StripeEvent
from iotistic_billing.usage.options import REPORT_LIST_LIMIT
from iotistic_billing.usage.reports import INT64_MAX, ReportBody
from iotistic_billing.usage.store import ReportPosition

_EMAIL = re.compile(EMAIL_PATTERN)


def _email(value: str) -> str:
    # The CRD's own pattern: an address the API server would refuse must be refused here first.
    if not _EMAIL.fullmatch(value):
        raise PydanticCustomError("value_error", "value is not a valid email address")
    return value


Email = Annotated[str, Field(max_length=320, json_schema_extra={"format": "email"}), AfterValidator(_email)]
CustomerIdField = Annotated[
    str, Field(pattern=CUSTOMER_ID_PATTERN, max_length=37, examples=["cust_abc123xyz789"])
]
_URL = re.compile(URL_PATTERN)


def _url(value: str) -> str:
    if not _URL.fullmatch(value):
        raise PydanticCustomError(
            "url_parsing", "must be an http:// or https:// URL without spaces or control characters"
        )
    return value


Url = Annotated[str, Field(max_length=2048, json_schema_extra={"pattern": URL_PATTERN}), AfterValidator(_url)]


NUL_MESSAGE = "must not contain NUL characters"
SURROGATE_MESSAGE = "must not contain unpaired surrogates (escapes such as \\ud800)"


def _has_nul(value: object) -> bool:
    # PostgreSQL text and JSONB cannot hold NUL: refused as a 400 rather than left to fail the write.
    return isinstance(value, str) and "\x00" in value


def _text_problem(value: object) -> tuple[str, str] | None:
    """(type, message) when PostgreSQL could not store `value` as text, else None."""
    if _has_nul(value):
        return "string_nul", NUL_MESSAGE
    # json.loads turns an escaped lone surrogate ("\ud800") into text no UTF-8 column or JSONB holds.
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "string_unicode", SURROGATE_MESSAGE
    return None


def unstorable_text(value: object) -> dict[str, str] | None:
    """The first string or key of a parsed JSON value that PostgreSQL cannot store, as a problem for
    ValidationFailed naming its field (`data.object.name`, `items.0`; a bad key names the object holding
    it, `body` at the top); None when all can be stored. Iterative: any depth json.loads accepted."""
    pending: list[tuple[tuple[str, ...], object]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, dict):
            texts: list[object] = list(item)
            children = [((*path, str(key)), child) for key, child in item.items()]
        elif isinstance(item, list):
            texts, children = [], [((*path, str(index)), child) for index, child in enumerate(item)]
        else:
            texts, children = [item], []
        for text in texts:
            problem = _text_problem(text)
            if problem is not None:
                return {"field": ".".join(path) or "body", "message": problem[1], "type": problem[0]}
        pending.extend(reversed(children))
    return None


class Request(BaseModel):
    """Unknown fields are refused, so a misspelt field is a 400 rather than silently ignored. Strict, and
    read as JSON (messages.read_body): a value is of the type the document says, as JSON spells it, not
    one pydantic could make of it ("yes" a true, 1.0 a 1, " cust_abc123 " stripped to an id)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Before the field's own checks, whose patterns refuse NUL too but name no reason.
    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        if _has_nul(value):
            raise PydanticCustomError("string_nul", NUL_MESSAGE)
        return value


# Free text: a Request refuses NUL in every string (PostgreSQL text holds none), and the pattern says so
# in the OpenAPI document, where a client generating from it would send one.
NO_NUL = Field(pattern=r"^[^\x00]*$")
# Text a person writes, not blank: the pattern says so, where a minimum length alone let " " pass for
# valid. Blank as the CRD says (a BOM alone passed here, then the API server refused the Customer after
# its Stripe customer was made).
NOT_BLANK = Field(min_length=1, pattern=NOT_BLANK_TEXT_PATTERN)


class Query(BaseModel):
    """Query strings: unknown parameters are ignored (cache busters and the like); one read given twice
    is refused (messages.read_query)."""

    model_config = ConfigDict(extra="ignore")

    # pydantic reads "5.0", "+5", " 5" and "1_0" as numbers: a query's number is its digits alone.
    @field_validator("*", mode="before")
    @classmethod
    def _plain_digits(cls, value: object, info: ValidationInfo) -> object:
        number = info.field_name is not None and cls.model_fields[info.field_name].annotation is int
        if number and isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise PydanticCustomError("int_parsing", "must be a whole number in plain digits (0-9)")
        return value


class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- errors -----


class ErrorDetail(Response):
    model_config = ConfigDict(extra="allow")

    field: str | None = None
    message: str | None = None
    type: str | None = None


class ErrorBody(Response):
    error: str = Field(description="Short title of the error.")
    message: str = Field(description="What went wrong, for a person.")
    details: list[ErrorDetail] | dict[str, Any] | None = Field(
        default=None, description="Per-field problems of a validation error, or facts about the error."
    )


# ----- customers -----


class SignupRequest(Request):
    email: Email
    company_name: Annotated[str, NOT_BLANK, Field(max_length=200)]
    full_name: Annotated[str, NO_NUL, Field(max_length=200)] | None = None
    # Accepted for the earlier system's clients and discarded: this service keeps no passwords.
    password: (
        Annotated[str, NO_NUL, Field(max_length=1024, description="Accepted and discarded, never stored.")]
        | None
    ) = None


class SubscriptionView(Response):
    status: SubscriptionStatus
    plan: PaidPlanName | None = None
    stripe_subscription_id: str | None = None
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool | None = None
    ended_at: datetime | None = Field(
        default=None,
        description="When Stripe ended it (canceled): inside its period, usage from then on is not billed.",
    )
    past_due_since: datetime | None = Field(
        default=None,
        description=(
            "When the payment first failed, while past_due or unpaid, or canceled with it unpaid (dunning)."
        ),
    )
    last_event_created: int | None = None


class CustomerView(Response):
    customer_id: str
    resource_name: str
    email: str
    company_name: str
    contact_name: str | None = None
    plan: PlanName = Field(description="spec.plan, the plan of a manually billed customer.")
    effective_plan: EffectivePlanName | None = Field(
        default=None, description="status.plan, what the licence grants."
    )
    phase: str | None = None
    billing_mode: BillingMode
    stripe_customer_id: str | None = None
    suspended: bool = False
    trial_ends_at: datetime | None = Field(
        default=None,
        description="status.trial.endsAt, the operator's (a re-created Customer's counted from its customer"
        " id's first licence; none: no trial); before its first pass, spec.trial's end counted from the"
        " Customer's creation.",
    )
    instance_url: str | None = None
    created_at: datetime | None = None
    subscription: SubscriptionView | None = None


class SignupCustomer(Response):
    customer_id: str
    resource_name: str
    email: str
    company_name: str
    full_name: str | None = None
    stripe_customer_id: str | None = None
    created_at: datetime | None = None


class SignupSubscription(Response):
    plan: PlanName
    status: SubscriptionStatus
    trial_ends_at: datetime | None = None


class LicenseToken(Response):
    jwt: str


class SignupResponse(Response):
    customer: SignupCustomer
    subscription: SignupSubscription
    license: LicenseToken | None = Field(
        description="null when the operator had not issued the licence in time (answer 202): fetch it"
        " later with GET /api/licenses/{customerId}."
    )


class ListCustomersQuery(Query):
    page: Annotated[int, Field(ge=1, le=100_000)] = 1
    limit: Annotated[int, Field(ge=1, le=100)] = 20


class Pagination(Response):
    page: int
    limit: int
    total: int
    pages: int


class CustomerList(Response):
    customers: list[CustomerView]
    pagination: Pagination


# ----- subscriptions -----


class TrialView(Response):
    is_trial_mode: bool | None = None
    ends_at: datetime | None = None


class SubscriptionStatusResponse(Response):
    customer_id: str
    billing_mode: BillingMode
    plan: EffectivePlanName | None = Field(default=None, description="The effective plan (status.plan).")
    subscription: SubscriptionView | None = None
    trial: TrialView | None = None


class CheckoutRequest(Request):
    customer_id: CustomerIdField
    plan: PaidPlanName
    success_url: Url
    cancel_url: Url


class CheckoutResponse(Response):
    session_id: str
    checkout_url: str


class UpgradeRequest(Request):
    customer_id: CustomerIdField
    new_plan: PaidPlanName


class CancelRequest(Request):
    customer_id: CustomerIdField
    immediately: bool = Field(default=False, description="Cancel now rather than at the period end.")
    # A retry cannot say which subscription it meant otherwise: once the first cancel's deletion is
    # applied, the customer's current subscription is its other one (found in review).
    subscription_id: (
        Annotated[str, Field(pattern=STRIPE_SUBSCRIPTION_ID_PATTERN, max_length=255, examples=["sub_1abc"])]
        | None
    ) = Field(
        default=None,
        description=(
            "The subscription meant (an earlier answer's `subscription_id`, or GET /api/subscriptions/"
            "{customerId}'s `subscription.stripe_subscription_id`): "
            "that one is cancelled, not the customer's current one, and one of the customer's canceled "
            "already is answered 200 with its status (`canceled`), nothing sent to Stripe, so a retry "
            "after a lost answer cancels nothing else. 404 `Subscription not found` when the customer has "
            "no subscription of that id on a plan. Without it: the customer's current subscription."
        ),
    )


class PortalRequest(Request):
    customer_id: CustomerIdField
    return_url: Url


class SubscriptionChangeResponse(Response):
    customer_id: str
    subscription_id: str
    status: str = Field(
        description=(
            "Stripe's status of the subscription once asked: canceled when cancelled now; its status until"
            " then (active, ...) when cancelled at the period's end (cancel_at_period_end true). A cancel"
            " naming a subscription ended already answers the status it ended in: canceled, or"
            " incomplete_expired (its first payment never made: it never billed)."
        )
    )
    plan: PaidPlanName | None = None
    cancel_at_period_end: bool
    canceled_immediately: bool = False


class PortalResponse(Response):
    url: str


# ----- licences -----


class LicenseResponse(Response):
    license: str = Field(description="The licence JWT from the customer's Secret.")
    decoded: dict[str, Any] = Field(
        description="Its claims: unchecked when `verified` is false because its kid names no key of ours;"
        " {} when the key it names does not verify it (tampered, or for another audience)."
    )
    verified: bool = Field(
        description="Whether one of our keys (the JWKS's) verified its signature and audience; its times"
        " are not checked."
    )


class HistoryQuery(Query):
    limit: Annotated[int, Field(ge=1, le=500)] = 100


class LicenseHistoryItem(Response):
    """A license_history row (db.models.LicenseHistory: a LicenseRecord with its action), as the API
    shows it: the customer id is the route's."""

    id: int
    action: str
    plan: str
    max_devices: int
    license_hash: str
    jti: str
    kid: str
    issued_at: datetime
    expires_at: datetime
    features: dict[str, Any]
    limits: dict[str, Any]
    # The row's attribute is metadata_ (SQLAlchemy keeps `metadata` for itself).
    metadata: dict[str, Any] = Field(validation_alias=AliasChoices("metadata_", "metadata"))
    generated_at: datetime


class LicenseStatistics(Response):
    model_config = ConfigDict(populate_by_name=True)

    total_generations: int = Field(alias="totalGenerations")
    by_action: dict[str, int] = Field(alias="byAction")
    by_plan: dict[str, int] = Field(alias="byPlan")


class LicenseHistoryResponse(Response):
    customer_id: str
    email: str
    history: list[LicenseHistoryItem]
    statistics: LicenseStatistics


class RevokeRequest(Request):
    reason: Annotated[str, NOT_BLANK, Field(max_length=500)]


class RevokeResponse(Response):
    customer_id: str
    revoked_jti: str | None = Field(
        description="The licence revoked; null only when customer_deleted and the licence history knows no"
        " licence of the customer id (its usage keys alone were revoked)."
    )
    reason: str
    suspended: bool = Field(
        description="spec.suspended is set (by this revoke, or the earlier one when already_revoked): the"
        " operator re-mints an unlicensed licence. False when customer_deleted."
    )
    already_revoked: bool = Field(
        description="The licence was revoked already (a revoke sent again): nothing was recorded, sent or"
        " changed, and `reason` is this request's, not the one the licence history recorded."
    )
    customer_deleted: bool = Field(
        default=False,
        description="No Customer holds the customer id (deleted with its finalizer removed by hand): no"
        " Customer was patched and no notice sent; its usage keys were revoked and the last licence its"
        " history knows recorded revoked.",
    )
    gitops_manager: str | None = Field(
        default=None,
        description="The GitOps controller (Flux, Argo CD) that owns the Customer's spec.suspended, from its"
        " managedFields, kubectl's last-applied-configuration or a Flux or Argo CD label: it puts"
        " `suspended: false` back within seconds, and the operator then reinstates the licence and sends"
        " license.reinstated. Null when Git does not own the field (or no Customer holds the id).",
    )
    warning: str | None = Field(
        default=None,
        description="Set with gitops_manager: that Git reverts this suspension; suspend the Customer in Git.",
    )


class Jwk(Response):
    kty: str
    n: str
    e: str
    kid: str
    use: str
    alg: str


class Jwks(Response):
    keys: list[Jwk]


# ----- operations -----


class QueueStats(Response):
    """Customers by status.phase (a Customer not reconciled yet counts as Pending)."""

    model_config = ConfigDict(populate_by_name=True)

    pending: int = Field(alias="Pending")
    provisioning: int = Field(alias="Provisioning")
    ready: int = Field(alias="Ready")
    degraded: int = Field(alias="Degraded")
    suspended: int = Field(alias="Suspended")
    expired: int = Field(alias="Expired")
    terminating: int = Field(alias="Terminating")
    failed: int = Field(alias="Failed")
    total: int


class Health(Response):
    status: Literal["ok"]


class Readiness(Response):
    status: Literal["ready", "unavailable"]
    checks: dict[str, Literal["ok", "unavailable"]]


# ----- Stripe webhooks -----


class WebhookAck(Response):
    received: Literal[True] = True
    duplicate: bool = False
    result: str | None = Field(
        default=None,
        description=(
            "queued: stored, applied right after this answer (stripe_events.result then says applied, "
            "stale, superseded, unmatched or ignored); null for a duplicate."
        ),
    )


# ----- usage -----


class UsageReportRequest(RootModel[ReportBody]):
    """One report, or {"reports": [...]} with 1 to 1,000 of them. Counters are deltas over
    [period_start, period_end); a report is stored once per customer, instance, report_id and
    period_start (a retry must send the same period_start, and the same values: other ones are a 409)."""


class UsageReportAck(Response):
    accepted: int = Field(description="Reports stored by this request.")
    duplicate: int = Field(
        description=(
            "Reports already stored earlier (same customer, instance, report_id and period_start) with the"
            " same values; one with other values is a 409, not a duplicate."
        )
    )


# A cursor is about 70 characters: base64url (unpadded) of its position's text.
REPORTS_CURSOR: Final = re.compile(r"[A-Za-z0-9_-]{1,100}")
# One whose id is a Stripe event's (255 characters at most, stripe_events.event_id) is longer.
EVENT_CURSOR: Final = re.compile(r"[A-Za-z0-9_-]{1,1500}")


def position_cursor(at: datetime, row_id: int | str) -> str:
    """The opaque text of a row's place in a newest-first order by (time, id), a keyset: the usage
    reports' `reports_next_cursor`, the older links of the console's customer page, and the Stripe events
    page's (its id a Stripe event's)."""
    text = f"{at.astimezone(UTC).isoformat()},{row_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@overload
def read_position_cursor(value: str, of: type[int] = ...) -> tuple[datetime, int] | None: ...
@overload
def read_position_cursor(value: str, of: type[str]) -> tuple[datetime, str] | None: ...
def read_position_cursor(value: str, of: type[int] | type[str] = int) -> tuple[datetime, int | str] | None:
    """A cursor back as its (time, id), the id a row's number or (`of=str`) a Stripe event's; None unless
    it is the exact text `position_cursor` writes, so that one made up is refused naming its parameter,
    rather than a page from a place no answer named or an id past bigint (a 500)."""
    if not (REPORTS_CURSOR if of is int else EVENT_CURSOR).fullmatch(value):
        return None
    try:
        text = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        at, _, row_id = text.partition(",")
        position = datetime.fromisoformat(at), of(row_id)
    except ValueError:  # not base64 (binascii.Error), not UTF-8, not a time, not an integer
        return None
    if position[0].utcoffset() != timedelta(0):
        return None
    key = position[1]
    if isinstance(key, int) and not 1 <= key <= INT64_MAX:
        return None
    if isinstance(key, str) and (not key or "\x00" in key):  # no event's id: PostgreSQL text holds no NUL
        return None
    return position if position_cursor(*position) == value else None


def reports_cursor(position: ReportPosition) -> str:
    """The opaque text of a position in the usage reports' order (`reports_next_cursor`)."""
    return position_cursor(position.period_end, position.id)


def _read_reports_cursor(value: object) -> ReportPosition:
    """A cursor back as its position (read_position_cursor)."""
    if isinstance(value, ReportPosition):  # an answer's, built by the server
        return value
    if isinstance(value, str) and (position := read_position_cursor(value)) is not None:
        return ReportPosition(*position)
    raise PydanticCustomError("reports_cursor", "must be the reports_next_cursor of an earlier answer")


ReportsCursor = Annotated[
    ReportPosition,
    PlainValidator(_read_reports_cursor),
    PlainSerializer(reports_cursor, return_type=str),
    WithJsonSchema({"type": "string", "pattern": f"^{REPORTS_CURSOR.pattern}$"}),
]


class UsageQuery(Query):
    days: Annotated[int, Field(ge=1, le=366, description="Whole UTC days, today included.")] = 30
    reports_limit: Annotated[
        int, Field(ge=1, le=REPORT_LIST_LIMIT, description=f"Reports a page, at most {REPORT_LIST_LIMIT}.")
    ] = REPORT_LIST_LIMIT
    reports_before: ReportsCursor | None = Field(
        default=None,
        description="The reports_next_cursor of the page before: this page lists the window's reports "
        "after it, newest first. Any other value is a 400 (type reports_cursor).",
    )


class UsageReportView(Response):
    instance_id: str
    report_id: str
    period_start: datetime
    period_end: datetime
    active_devices: int
    total_devices: int
    mqtt_messages_published: int
    mqtt_messages_received: int
    mqtt_bytes_sent: int
    mqtt_bytes_received: int
    http_requests: int
    http_bytes_sent: int
    http_bytes_received: int
    postgres_size_mb: str = Field(description="A decimal, as a string.")
    postgres_row_count: int
    reported_at: datetime


class UsageDay(Response):
    date: date
    reports: int
    peak_active_devices: int
    mqtt_messages: int
    mqtt_bytes: int = Field(description="Sent and received.")
    http_requests: int
    http_bytes: int = Field(description="Sent and received.")
    postgres_size_mb: str | None = Field(description="The last size reported that day (a decimal string).")
    device_hours: str = Field(
        description="Active devices times the hours of each report starting that day (a decimal string)."
    )


class IncludedUsageView(Response):
    """The plan's included usage per billing period; -1 is unlimited."""

    devices: int
    traffic_gb: int
    storage_gb: int
    api_calls: int


class PeriodTotalsView(Response):
    peak_devices: int
    mqtt_bytes: int
    http_bytes: int
    api_calls: int
    storage_gb_months: str = Field(description="A decimal, as a string.")
    reports: int
    device_hours: str = Field(
        description="Active devices times hours over the period's reports (a decimal string)."
    )


class OverageLineView(Response):
    metric: str
    quantity: str = Field(description="Units over the quota, a decimal string.")
    unit_price: str = Field(description="Dollars per `per` units.")
    per: int
    amount: str = Field(description="Dollars, rounded to the cent.")


class OverageView(Response):
    lines: list[OverageLineView]
    total: str = Field(description="Dollars.")
    total_cents: int


class BillingPeriodUsage(Response):
    plan: str
    period_start: datetime
    period_end: datetime
    included: IncludedUsageView
    totals: PeriodTotalsView
    overage: OverageView
    billed: bool = Field(
        description="Whether the overage is charged: a trial's, or the unlicensed plan's, is shown and not "
        "billed (its lines say what a paid plan would owe)."
    )
    not_billed_reason: str | None = Field(
        default=None,
        description="Why the overage is not billed (a plan that is not paid, a subscription that ended); "
        "null when it is.",
    )
    within_limits: bool
    exceeded: list[str] = Field(description="What is over the included usage, for a person.")


class UsageHistory(Response):
    customer_id: str
    days: int
    window_start: datetime
    window_end: datetime
    report_count: int = Field(description="Reports in the window, every page's.")
    reports: list[UsageReportView] = Field(
        description="A page of the window's reports, newest first (by period_end, then the last stored): "
        "the newest, or those after reports_before."
    )
    reports_truncated: bool = Field(
        description="More reports follow this page (reports_next_cursor reads them); the daily series "
        "counts all."
    )
    reports_next_cursor: ReportsCursor | None = Field(
        description="Pass as reports_before for the next page of the window; null on the last page."
    )
    daily: list[UsageDay] = Field(description="One entry per UTC day of the window, oldest first.")
    billing_period: BillingPeriodUsage


# ----- notices -----


class NoticeQuery(Query):
    customer_id: CustomerIdField | None = None
    status: Literal["pending", "sent", "dead"] | None = Field(
        default=None, description="Only notices with a delivery in this state."
    )
    limit: Annotated[int, Field(ge=1, le=200)] = 50


class DeliveryView(Response):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel: Literal["email", "webhook", "platform"]
    target: str = Field(description="The address, or the endpoint's URL.")
    message_id: str = Field(description="The mail's Message-ID and the webhook's webhook-id, on every try.")
    status: Literal["pending", "sent", "dead"]
    attempts: int
    next_attempt_at: datetime
    last_error: str | None = Field(
        description="Why the last try failed: an HTTP status, a refused address (a customer's webhook goes "
        "to public addresses and those NOTIFY_WEBHOOK_ALLOWED_CIDRS allows), or `no answer from <host>` "
        "whatever the connection did (the webhook server's log has the detail)."
    )
    sent_at: datetime | None


class NoticeView(Response):
    model_config = ConfigDict(from_attributes=True)

    id: int
    key: str = Field(description="The idempotency key: one notice per key.")
    kind: str
    customer_id: str
    subject: str
    facts: dict[str, Any]
    created_at: datetime
    deliveries: list[DeliveryView]


class NoticeList(Response):
    notices: list[NoticeView]


__all__ = [
    "NUL_MESSAGE",
    "BillingPeriodUsage",
    "CancelRequest",
    "CheckoutRequest",
    "CheckoutResponse",
    "CustomerList",
    "CustomerView",
    "DeliveryView",
    "ErrorBody",
    "Health",
    "HistoryQuery",
    "Jwks",
    "LicenseHistoryResponse",
    "LicenseResponse",
    "ListCustomersQuery",
    "NoticeList",
    "NoticeQuery",
    "NoticeView",
    "PortalRequest",
    "PortalResponse",
    "QueueStats",
    "Readiness",
    "ReportsCursor",
    "RevokeRequest",
    "RevokeResponse",
    "SignupRequest",
    "SignupResponse",
    "StripeEvent",
    "SubscriptionChangeResponse",
    "SubscriptionStatusResponse",
    "UpgradeRequest",
    "UsageDay",
    "UsageHistory",
    "UsageQuery",
    "UsageReportAck",
    "UsageReportRequest",
    "UsageReportView",
    "WebhookAck",
    "position_cursor",
    "read_position_cursor",
    "reports_cursor",
    "unstorable_text",
]
