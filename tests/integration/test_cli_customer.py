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
from kubernetes.client.exceptions import ApiException

from iotistic_billing.cli import main
from iotistic_billing.cli.tables import format_table
from iotistic_billing.customer import GROUP, PLURAL, VERSION, resource_name_for
from iotistic_billing.k8s import FieldManager, KubeApi, customer_body
from tests.conftest import OperatorProcess, unique_name, wait_until

pytestmark = pytest.mark.integration

# A finalizer of these tests: a Customer deleted with it stays, being deleted, until it is taken off.
HELD = "tests.iotistic.io/held"


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


def test_add_upgrade_deactivate_and_list(
    kubeconfig: Path, k8s_client: kubernetes.client.ApiClient, operator: OperatorProcess
) -> None:
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
    assert (upgraded.returncode, upgraded.stderr) == (0, "")
    wait_until(
        lambda: (listed(kubeconfig, name) or {}).get("plan") == "professional", message="plan upgraded"
    )
    # Found in review: `customer deactivate` posts an Event, `customer upgrade` posted none, so
    # `kubectl describe` did not say who moved the Customer to another plan, or from which.
    kube = KubeApi(k8s_client, FieldManager.CLI)
    [plan_change] = [event for event in kube.list_customer_events(name) if event["reason"] == "CliUpgrade"]
    assert plan_change["message"].startswith(
        "plan starter -> professional (by `iotistic-billing customer upgrade --plan professional`, "
    )
    assert plan_change["reportingComponent"] == FieldManager.CLI

    deactivated = cli(kubeconfig, "customer", "deactivate", "--id", name)
    assert (deactivated.returncode, deactivated.stderr) == (0, "")
    wait_until(lambda: (listed(kubeconfig, name) or {}).get("phase") == "Suspended", message="suspended")
    # Found in review: the console's Suspend posts an Event on the Customer (`kubectl describe` says who
    # suspended it), `customer deactivate` posted none.
    events = kube.list_customer_events(name)
    suspension = next(event for event in events if event["reason"] == "CliSuspend")
    assert suspension["message"].startswith("suspended (by `iotistic-billing customer deactivate`, ")
    assert suspension["reportingComponent"] == FieldManager.CLI

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

    reactivated = cli(kubeconfig, "customer", "deactivate", "--id", name, "--reactivate")
    assert (reactivated.returncode, reactivated.stderr) == (0, "")
    lifted = [event for event in kube.list_customer_events(name) if event["reason"] == "CliResume"]
    assert [event["message"].split(" (")[0] for event in lifted] == ["suspension lifted"]


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


def hold(kube: KubeApi, name: str, *, held: bool = True) -> None:
    """This test's finalizer put on Customer `name` or taken off, the others (the session operator's,
    when it runs) left as they are."""

    def changed() -> bool:
        body = kube.read_customer(name)
        assert body is not None
        others = [f for f in body["metadata"].get("finalizers", []) if f != HELD]
        version = body["metadata"]["resourceVersion"]
        try:
            finalizers = [*others, HELD] if held else others
            kube.patch_customer(name, {"metadata": {"finalizers": finalizers, "resourceVersion": version}})
        except ApiException as error:
            if error.status == 409:  # the operator changed it meanwhile: read it again
                return False
            raise
        return True

    wait_until(changed, message=f"finalizer {HELD} {'on' if held else 'off'} customer/{name}")


def test_customer_add_run_again_after_a_lost_answer_is_done_not_refused(kubeconfig: Path) -> None:
    """Found in review: after an answer that was lost (a 504: "the change may have been made"), the same
    `customer add` again exited 2 with `--email: customer/<name> already has ...`, though the first had
    made the Customer as asked. One asked otherwise is still refused."""
    name = unique_name("retried")
    add = ["customer", "add", "--email", f"ops@{name}.example", "--company", "Retried"]
    as_asked = [*add, "--resource-name", name, "--trial-days", "7"]
    assert cli(kubeconfig, *as_asked).returncode == 0

    again = cli(kubeconfig, *as_asked)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.startswith(f"customer/{name} already exists as asked (plan trial)")
    otherwise = cli(kubeconfig, *add, "--resource-name", name)  # the default trial, not 7 days
    assert otherwise.returncode == 2
    assert f"--email: customer/{name} already has ops@{name}.example" in otherwise.stderr


def test_an_id_two_customers_hold_is_refused_and_a_customer_being_deleted_is_not_meant(
    kubeconfig: Path, k8s_client: kubernetes.client.ApiClient
) -> None:
    """Found in review: `customer upgrade` and `deactivate --id cust_...` acted on the first Customer
    listed holding the id: two hold one while a rename in Git goes through (README.md), and one being
    deleted still holds it."""
    kube = KubeApi(k8s_client, FieldManager.CLI)
    old, new = unique_name("renamed-from"), unique_name("renamed-to")
    customer_id = f"cust_{old.replace('-', '')}"
    for name in (old, new):
        spec = {"email": f"ops@{name}.example", "companyName": "Renamed", "customerId": customer_id}
        kube.create_customer(customer_body(name, {**spec, "plan": "starter"}))

    both = cli(kubeconfig, "customer", "upgrade", "--id", customer_id, "--plan", "professional")
    assert both.returncode == 2
    assert both.stderr.strip() == (
        f"iotistic-billing: error: --id: customer/{old}, customer/{new} hold customer id {customer_id};"
        " pass the resource name of the one meant"
    )

    # The old one held by a finalizer of this test's: deleted, and still there.
    hold(kube, old)
    kubernetes.client.CustomObjectsApi(k8s_client).delete_cluster_custom_object(GROUP, VERSION, PLURAL, old)
    try:
        held = kube.read_customer(old)
        assert held is not None and held["metadata"].get("deletionTimestamp")
        upgraded = cli(kubeconfig, "customer", "upgrade", "--id", customer_id, "--plan", "professional")
        assert upgraded.returncode == 0, upgraded.stderr
        assert upgraded.stdout.startswith(f"customer/{new}: spec.plan is now professional")
        assert [(kube.read_customer(name) or {})["spec"]["plan"] for name in (old, new)] == [
            "starter",
            "professional",
        ]
        # Held only by one being deleted: said so (a review of the fix: "no Customer ... with customer
        # id" while `customer list` showed it).
        hold(kube, new)
        kubernetes.client.CustomObjectsApi(k8s_client).delete_cluster_custom_object(
            GROUP, VERSION, PLURAL, new
        )
        gone = cli(kubeconfig, "customer", "deactivate", "--id", customer_id)
        assert (gone.returncode, gone.stderr.strip()) == (
            2,
            f"iotistic-billing: error: --id: customer id {customer_id} is held only by customer/{old},"
            f" customer/{new}, being deleted",
        )
    finally:
        hold(kube, old, held=False)
        hold(kube, new, held=False)


def test_upgrade_to_trial_once_the_trial_ended_is_refused_and_nothing_patched(
    kubeconfig: Path, k8s_client: kubernetes.client.ApiClient
) -> None:
    """Found in review: `customer upgrade --plan trial` of a Customer whose trial had ended (from its
    creation, or spec.trial.endsAt) said "spec.plan is now trial; the operator re-mints its licence",
    and the Customer was Expired and unlicensed at once."""
    kube = KubeApi(k8s_client, FieldManager.CLI)
    ended, from_creation, running = (
        unique_name("trial-ended"),
        unique_name("trial-none"),
        unique_name("trial-on"),
    )
    trials = {ended: {"endsAt": "2020-01-02T03:04:05Z"}, from_creation: {"days": 0}, running: {"days": 14}}
    created = {}
    for name, trial in trials.items():
        spec = {"email": f"ops@{name}.example", "companyName": "Trials", "plan": "starter", "trial": trial}
        created[name] = kube.create_customer(customer_body(name, spec))

    for name, ends in (
        (ended, "2020-01-02T03:04:05Z"),
        (from_creation, created[from_creation]["metadata"]["creationTimestamp"]),
    ):
        refused = cli(kubeconfig, "customer", "upgrade", "--id", name, "--plan", "trial")
        assert refused.returncode == 2
        assert refused.stderr.strip() == (
            f"iotistic-billing: error: --plan: customer/{name}'s trial ended {ends}, so spec.plan trial"
            " would leave it Expired and unlicensed; give it a new end first: kubectl patch cust"
            f' {name} --type merge -p \'{{"spec":{{"trial":{{"endsAt":"<RFC 3339 time>"}}}}}}\''
        )
        assert (kube.read_customer(name) or {})["spec"]["plan"] == "starter"

    upgraded = cli(kubeconfig, "customer", "upgrade", "--id", running, "--plan", "trial")
    assert (upgraded.returncode, upgraded.stderr) == (0, "")
    assert (kube.read_customer(running) or {})["spec"]["plan"] == "trial"


def test_a_customer_with_no_status_yet_is_listed_pending_as_the_console_shows_it(
    kubeconfig: Path,
    k8s_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found in review: `customer list` showed `phase: ""` for a Customer the operator had not reported
    on yet, where the console says Pending."""
    name = unique_name("no-status")
    spec = {"email": f"ops@{name}.example", "companyName": "No Status"}
    # As the API server answered its creation: before the operator's first pass, no status.
    created = KubeApi(k8s_client, FieldManager.CLI).create_customer(customer_body(name, spec))
    assert "status" not in created
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(KubeApi, "list_customers", lambda self: [created])
    assert main(["customer", "list", "-o", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["phase"]) == (name, "Pending")


def test_a_suspension_stays_done_when_its_event_cannot_be_posted(
    kubeconfig: Path,
    k8s_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The Event is best effort, as the console's: a refusal to post it (RBAC without events' create)
    neither undoes nor fails the suspension, and is said on stderr."""
    kube = KubeApi(k8s_client, FieldManager.CLI)
    name = unique_name("no-event")
    kube.create_customer(customer_body(name, {"email": f"ops@{name}.example", "companyName": "No Event"}))

    def refused(*_: object, **__: object) -> None:
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(KubeApi, "create_event", refused)
    assert main(["customer", "deactivate", "--id", name]) == 0
    said = capsys.readouterr()
    assert said.out == f"customer/{name} suspended\n"
    assert said.err.startswith(
        f"iotistic-billing: warning: customer/{name} suspended, but its Event was not posted"
    )
    assert (kube.read_customer(name) or {})["spec"]["suspended"] is True


def test_a_plan_change_stays_made_when_its_event_cannot_be_posted(
    kubeconfig: Path,
    k8s_client: kubernetes.client.ApiClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Found in review: `customer upgrade` posted no Event; its Event is best effort as `deactivate`'s:
    a refusal to post it (RBAC without events' create) neither undoes nor fails the plan change, and is
    said on stderr."""
    kube = KubeApi(k8s_client, FieldManager.CLI)
    name = unique_name("no-upgrade-event")
    spec = {"email": f"ops@{name}.example", "companyName": "No Event", "plan": "starter"}
    kube.create_customer(customer_body(name, spec))
    posted: list[dict[str, Any]] = []

    def refused(*_: object, **event: Any) -> None:
        posted.append(event)
        raise ApiException(status=403, reason="Forbidden")

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setattr(KubeApi, "create_event", refused)
    assert main(["customer", "upgrade", "--id", name, "--plan", "professional"]) == 0
    said = capsys.readouterr()
    assert said.out == f"customer/{name}: spec.plan is now professional; the operator re-mints its licence\n"
    assert said.err.startswith(
        f"iotistic-billing: warning: customer/{name} moved to plan professional, but its Event was not posted"
    )
    assert [event["reason"] for event in posted] == ["CliUpgrade"]
    assert (kube.read_customer(name) or {})["spec"]["plan"] == "professional"


def test_a_change_git_reverts_is_warned_of(kubeconfig: Path, k8s_client: kubernetes.client.ApiClient) -> None:
    """Found in review: the console warns that Git (Flux, Argo CD) reverts a suspension of a Customer
    whose spec it owns; `customer deactivate` and `upgrade` said only that they were done."""
    name = unique_name("from-git")
    body = customer_body(name, {"email": f"ops@{name}.example", "companyName": "From Git", "plan": "starter"})
    body["metadata"]["labels"] = {"kustomize.toolkit.fluxcd.io/name": "tenants"}
    KubeApi(k8s_client, FieldManager.CLI).create_customer(body)
    owner = "kustomize.toolkit.fluxcd.io/name=tenants"
    for command, field in (
        (["upgrade", "--id", name, "--plan", "professional"], "spec.plan"),
        (["deactivate", "--id", name], "spec.suspended"),
    ):
        done = cli(kubeconfig, "customer", *command)
        assert done.returncode == 0, done.stderr
        assert done.stderr == (
            f"iotistic-billing: warning: customer/{name}'s spec is managed by GitOps ({owner}): Git"
            f" reverts this change of {field}; change it in Git\n"
        )


def test_table_format() -> None:
    text = format_table(
        [{"name": "acme", "plan": "trial"}, {"name": "globex-corp", "plan": None}], ["name", "plan"]
    )
    assert text.splitlines() == ["NAME         PLAN", "acme         trial", "globex-corp"]
    assert format_table([], ["name"]).splitlines() == ["NAME", "(none)"]
