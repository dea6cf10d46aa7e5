"""Schemathesis against the running server's own OpenAPI document: no 5xx, and every answer (status,
content type, body) is one the document describes. The server runs as a process with real settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.processes import free_port
from iotistic_billing.webhook_server.routes import ROUTES
from tests.conftest import unique_name
from tests.integration.webhook_support import (
    ADMIN_TOKEN,
    Customers,
    ServerProcess,
    customer_id_for,
    customers_fixture,  # noqa: F401 - fixtures
    server_env,
)

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Signup creates real Customer resources, which a running operator would provision with helm: fuzzing
# it would load the whole session. Its validation and answers are covered in test_webhook_admin.py.
EXCLUDED = {("POST", "/api/customers")}
EXAMPLES = {GenerationMode.POSITIVE: 12, GenerationMode.NEGATIVE: 6}


@pytest.fixture(scope="module")
def server(
    database_url: str,
    stripe_mock: StripeMock,
    license_keys: tuple[Path, Path],
    kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    env = server_env(database_url, stripe_mock, license_keys, kubeconfig, free_port())
    process = ServerProcess(env, tmp_path_factory.mktemp("schemathesis") / "webhooks.log").start()
    try:
        yield process
    finally:
        process.kill()


def test_the_api_keeps_to_its_openapi_document(
    server: ServerProcess, customers: Customers, tmp_path: Path
) -> None:
    # Hypothesis keeps caches in ./.hypothesis by default: not in the work tree.
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    # Random ids only ever find 404s: half of the cases about a customer name one that exists.
    known = unique_name("fuzzed")
    customers.create(known, customerId=customer_id_for(known), billing={"mode": "stripe"})
    schema = schemathesis.openapi.from_url(f"{server.url}/api/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    tested: list[str] = []
    calls: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in EXCLUDED:
            continue
        raw = operation.definition.raw
        has_inputs = bool(raw.get("parameters") or raw.get("requestBody"))
        for mode, examples in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and not has_inputs:
                continue  # nothing to make invalid

            strategies = [operation.as_strategy(generation_mode=mode)]
            if "{customerId}" in operation.path and mode is GenerationMode.POSITIVE:
                strategies.append(
                    operation.as_strategy(
                        generation_mode=mode, path_parameters={"customerId": customer_id_for(known)}
                    )
                )

            @given(case=st.one_of(strategies))
            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: Any) -> None:
                response = case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS)
                calls[response.status_code] = calls.get(response.status_code, 0) + 1

            exercise()
        tested.append(f"{operation.method.upper()} {operation.path}")
    # Every route but signup and the document itself (which schemathesis leaves out of its own run).
    assert len(tested) == len(ROUTES) - 2, "\n".join(tested)
    print("statuses answered:", dict(sorted(calls.items())))
    assert sum(calls.values()) >= 100 and calls.get(200, 0) > 0 and calls.get(400, 0) > 0
