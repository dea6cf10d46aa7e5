"""The operator's watch-fed view of the Customers (what a rollout's tick reads instead of a list)."""

from __future__ import annotations

import asyncio
from typing import Any

import kubernetes
import pytest

from iotistic_billing.customer import GROUP, PLURAL, VERSION
from iotistic_billing.k8s import FieldManager, KubeApi, KubernetesUnavailable
from iotistic_billing.operator.customer_view import CustomerView
from tests.conftest import eventually, unique_name
from tests.integration.test_operator import customer_manifest

pytestmark = pytest.mark.integration


def by_name(bodies: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {body["metadata"]["name"]: body for body in bodies}


async def test_the_view_follows_creation_change_and_deletion(k8s_client: kubernetes.client.ApiClient) -> None:
    api = KubeApi(k8s_client, FieldManager.CLI)
    objects = kubernetes.client.CustomObjectsApi(k8s_client)
    before = unique_name("view-before")
    objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, customer_manifest(before, plan="starter"))
    view = CustomerView(api)
    try:
        listed = by_name(await view.bodies())
        assert before in listed
        assert "managedFields" not in listed[before]["metadata"]

        after = unique_name("view-after")
        objects.create_cluster_custom_object(GROUP, VERSION, PLURAL, customer_manifest(after, plan="starter"))
        objects.patch_cluster_custom_object(GROUP, VERSION, PLURAL, before, {"spec": {"plan": "enterprise"}})

        async def followed() -> bool:
            seen = by_name(await view.bodies())
            return after in seen and seen[before]["spec"]["plan"] == "enterprise"

        await eventually(followed, 20, "the view saw the new Customer and the change")

        objects.delete_cluster_custom_object(GROUP, VERSION, PLURAL, after)

        async def gone() -> bool:
            return after not in by_name(await view.bodies())

        await eventually(gone, 20, "the view dropped the deleted Customer")
    finally:
        view.stop()


async def test_its_own_write_is_seen_at_once_and_an_older_event_does_not_undo_it(
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    api = KubeApi(k8s_client, FieldManager.CLI)
    name = unique_name("view-own")
    created = api.create_customer(customer_manifest(name, plan="starter"))
    view = CustomerView(api)
    try:
        await view.bodies()
        applied = api.apply_customer_annotations(name, {"rollout.iotistic.io/chart-version": "9.9.9"})
        view.saw(applied)
        seen = by_name(await view.bodies())[name]
        assert seen["metadata"]["annotations"]["rollout.iotistic.io/chart-version"] == "9.9.9"
        view.saw(created)  # an older version of it, as a late watch event would bring
        seen = by_name(await view.bodies())[name]
        assert seen["metadata"]["resourceVersion"] == applied["metadata"]["resourceVersion"]
    finally:
        view.stop()


async def test_stop_ends_the_watch_thread(k8s_client: kubernetes.client.ApiClient) -> None:
    view = CustomerView(KubeApi(k8s_client, FieldManager.CLI))
    await view.bodies()
    thread = view._follower._thread
    assert thread is not None and thread.is_alive()
    view.stop()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()


async def test_a_broken_watch_is_said_not_hidden_and_the_view_follows_again(
    k8s_client: kubernetes.client.ApiClient,
) -> None:
    """While the watch is broken and the list fails, a tick gets an error, not an old view; once the
    API server answers again the view lists and follows."""
    api = KubeApi(k8s_client, FieldManager.CLI)
    # A tick waits this long for a list before it fails; not the operator's 30 s, which the test would
    # spend waiting for the first refusal.
    view = CustomerView(api, first_list_seconds=1.0)
    try:
        await view.bodies()

        async def watching() -> bool:
            return view._follower._response is not None

        await eventually(watching, 20, "the view's watch is open")
        real_list, real_watch = api.list_at, api.watch

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise KubernetesUnavailable("the API server answered 503")

        api.list_at = refused  # type: ignore[method-assign]
        api.watch = refused  # type: ignore[method-assign]
        # The connection drops, and the API server refuses for now.
        view._follower._interrupt(view._follower._response)

        async def not_following() -> bool:
            try:
                await view.bodies()
            except KubernetesUnavailable:
                return True
            return False

        await eventually(not_following, 20, "the view says it does not follow")
        api.list_at, api.watch = real_list, real_watch  # type: ignore[method-assign]
        name = unique_name("view-back")
        api.create_customer(customer_manifest(name, plan="starter"))

        async def back() -> bool:
            try:
                return name in by_name(await view.bodies())
            except KubernetesUnavailable:  # not listed again yet: the follower retries after a pause
                return False

        await eventually(back, 30, "the view lists again and follows")
    finally:
        view.stop()
