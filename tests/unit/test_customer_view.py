"""The Customer view's bookkeeping: which of two bodies of a Customer it keeps (no API server here)."""

from __future__ import annotations

import threading
from typing import Any, cast

from iotistic_billing.k8s import KubeApi
from iotistic_billing.operator.customer_view import CustomerView


def body(name: str, version: int, plan: str = "starter") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": str(version), "managedFields": [{"manager": "x"}]},
        "spec": {"plan": plan},
    }


def kept(view: CustomerView) -> dict[str, tuple[str, str]]:
    return {name: (b["metadata"]["resourceVersion"], b["spec"]["plan"]) for name, b in view._bodies.items()}


def view() -> CustomerView:
    """A view as once a rollout has ticked (its thread started; here one that never runs)."""
    v = CustomerView(cast(KubeApi, object()))
    v._follower._thread = threading.Thread(target=lambda: None)
    return v


def test_a_view_no_rollout_has_started_keeps_no_write() -> None:
    """Every pass hands its status write to the view; before a rollout starts it, nothing is kept (its
    list will have them), so an operator without rollouts holds no copy of the fleet."""
    v = CustomerView(cast(KubeApi, object()))
    v.saw(body("acme", 12))
    assert kept(v) == {}


def test_the_newer_body_wins_whichever_arrives_first() -> None:
    v = view()
    v.saw(body("acme", 12, "enterprise"))  # our own write's answer
    v._keep(body("acme", 11))  # the watch, late
    assert kept(v) == {"acme": ("12", "enterprise")}
    assert "managedFields" not in v._bodies["acme"]["metadata"]


def test_a_relist_keeps_what_this_process_wrote_after_the_list() -> None:
    v = view()
    v._relisted([body("acme", 5), body("globex", 6)], "10")
    v.saw(body("acme", 14, "enterprise"))  # written while the next list was in flight
    v.saw(body("initech", 15))  # created after that list
    v._relisted([body("acme", 9), body("globex", 6)], "12")
    assert kept(v) == {"acme": ("14", "enterprise"), "globex": ("6", "starter"), "initech": ("15", "starter")}
    v._relisted([body("acme", 14, "enterprise")], "20")  # globex and initech deleted before this list
    assert kept(v) == {"acme": ("14", "enterprise")}


def test_a_deleted_customer_does_not_come_back_from_an_older_body() -> None:
    v = view()
    v._keep(body("acme", 5))
    v._forget(body("acme", 8))
    v.saw(body("acme", 7))  # an answer older than the deletion
    assert kept(v) == {}
    v._keep(body("acme", 9))  # created again under the same name
    assert kept(v) == {"acme": ("9", "starter")}
