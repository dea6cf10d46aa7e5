"""The console's rollouts page: InstanceRollouts listed with their steps, and Pause, Resume and Abort,
each an audit row; the viewer cannot act, nor a form without the session's CSRF token."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import kubernetes
import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from iotistic_billing.customer import GROUP, VERSION
from iotistic_billing.db.models import ConsoleAction
from iotistic_billing.rollout import ROLLOUT_ABORT, ROLLOUT_PLURAL
from iotistic_billing.webhook_server.context import KUBE
from tests.conftest import unique_name
from tests.integration.console_support import form_fields, post_form, record_predecessor_action, sign_in
from tests.integration.webhook_support import (  # noqa: F401 - fixtures
    ADMIN_TOKEN,
    VIEWER_TOKEN,
    api_fixture,
    eventually,
    webhook_settings_fixture,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def rollouts(k8s_client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(k8s_client)


def create_rollout(rollouts: kubernetes.client.CustomObjectsApi, name: str) -> dict[str, Any]:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InstanceRollout",
        "metadata": {"name": name},
        "spec": {
            "chartVersion": "0.9.0",
            "steps": [{"customers": ["acme", "globex"], "bakeSeconds": 60}, {"percent": 25}, {"rest": True}],
        },
    }
    created: dict[str, Any] = rollouts.create_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, body)
    return created


@pytest.fixture
def rollout(rollouts: kubernetes.client.CustomObjectsApi) -> Iterator[str]:
    """A rollout of every Customer, gone with the test: left behind, it would move the session's
    Customers once a later test restarts the operator on a chart registry (rollouts enabled)."""
    name = unique_name("wave")
    create_rollout(rollouts, name)
    yield name
    rollouts.delete_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name)


def read(rollouts: kubernetes.client.CustomObjectsApi, name: str) -> dict[str, Any]:
    body: dict[str, Any] = rollouts.get_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name)
    return body


async def actions(engine: AsyncEngine, name: str) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(select(ConsoleAction.action).where(ConsoleAction.target == name))
        return [row[0] for row in rows]


async def test_the_admin_sees_the_steps_and_pauses_resumes_and_aborts(
    api: TestClient[Any, Any],
    rollouts: kubernetes.client.CustomObjectsApi,
    rollout: str,
    db_engine: AsyncEngine,
) -> None:
    csrf = await sign_in(api, ADMIN_TOKEN)
    page = await api.get("/admin/rollouts")
    html = await page.text()
    assert page.status == 200 and rollout in html
    for shown in ("canaries: acme, globex", "25%", "the rest", "60 s", ">Pause<", ">Abort<"):
        assert shown in html, shown

    paused = await post_form(api, f"/admin/rollouts/{rollout}/pause", {"csrf": csrf})
    assert paused.status == 303 and read(rollouts, rollout)["spec"]["paused"] is True
    assert ">Resume<" in await (await api.get("/admin/rollouts")).text()
    resumed = await post_form(api, f"/admin/rollouts/{rollout}/resume", {"csrf": csrf})
    assert resumed.status == 303 and read(rollouts, rollout)["spec"]["paused"] is False
    aborted = await post_form(api, f"/admin/rollouts/{rollout}/abort", {"csrf": csrf, "confirm": "yes"})
    assert aborted.status == 303 and ROLLOUT_ABORT in read(rollouts, rollout)["metadata"]["annotations"]
    assert await actions(db_engine, rollout) == ["rollout-pause", "rollout-resume", "rollout-abort"]
    fields = read(rollouts, rollout)["metadata"]["managedFields"]
    assert any(f["manager"] == "iotistic-console" for f in fields)

    missing = await post_form(api, f"/admin/rollouts/{unique_name('none')}/pause", {"csrf": csrf})
    assert missing.status == 404


async def test_the_viewer_and_a_form_without_the_token_change_nothing(
    api: TestClient[Any, Any],
    rollouts: kubernetes.client.CustomObjectsApi,
    rollout: str,
    db_engine: AsyncEngine,
) -> None:
    csrf = await sign_in(api, ADMIN_TOKEN)
    refused = await post_form(api, f"/admin/rollouts/{rollout}/pause", {"csrf": csrf[:-2] + "xx"})
    assert refused.status == 403
    viewer_csrf = await sign_in(api, VIEWER_TOKEN)
    page = await (await api.get("/admin/rollouts")).text()
    assert rollout in page and ">Pause<" not in page
    for action in ("pause", "abort"):
        answer = await post_form(api, f"/admin/rollouts/{rollout}/{action}", {"csrf": viewer_csrf})
        assert answer.status == 403, action
    body = read(rollouts, rollout)
    assert body["spec"]["paused"] is False and ROLLOUT_ABORT not in (
        body["metadata"].get("annotations") or {}
    )
    assert await actions(db_engine, rollout) == []


async def test_an_action_on_a_name_no_rollout_can_have_is_a_404_and_no_row(
    api: TestClient[Any, Any], db_engine: AsyncEngine
) -> None:
    """Found in review: the audit row of a name with NUL (which PostgreSQL text cannot hold) or longer
    than its column was written before the rollout was looked for, and the answer was a 500."""
    csrf = await sign_in(api, ADMIN_TOKEN)
    prefix = unique_name("wave")
    # NUL, and 263 characters: more than a Kubernetes name (253) and than the audit row's target (255).
    for name in (prefix + "%00b", prefix + "a" * 250):
        answer = await post_form(api, f"/admin/rollouts/{name}/pause", {"csrf": csrf})
        text = await answer.text()
        assert answer.status == 404, text
        assert "InstanceRollout not found" in text, text
    async with db_engine.connect() as connection:
        targets = select(ConsoleAction.target).where(ConsoleAction.target.startswith(prefix))
        assert (await connection.execute(targets)).all() == []


async def test_the_rollouts_page_shows_each_rollout_s_console_actions(
    api: TestClient[Any, Any],
    rollouts: kubernetes.client.CustomObjectsApi,
    rollout: str,
    db_engine: AsyncEngine,
) -> None:
    """Found in review: the audit rows of Pause, Resume and Abort were shown on no page."""
    created = datetime.fromisoformat(read(rollouts, rollout)["metadata"]["creationTimestamp"])
    # A deleted rollout's of the same name, recorded before this one was created.
    await record_predecessor_action(
        db_engine, created, "rollout-abort", "aborted the deleted one", target=rollout
    )
    csrf = await sign_in(api, ADMIN_TOKEN)
    assert (await post_form(api, f"/admin/rollouts/{rollout}/pause", {"csrf": csrf})).status == 303
    page = await (await api.get("/admin/rollouts")).text()
    section = page.partition(f'id="rollout-{rollout}"')[2].partition("</section>")[0]
    assert f"InstanceRollout {rollout} paused" in section, page
    assert "aborted the deleted one" not in section


async def rollout_forms(api: TestClient[Any, Any], name: str) -> dict[str, dict[str, str]]:
    """The fields of the rollout's Pause and Abort forms on the page, as it holds them now (Resume's are
    Pause's, sent to its action), Abort's confirmation checked."""
    forms = {
        action: await form_fields(api, "/admin/rollouts", f"/admin/rollouts/{name}/{action}")
        for action in ("pause", "abort")
    }
    forms["resume"] = forms["pause"]
    forms["abort"]["confirm"] = "yes"
    return forms


def untouched(rollouts: kubernetes.client.CustomObjectsApi, name: str) -> None:
    body = read(rollouts, name)
    assert not body["spec"].get("paused") and ROLLOUT_ABORT not in (body["metadata"].get("annotations") or {})


async def test_a_finished_rollout_is_neither_paused_resumed_nor_aborted(
    api: TestClient[Any, Any],
    rollouts: kubernetes.client.CustomObjectsApi,
    rollout: str,
    db_engine: AsyncEngine,
) -> None:
    """Found in review: a page shown before the rollout finished aborted it once it had Succeeded (the
    buttons are hidden then, the server did not check): the annotation stayed, and a run for a new
    chartVersion weeks later ended Aborted at once."""
    await sign_in(api, ADMIN_TOKEN)
    forms = await rollout_forms(api, rollout)
    rollouts.patch_cluster_custom_object_status(
        GROUP, VERSION, ROLLOUT_PLURAL, rollout, {"status": {"phase": "Succeeded", "targetVersion": "0.9.0"}}
    )
    for action, fields in forms.items():
        answer = await post_form(api, f"/admin/rollouts/{rollout}/{action}", fields)
        problem = await answer.json()
        assert (answer.status, problem["error"]) == (409, "InstanceRollout already Succeeded"), problem
    untouched(rollouts, rollout)
    assert await actions(db_engine, rollout) == []


async def made_again(rollouts: kubernetes.client.CustomObjectsApi, name: str) -> None:
    """The rollout deleted and applied again under its name: another uid."""
    rollouts.delete_cluster_custom_object(GROUP, VERSION, ROLLOUT_PLURAL, name)

    def gone() -> bool:
        try:
            read(rollouts, name)
        except kubernetes.client.exceptions.ApiException as error:
            return error.status == 404
        return False

    await eventually(gone, message=f"{name} deleted")
    create_rollout(rollouts, name)


async def test_an_action_from_the_page_of_a_deleted_rollout_leaves_the_one_made_again_alone(
    api: TestClient[Any, Any],
    rollouts: kubernetes.client.CustomObjectsApi,
    rollout: str,
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: Pause, Resume and Abort named the rollout only, so a page left open on it acted on
    one deleted and applied again under its name since. Refused when read, and (a re-creation between
    the read and the patch) by the API server, the patch naming the uid read."""
    await sign_in(api, ADMIN_TOKEN)
    forms = await rollout_forms(api, rollout)
    assert forms["pause"]["uid"] == read(rollouts, rollout)["metadata"]["uid"]
    read_before = read(rollouts, rollout)
    await made_again(rollouts, rollout)
    for action, fields in forms.items():
        answer = await post_form(api, f"/admin/rollouts/{rollout}/{action}", fields)
        problem = await answer.json()
        assert answer.status == 409, (action, problem)
        assert "re-created since this page was shown" in problem["message"], (action, problem)

    async def read_before_the_re_creation(_: str) -> dict[str, Any]:
        return read_before

    monkeypatch.setattr(api.app[KUBE], "read_rollout", read_before_the_re_creation)
    for action, fields in forms.items():
        answer = await post_form(api, f"/admin/rollouts/{rollout}/{action}", fields)
        problem = await answer.json()
        assert answer.status == 409, (action, problem)
        assert "re-created since this page was shown" in problem["message"], (action, problem)
    untouched(rollouts, rollout)
    assert await actions(db_engine, rollout) == []
