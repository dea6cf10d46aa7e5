"""Schemathesis (its CLI, pinned in pyproject.toml) against the running server's own OpenAPI document:
every check it has, in its coverage, fuzzing and stateful phases: no 5xx, answers as documented (status,
content type, body, headers), schema-valid requests accepted and invalid ones refused, true `Allow`
headers for methods a path does not take, auth as documented. The server runs as a process with real
settings; the rules the document states only in words are in schemathesis_hooks.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.processes import free_port
from iotistic_billing.webhook_server.route_table import ROUTES
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

REPO = Path(__file__).resolve().parents[2]
# Signup creates real Customer resources, which a running operator would provision with helm: fuzzing
# it would load the whole session. Its validation and answers are covered in test_webhook_admin.py.
EXCLUDED_OPERATION = "create_customer"
# Cases per operation and phase; a fixed seed, so that a failure in CI is the same failure here.
MAX_EXAMPLES = 40
SEED = 20261203


@pytest.fixture(scope="module")
def server(
    database_url: str,
    stripe_mock: StripeMock,
    license_keys: tuple[Path, Path],
    kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    env = server_env(database_url, stripe_mock, license_keys, kubeconfig, free_port())
    # The run sends some 1,700 requests from one address in 10-15 s, past the default bucket (500, then
    # 50 a second): a 429 before the credentials are read fails the auth check (ST401). The limiter has
    # tests of its own (test_webhook_admin.py).
    env["RATE_LIMIT_BURST"] = "100000"
    # Its auth check sends a wrong bearer to each authenticated route: more than the 10 a minute one
    # address may send (test_token_guesses.py has the limit's tests).
    env["WRONG_TOKENS_PER_MINUTE"] = env["WRONG_TOKENS_PER_MINUTE_TOTAL"] = "100000"
    process = ServerProcess(env, tmp_path_factory.mktemp("schemathesis") / "webhooks.log").start()
    try:
        yield process
    finally:
        process.kill()


def test_the_api_keeps_to_its_openapi_document(
    server: ServerProcess, customers: Customers, tmp_path: Path
) -> None:
    # GET /api/customers lists it, and the stateful phase follows the document's links from there to
    # the routes about one customer: cases that reach past the 404 of a random id.
    known = unique_name("fuzzed")
    customers.create(known, customerId=customer_id_for(known), billing={"mode": "stripe"})
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{server.url}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks",
        "all",
        "--exclude-operation-id",
        EXCLUDED_OPERATION,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
        "PYTHONPATH": str(REPO),
        # Hypothesis keeps its example database in ./.hypothesis by default: not in the work tree.
        "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis"),
    }
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    summary = json.loads(report.read_text())
    # Every route but signup and the document itself (which schemathesis leaves out of its own run).
    assert summary["operations"]["tested"] == len(ROUTES) - 2, summary["operations"]
    assert summary["complete"] and not summary["errors"], summary
    print("schemathesis test cases:", summary["test_cases"])
    assert summary["test_cases"]["generated"] >= 1000, summary["test_cases"]
