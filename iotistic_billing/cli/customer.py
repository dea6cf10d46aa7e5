"""`iotistic-billing customer`: add, upgrade, deactivate and list Customer resources (the earlier system's
customer manager, on the Kubernetes API instead of the database)."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from kubernetes.client.exceptions import ApiException

from iotistic_billing.cli import PROGRAM, CommandError, ServiceUnavailable, given_option
from iotistic_billing.cli.tables import print_table
from iotistic_billing.customer import (
    KIND,
    PLAN_NAMES,
    CustomerMetadata,
    CustomerSpec,
    InvalidSpecError,
    customer_id_in_use,
    git_reverts,
    name_errors,
    parse_spec,
    resource_name_for,
    shown_phase,
)
from iotistic_billing.k8s import (
    FieldManager,
    KubeApi,
    KubernetesUnavailable,
    api_client,
    customer_body,
    refusal_message,
)
from iotistic_billing.operator.entitlement import effective_plan


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    customer = subparsers.add_parser("customer", help="add, upgrade, deactivate and list Customers")
    customer.set_defaults(help_parser=customer)
    commands = customer.add_subparsers(title="customer commands", metavar="COMMAND")

    add = commands.add_parser("add", help="create a Customer resource")
    add.add_argument("--email", required=True)
    add.add_argument("--company", required=True, help="company name")
    add.add_argument("--name", dest="contact", help="contact name")
    add.add_argument("--resource-name", help="name of the Customer resource (default: from the company)")
    add.add_argument(
        "--plan", choices=PLAN_NAMES, default="trial", help="manual billing only (default trial)"
    )
    add.add_argument("--customer-id", help="cust_... (default: derived by the operator)")
    add.add_argument("--trial-days", type=int)
    add.add_argument("--billing", choices=("manual", "stripe"), default="manual")
    add.set_defaults(handler=_add)

    upgrade = commands.add_parser(
        "upgrade", help="change a manually billed Customer's plan (spec.plan; Stripe's come from Stripe)"
    )
    upgrade.add_argument("--id", required=True, help="customer id (cust_...) or resource name")
    upgrade.add_argument("--plan", choices=PLAN_NAMES, required=True)
    upgrade.set_defaults(handler=_upgrade)

    deactivate = commands.add_parser(
        "deactivate", help="suspend a Customer: unlicensed licence, instance scaled to zero"
    )
    deactivate.add_argument("--id", required=True, help="customer id (cust_...) or resource name")
    deactivate.add_argument("--reactivate", action="store_true", help="lift the suspension instead")
    deactivate.set_defaults(handler=_deactivate)

    listing = commands.add_parser("list", help="list Customers")
    listing.add_argument("-o", "--output", choices=("table", "json"), default="table")
    listing.set_defaults(handler=_list)


def _kube() -> KubeApi:
    try:
        return KubeApi(api_client("cli"), FieldManager.CLI)
    except Exception as error:  # no kubeconfig, unreadable file: say how to fix it
        raise CommandError(
            f"cannot reach Kubernetes ({error}); set KUBECONFIG (make dev writes .dev/env)"
        ) from None


def _api_error(error: ApiException | KubernetesUnavailable) -> CommandError:
    if isinstance(error, KubernetesUnavailable) and error.maybe_applied:
        # Not "customer list shows whether it was": it shows the status, which changes only after the
        # operator's pass, not spec.plan or spec.suspended. Each write is safe to repeat: upgrade and
        # deactivate merge-patch the same value, and add finds the Customer made as asked.
        return ServiceUnavailable(
            f"{error}; the change may have been made: running the same command again is safe (it makes the"
            " same change, or finds it made)"
        )
    if isinstance(error, KubernetesUnavailable):
        return ServiceUnavailable(f"{error}; nothing was changed, try again")
    return CommandError(f"the API server refused it ({error.status}): {refusal_message(error)}")


# The option of `customer add` that sets each field: a refusal names what the person typed.
FLAG_OF_FIELD: Final = {
    "spec.email": "--email",
    "spec.companyName": "--company",
    "spec.contactName": "--name",
    "spec.customerId": "--customer-id",
    "spec.trial.days": "--trial-days",
    "spec.plan": "--plan",
    "spec.billing.mode": "--billing",
    "metadata.name": "--resource-name",
}


def flag_problems(problems: list[str]) -> str:
    """`spec.trial.days must be ...` as `--trial-days: must be ...`; a field without a flag as it is."""
    said = []
    for problem in problems:
        field, _, why = problem.partition(" ")
        said.append(f"{FLAG_OF_FIELD[field]}: {why}" if field in FLAG_OF_FIELD else problem)
    return "; ".join(said)


def resource_name_of(args: argparse.Namespace) -> str:
    if given_option(args.resource_name, "--resource-name") is not None:
        return str(args.resource_name)
    # As the API's signup names the same company (`Müller GmbH` -> `muller-gmbh`).
    return resource_name_for(args.company)


# A Stripe-billed Customer's plan is its subscription's (operator/entitlement.py): spec.plan is not read.
STRIPE_PLAN_CHANGE = (
    "the plan of a Stripe-billed Customer comes from its Stripe subscription, not spec.plan: change it "
    "with POST /api/subscriptions/upgrade (POST /api/subscriptions/checkout when it has none)"
)


PROGRESS: Final = "`iotistic-billing customer list` shows its progress"


def _add(args: argparse.Namespace) -> int:
    if args.billing == "stripe" and args.plan != "trial":
        raise CommandError(f"--plan: {STRIPE_PLAN_CHANGE}")
    if args.trial_days is not None and args.billing == "manual" and args.plan != "trial":
        # operator/entitlement.py times a manual Customer's trial only while spec.plan is trial.
        raise CommandError(
            f"--trial-days: a manually billed {args.plan} plan has no trial; "
            "pass it with --plan trial or --billing stripe"
        )
    spec: dict[str, Any] = {
        "email": args.email,
        "companyName": args.company,
        "plan": args.plan,
        "billing": {"mode": args.billing},
    }
    # Empty ones (an unset variable) refused by name: they were dropped, and a Customer made with a
    # derived customer id or no contact.
    if given_option(args.contact, "--name") is not None:
        spec["contactName"] = args.contact
    if given_option(args.customer_id, "--customer-id") is not None:
        spec["customerId"] = args.customer_id
    if args.trial_days is not None:
        spec["trial"] = {"days": args.trial_days}
    try:
        asked = parse_spec(spec)
    except InvalidSpecError as invalid:
        raise CommandError(flag_problems(invalid.problems)) from None
    name = resource_name_of(args)
    if problems := name_errors(name):
        raise CommandError(flag_problems(problems))
    kube = _kube()
    try:
        customers = kube.list_customers()
        if any(made_as_asked(item, name, asked) for item in customers):
            # A retry after an answer that was lost (a 504): the first attempt made it.
            print(f"customer/{name} already exists as asked (plan {args.plan}); {PROGRESS}")
            return 0
        _refuse_taken(customers, args.email, args.customer_id)
        kube.create_customer(customer_body(name, spec))
    except ApiException as error:
        if error.status == 409:  # the name is taken: say which option picks another
            raise CommandError(
                f"--resource-name: customer/{name} already exists; pass another name"
            ) from None
        raise _api_error(error) from None
    except KubernetesUnavailable as error:
        raise _api_error(error) from None
    print(f"customer/{name} created (plan {args.plan}); {PROGRESS}")
    return 0


def made_as_asked(customer: dict[str, Any], name: str, asked: CustomerSpec) -> bool:
    """Whether `customer` is the Customer `customer add` would create: its name and its spec, defaults
    included (a `--trial-days` left out is the default's, not another's)."""
    if customer["metadata"]["name"] != name or customer["metadata"].get("deletionTimestamp"):
        return False
    try:
        return parse_spec(customer.get("spec", {})) == asked
    except InvalidSpecError:
        return False


def _refuse_taken(customers: list[dict[str, Any]], email: str, customer_id: str | None) -> None:
    """As the API's signup: one Customer an email address; and a customer id one Customer's, as two
    holding one would end each other's usage keys (docs/architecture.md)."""
    for item in customers:
        owner = f"customer/{item['metadata']['name']}"
        if str(item.get("spec", {}).get("email", "")).lower() == email.lower():
            raise CommandError(f"--email: {owner} already has {email}")
        if customer_id and customer_id_in_use(item) == customer_id:
            raise CommandError(f"--customer-id: {owner} already holds {customer_id}")


def find_customer(kube: KubeApi, key: str) -> dict[str, Any]:
    """A Customer by resource name or by customer id."""
    if not key.strip():
        # customers/ with no name is the API server's list of every Customer, not a Customer.
        raise CommandError("--id: must not be empty")
    try:
        found = kube.read_customer(key)
        if found is not None:
            return found
        # A Customer being deleted still holds its id, and two live ones hold one while a rename in Git
        # goes through (README.md): only the one left is meant.
        every = [item for item in kube.list_customers() if customer_id_in_use(item) == key]
    except (ApiException, KubernetesUnavailable) as error:
        raise _api_error(error) from None
    holders = [item for item in every if not item["metadata"].get("deletionTimestamp")]
    if len(holders) > 1:
        names = ", ".join(f"customer/{item['metadata']['name']}" for item in holders)
        raise CommandError(f"--id: {names} hold customer id {key}; pass the resource name of the one meant")
    if not holders and every:
        names = ", ".join(f"customer/{item['metadata']['name']}" for item in every)
        raise CommandError(f"--id: customer id {key} is held only by {names}, being deleted")
    if not holders:
        raise CommandError(f"--id: no Customer named or with customer id {key!r}")
    return holders[0]


def _patch_spec(kube: KubeApi, customer: dict[str, Any], spec: dict[str, Any]) -> str:
    name = str(customer["metadata"]["name"])
    try:
        kube.patch_customer(name, {"spec": spec})
    except (ApiException, KubernetesUnavailable) as error:
        raise _api_error(error) from None
    return name


def trial_ended(customer: Mapping[str, Any], now: datetime) -> datetime | None:
    """When the trial that spec.plan trial gives the manually billed `customer` ended, if it has by `now`
    (the operator's rule, operator/entitlement.py: at spec.trial.endsAt, else trial.days from its customer
    id's first licence, which status.trial.endsAt holds as the operator counted it, else from its
    creation); None while it runs, or when the spec does not validate (the operator's condition says why).
    A Customer made again under its customer id counts from its first licence, not its creation."""
    try:
        spec = parse_spec(customer.get("spec") or {})
    except InvalidSpecError:
        return None
    counted = ((customer.get("status") or {}).get("trial") or {}).get("endsAt")
    if spec.trial.ends_at is None and isinstance(counted, str):
        try:
            ends_at = datetime.fromisoformat(counted)
        except ValueError:
            ends_at = None
        if ends_at is not None and ends_at.tzinfo is not None:
            return ends_at if ends_at <= now else None
    created = CustomerMetadata.model_validate(customer["metadata"]).creation_timestamp or now
    # Not suspended: the trial's clock runs under a suspension, which would only hide whether it ended.
    trial = effective_plan(spec.model_copy(update={"plan": "trial", "suspended": False}), created, now)
    return None if trial.trial_active else trial.trial_ends_at


def _warn(message: str) -> None:
    print(f"{PROGRAM}: warning: {message}", file=sys.stderr)


def _warn_if_git_reverts(customer: Mapping[str, Any], field: str) -> None:
    """As the console's customer page and the admin API's revoke: Git (Flux, Argo CD) puts back a spec
    field it owns."""
    if (warning := git_reverts(customer, field)) is not None:
        _warn(warning)


def _upgrade(args: argparse.Namespace) -> int:
    kube = _kube()
    customer = find_customer(kube, args.id)
    name = customer["metadata"]["name"]
    if (customer.get("spec", {}).get("billing") or {}).get("mode") == "stripe":
        raise CommandError(f"--plan: customer/{name}: {STRIPE_PLAN_CHANGE}")
    if args.plan == "trial" and (ended := trial_ended(customer, datetime.now(UTC))) is not None:
        # The CLI has no option for a trial's end: a patch of spec.trial.endsAt gives one (README.md).
        new_end = '{"spec":{"trial":{"endsAt":"<RFC 3339 time>"}}}'
        raise CommandError(
            f"--plan: customer/{name}'s trial ended {ended.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}, so spec.plan"
            f" trial would leave it Expired and unlicensed; give it a new end first: kubectl patch cust"
            f" {name} --type merge -p '{new_end}'"
        )
    was = (customer.get("spec") or {}).get("plan") or "trial"  # CustomerSpec's default
    _patch_spec(kube, customer, {"plan": args.plan})
    print(f"customer/{name}: spec.plan is now {args.plan}; the operator re-mints its licence")
    command = f"{PROGRAM} customer upgrade --plan {args.plan}"
    _post_event(
        kube, customer, "CliUpgrade", f"plan {was} -> {args.plan}", command, f"moved to plan {args.plan}"
    )
    _warn_if_git_reverts(customer, "plan")
    return 0


def _who() -> str:
    """Who ran the command, for its Event: the login name and host (the API server's audit log has the
    Kubernetes user)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name, no passwd entry (a container's arbitrary uid)
        user = "an unknown user"
    return f"{user} on {socket.gethostname()}"


def _post_event(
    kube: KubeApi, customer: Mapping[str, Any], reason: str, what: str, command: str, done: str
) -> None:
    """The Event of a change the CLI made to `customer`, as the console's actions post theirs
    (ConsoleSuspend, ConsoleResume): `what` by `command` and who ran it. Best effort as theirs: the change
    is made, an Event that cannot be posted (no `create events`) is a warning saying it was `done`."""
    try:
        kube.create_event(KIND, customer, reason=reason, message=f"{what} (by `{command}`, {_who()})")
    except (ApiException, KubernetesUnavailable) as error:
        why = refusal_message(error) if isinstance(error, ApiException) else str(error)
        _warn(f"customer/{customer['metadata']['name']} {done}, but its Event was not posted ({why})")


def _deactivate(args: argparse.Namespace) -> int:
    kube = _kube()
    customer = find_customer(kube, args.id)
    name = _patch_spec(kube, customer, {"suspended": not args.reactivate})
    print(f"customer/{name} {'reactivated' if args.reactivate else 'suspended'}")
    action, done = ("Resume", "suspension lifted") if args.reactivate else ("Suspend", "suspended")
    command = f"{PROGRAM} customer deactivate" + (" --reactivate" if args.reactivate else "")
    _post_event(kube, customer, f"Cli{action}", done, command, done)
    _warn_if_git_reverts(customer, "suspended")
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        items = _kube().list_customers()
    except (ApiException, KubernetesUnavailable) as error:
        raise _api_error(error) from None
    rows = [
        {
            "name": item["metadata"]["name"],
            "customerId": customer_id_in_use(item),
            "company": item["spec"].get("companyName", ""),
            "email": item["spec"].get("email", ""),
            "plan": item.get("status", {}).get("plan") or item["spec"].get("plan", ""),
            "phase": shown_phase(item.get("status", {}).get("phase")),
            "trialEnds": (item.get("status", {}).get("trial") or {}).get("endsAt", ""),
        }
        for item in sorted(items, key=lambda i: i["metadata"]["name"])
    ]
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["name", "customerId", "company", "email", "plan", "phase", "trialEnds"])
    return 0
