"""`iotistic-billing customer` against the local control plane, as an operator types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from iotistic_billing.cli.tables import format_table
from iotistic_billing.customer import resource_name_for
from iotistic_billing.k8s import FieldManager, KubeApi
from tests.conftest import OperatorProcess, unique_name, wait_until

pytestmark = pytest.mark.integration


def cli(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iotistic_billing.cli", *args],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
    )


def listed(kubeconfig: Path, name: str) -> dict[str, Any] | None:
    rows = json.loads(cli(kubeconfig, "customer", "list", "-o", "json").stdout)
    return next((row for row in rows if row["name"] == name), None)


def test_add_upgrade_deactivate_and_list(kubeconfig: Path, operator: OperatorProcess) -> None:
    company = unique_name("Wayne Enterprises")
    email = f"bruce@{company.lower().replace(' ', '-')}.example"
    added = cli(
        kubeconfig,
        "customer",
        "add",
        "--email",
        email,
        "--company",
        company,
        "--name",
        "Bruce Wayne",
        "--plan",
        "starter",
    )
    assert added.returncode == 0, added.stderr
    name = company.lower().replace(" ", "-")
    assert f"customer/{name} created" in added.stdout
    row = wait_until(
        lambda: (listed(kubeconfig, name) or {}).get("customerId") and listed(kubeconfig, name),
        message="customer id reported",
    )
    assert (row["plan"], row["company"]) == ("starter", company)

    upgraded = cli(kubeconfig, "customer", "upgrade", "--id", row["customerId"], "--plan", "professional")
    assert upgraded.returncode == 0, upgraded.stderr
    wait_until(
        lambda: (listed(kubeconfig, name) or {}).get("plan") == "professional", message="plan upgraded"
    )

    deactivated = cli(kubeconfig, "customer", "deactivate", "--id", name)
    assert deactivated.returncode == 0, deactivated.stderr
    wait_until(lambda: (listed(kubeconfig, name) or {}).get("phase") == "Suspended", message="suspended")

    table = cli(kubeconfig, "customer", "list").stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "CUSTOMER",
        "ID",
        "COMPANY",
        "EMAIL",
        "PLAN",
        "PHASE",
        "TRIAL",
        "ENDS",
    ]
    assert any(line.startswith(name + " ") and "Suspended" in line for line in table)


def test_bad_input_names_the_field_and_changes_nothing(kubeconfig: Path) -> None:
    refused = cli(kubeconfig, "customer", "add", "--email", "not-an-email", "--company", "Acme")
    assert refused.returncode == 2
    assert refused.stderr.startswith("iotistic-billing: error: --email: must be an email address")
    dotted = cli(
        kubeconfig,
        "customer",
        "add",
        "--email",
        "a@acme.example",
        "--company",
        "Acme",
        "--resource-name",
        "a.b",
    )
    assert dotted.returncode == 2
    assert "--resource-name: must be lowercase letters" in dotted.stderr
    unknown = cli(kubeconfig, "customer", "upgrade", "--id", "cust_doesnotexist", "--plan", "starter")
    assert unknown.returncode == 2 and "--id: no Customer" in unknown.stderr
    # Found in review: an empty --id (an unset variable) read customers/, which the API server answers
    # with the list of every Customer, and the command failed with a traceback.
    for command in (["upgrade", "--plan", "starter"], ["deactivate"]):
        empty = cli(kubeconfig, "customer", *command, "--id", "")
        assert empty.returncode == 2
        assert empty.stderr.strip() == "iotistic-billing: error: --id: must not be empty"


@pytest.mark.parametrize(
    ("company", "expected"), [("Müller GmbH", "muller-gmbh"), ("Société Générale", "societe-generale")]
)
def test_cli_resource_name_matches_signup_for_accented_names(
    kubeconfig: Path, company: str, expected: str
) -> None:
    """Found in review: `customer add` made `m-ller-gmbh` of "Müller GmbH", where the API's signup
    transliterates to `muller-gmbh`: one company, two names depending on the way in."""
    suffix = unique_name("x").removeprefix("x-")
    given = f"{company} {suffix}"
    added = cli(kubeconfig, "customer", "add", "--email", f"ops@{suffix}.example", "--company", given)
    assert added.returncode == 0, added.stderr
    name = f"{expected}-{suffix}"
    assert added.stdout.startswith(f"customer/{name} created"), added.stdout
    assert name == resource_name_for(given)  # the signup's name of the same company
    assert (listed(kubeconfig, name) or {}).get("company") == given
    again = cli(kubeconfig, "customer", "add", "--email", f"it@{suffix}.example", "--company", given)
    assert again.returncode == 2
    assert again.stderr.strip().endswith(
        f"--resource-name: customer/{name} already exists; pass another name"
    )


def test_an_email_or_customer_id_already_taken_is_refused_and_nothing_created(kubeconfig: Path) -> None:
    """Found in review: the API's signup refused a registered email, `customer add` made a second
    Customer of it; and one of another's customer id, whose licences would end each other's usage keys."""
    first = unique_name("first")
    email, customer_id = f"ops@{first}.example", f"cust_{first.replace('-', '')}"
    add = ["customer", "add", "--company", "Taken"]
    assert (
        cli(
            kubeconfig, *add, "--email", email, "--resource-name", first, "--customer-id", customer_id
        ).returncode
        == 0
    )

    second = unique_name("second")
    again = cli(kubeconfig, *add, "--email", email.upper(), "--resource-name", second)
    assert again.returncode == 2
    assert f"--email: customer/{first} already has {email.upper()}" in again.stderr
    held = cli(
        kubeconfig,
        *add,
        "--email",
        f"ops@{second}.example",
        "--resource-name",
        second,
        "--customer-id",
        customer_id,
    )
    assert held.returncode == 2
    assert f"--customer-id: customer/{first} already holds {customer_id}" in held.stderr
    assert listed(kubeconfig, second) is None


def test_a_stripe_billed_customer_s_plan_is_not_changed_with_the_cli(
    kubeconfig: Path, k8s_client: kubernetes.client.ApiClient
) -> None:
    company = unique_name("Stripe Billed")
    name = company.lower().replace(" ", "-")
    add = ["customer", "add", "--email", f"ops@{name}.example", "--company", company, "--billing", "stripe"]
    refused = cli(kubeconfig, *add, "--plan", "starter")
    assert refused.returncode == 2
    assert "--plan: the plan of a Stripe-billed Customer comes from its Stripe subscription" in refused.stderr
    assert "POST /api/subscriptions/checkout" in refused.stderr
    assert listed(kubeconfig, name) is None  # nothing created

    assert cli(kubeconfig, *add).returncode == 0  # its trial, until a checkout
    upgrade = cli(kubeconfig, "customer", "upgrade", "--id", name, "--plan", "professional")
    assert upgrade.returncode == 2
    assert f"--plan: customer/{name}: the plan" in upgrade.stderr
    assert "POST /api/subscriptions/upgrade" in upgrade.stderr
    customer = KubeApi(k8s_client, FieldManager.CLI).read_customer(name)
    assert customer is not None and customer["spec"]["plan"] == "trial"


def test_table_format() -> None:
    text = format_table(
        [{"name": "acme", "plan": "trial"}, {"name": "globex-corp", "plan": None}], ["name", "plan"]
    )
    assert text.splitlines() == ["NAME         PLAN", "acme         trial", "globex-corp"]
    assert format_table([], ["name"]).splitlines() == ["NAME", "(none)"]
