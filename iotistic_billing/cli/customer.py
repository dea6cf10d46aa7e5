"""`iotistic-billing customer`: add, upgrade, deactivate and list Customer resources (the seed's
customer manager, on the Kubernetes API instead of the database)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from kubernetes.client.exceptions import ApiException

from iotistic_billing.cli import CommandError
from iotistic_billing.cli.tables import print_table
from iotistic_billing.customer import (
    GROUP,
    PLANS,
    PLURAL,
    VERSION,
    InvalidSpecError,
    name_errors,
    parse_spec,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    customer = subparsers.add_parser("customer", help="add, upgrade, deactivate and list Customers")
    customer.set_defaults(help_parser=customer)
    commands = customer.add_subparsers(title="customer commands", metavar="COMMAND")

    add = commands.add_parser("add", help="create a Customer resource")
    add.add_argument("--email", required=True)
    add.add_argument("--company", required=True, help="company name")
    add.add_argument("--name", dest="contact", help="contact name")
    add.add_argument("--resource-name", help="name of the Customer resource (default: from the company)")
    add.add_argument("--plan", choices=PLANS, default="trial")
    add.add_argument("--customer-id", help="cust_... (default: derived by the operator)")
    add.add_argument("--trial-days", type=int)
    add.add_argument("--billing", choices=("manual", "stripe"), default="manual")
    add.set_defaults(handler=_add)

    upgrade = commands.add_parser("upgrade", help="change a Customer's plan (spec.plan)")
    upgrade.add_argument("--id", required=True, help="customer id (cust_...) or resource name")
    upgrade.add_argument("--plan", choices=PLANS, required=True)
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


def _objects() -> Any:
    import kubernetes

    from iotistic_billing.k8s import api_client

    try:
        return kubernetes.client.CustomObjectsApi(api_client())
    except Exception as error:  # no kubeconfig, unreadable file: say how to fix it
        raise CommandError(
            f"cannot reach Kubernetes ({error}); set KUBECONFIG (make dev writes .dev/env)"
        ) from None


def _api_error(error: ApiException) -> CommandError:
    try:
        message = json.loads(error.body or "{}").get("message") or error.reason
    except ValueError:
        message = error.reason
    return CommandError(f"the API server refused it ({error.status}): {message}")


def resource_name_for(company: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", company.lower()).strip("-")[:50].strip("-")
    if not name:
        raise CommandError(f"--company: {company!r} gives no usable resource name; pass --resource-name")
    return name


def _add(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {
        "email": args.email,
        "companyName": args.company,
        "plan": args.plan,
        "billing": {"mode": args.billing},
    }
    if args.contact:
        spec["contactName"] = args.contact
    if args.customer_id:
        spec["customerId"] = args.customer_id
    if args.trial_days is not None:
        spec["trial"] = {"days": args.trial_days}
    try:
        parse_spec(spec)
    except InvalidSpecError as invalid:
        raise CommandError(str(invalid)) from None
    name = args.resource_name or resource_name_for(args.company)
    if problems := name_errors(name):
        raise CommandError("--resource-name: " + "; ".join(problems))
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Customer", "metadata": {"name": name}, "spec": spec}
    try:
        _objects().create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    except ApiException as error:
        raise _api_error(error) from None
    print(f"customer/{name} created (plan {args.plan}); `iotistic-billing customer list` shows its progress")
    return 0


def find_customer(objects: Any, key: str) -> dict[str, Any]:
    """A Customer by resource name or by customer id (spec or status)."""
    try:
        found: dict[str, Any] = objects.get_cluster_custom_object(GROUP, VERSION, PLURAL, key)
        return found
    except ApiException as error:
        if error.status != 404:
            raise _api_error(error) from None
    for item in objects.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]:
        ids = {item.get("spec", {}).get("customerId"), item.get("status", {}).get("customerId")}
        if key in ids:
            return dict(item)
    raise CommandError(f"--id: no Customer named or with customer id {key!r}")


def _patch_spec(key: str, spec: dict[str, Any]) -> str:
    objects = _objects()
    name = str(find_customer(objects, key)["metadata"]["name"])
    try:
        objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, name, {"spec": spec})
    except ApiException as error:
        raise _api_error(error) from None
    return name


def _upgrade(args: argparse.Namespace) -> int:
    name = _patch_spec(args.id, {"plan": args.plan})
    print(f"customer/{name}: spec.plan is now {args.plan}; the operator re-mints its licence")
    return 0


def _deactivate(args: argparse.Namespace) -> int:
    name = _patch_spec(args.id, {"suspended": not args.reactivate})
    print(f"customer/{name} {'reactivated' if args.reactivate else 'suspended'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        items = _objects().list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    except ApiException as error:
        raise _api_error(error) from None
    rows = [
        {
            "name": item["metadata"]["name"],
            "customerId": item.get("status", {}).get("customerId") or item["spec"].get("customerId") or "",
            "company": item["spec"].get("companyName", ""),
            "email": item["spec"].get("email", ""),
            "plan": item.get("status", {}).get("plan") or item["spec"].get("plan", ""),
            "phase": item.get("status", {}).get("phase", ""),
            "trialEnds": (item.get("status", {}).get("trial") or {}).get("endsAt", ""),
        }
        for item in sorted(items, key=lambda i: i["metadata"]["name"])
    ]
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, ["name", "customerId", "company", "email", "plan", "phase", "trialEnds"])
    return 0
