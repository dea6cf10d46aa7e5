"""The housekeeping daemon's view of its Customer: parsed again only when the object has changed."""

from __future__ import annotations

from typing import Any

import kopf

from iotistic_billing.operator.handlers import CustomerView


def raw(version: str | None, plan: str = "starter", email: str = "ops@acme.example.com") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "acme", "creationTimestamp": "2026-11-30T10:00:00Z"}
    if version is not None:
        metadata["resourceVersion"] = version
    return {
        "apiVersion": "iotistic.io/v1alpha1",
        "kind": "Customer",
        "metadata": metadata,
        "spec": {"email": email, "companyName": "Acme Corp", "plan": plan},
    }


def test_an_unchanged_customer_is_parsed_once() -> None:
    body = raw("7")
    view = CustomerView(kopf.Body(body))
    first = view.current()
    assert first is not None and first.spec.plan == "starter"
    assert view.current() is first


def test_a_new_resource_version_is_parsed_again() -> None:
    body = raw("7")
    view = CustomerView(kopf.Body(body))
    assert view.current() is not None
    body.update(raw("8", plan="professional"))  # Kopf's live body: the same mapping, its content replaced
    current = view.current()
    assert current is not None and current.spec.plan == "professional"


def test_a_body_without_a_version_is_parsed_every_time() -> None:
    body = raw(None)
    view = CustomerView(kopf.Body(body))
    first = view.current()
    assert first is not None and view.current() is not first


def test_a_spec_that_does_not_parse_is_none_until_it_changes() -> None:
    body = raw("7", email="not an address")
    view = CustomerView(kopf.Body(body))
    assert view.current() is None
    body.update(raw("8"))
    assert view.current() is not None
