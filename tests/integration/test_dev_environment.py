"""`make dev`'s runner: prints `ready`, writes .dev/env and .dev/kubeconfig, runs a simulated cluster where
the sample Customers roll out and turn Ready, stops everything on Ctrl-C, and starts again from the kept
data."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
import psutil
import pytest

from iotistic_billing.devenv.controlplane import REPO_BIN
from iotistic_billing.processes import free_port
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

ENV_NAMES = {
    "KUBECONFIG",
    "DATABASE_URL",
    "ADMIN_API_TOKEN",
    "ADMIN_VIEWER_TOKEN",
    "CONSOLE_SESSION_KEY",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_PRICE_STARTER",
    "STRIPE_PRICE_PROFESSIONAL",
    "STRIPE_PRICE_ENTERPRISE",
    "BILLING_URL",
    "SMTP_URL",
    "MAILPIT_URL",
    "NOTIFY_WEBHOOK_ALLOWED_CIDRS",
    "INSTANCE_CHART",
    "INSTANCE_CHART_VERSION",
}


def _start(state: Path, port: int) -> tuple[subprocess.Popen[str], list[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "iotistic_billing.devenv", "--state", str(state), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"dev runner exited early:\n{''.join(lines)}")
        lines.append(line)
        if line.strip() == "ready":
            return process, lines
    raise AssertionError(f"no `ready` line:\n{''.join(lines)}")


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0]
    return values


def _kubectl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args],
        env={**os.environ, "KUBECONFIG": env["KUBECONFIG"]},
        capture_output=True,
        text=True,
    )


def _stop(process: subprocess.Popen[str], burst: bool = False) -> None:
    children = psutil.Process(process.pid).children(recursive=True)
    assert children, "the dev runner started no child process"
    process.send_signal(signal.SIGINT)
    if burst:
        # More signals while it stops, as a double Ctrl-C or `timeout` (the process and its group) send:
        # a handler that took a lock deadlocked in a run of it (5 of 20 runs of a model of it).
        deadline = time.monotonic() + 1
        while process.poll() is None and time.monotonic() < deadline:
            for _ in range(100):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
    # A SIGTERM that lands once Python has restored the default handlers on its way out ends it as -15.
    assert process.wait(60) in ((0, -signal.SIGTERM) if burst else (0,))
    _, alive = psutil.wait_procs(children, timeout=30)
    assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


SAMPLES = ("acme", "globex")


def _phase(env: dict[str, str], name: str) -> str:
    return _kubectl(env, "get", "cust", name, "-o", "jsonpath={.status.phase}").stdout


class DevRun:
    """One `make dev` runner of this module: its state folder, started, stopped and started again."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.process: subprocess.Popen[str] | None = None
        self.output: list[str] = []  # what the runner printed up to `ready`
        self.blocks_run: set[str] = set()  # the README blocks run against it so far
        self.runs: Counter[str] = Counter()  # how often each README block was started against it

    @property
    def env(self) -> dict[str, str]:
        return _read_env(self.state / "env")

    def start(self) -> DevRun:
        self.process, self.output = _start(self.state, free_port())
        return self

    def stop(self, burst: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            _stop(self.process, burst=burst)
        self.process = None


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRun]:
    """One dev environment for this module's tests; the last test stops it and starts it again."""
    run = DevRun(tmp_path_factory.mktemp("devenv") / "dev").start()
    try:
        env = run.env
        # The operator runs and reconciles the sample Customers of manifests/samples, and their instances
        # roll out on the simulated cluster's nodes: phase Ready.
        for sample in SAMPLES:
            wait_until(
                lambda name=sample: (
                    _kubectl(env, "get", "cust", name, "-o", "jsonpath={.status.release.revision}").stdout
                    == "1"
                ),
                timeout=90,
                message=f"sample Customer {sample} provisioned",
            )
        for sample in SAMPLES:
            wait_until(
                lambda name=sample: _phase(env, name) == "Ready",
                timeout=180,
                message=f"sample Customer {sample} Ready; operator log {run.state / 'operator.log'}",
                interval=1,
            )
        yield run
    finally:
        run.stop()


def test_dev_runner_ready_env_and_samples(dev: DevRun) -> None:
    env = dev.env
    assert set(env) >= ENV_NAMES
    assert Path(env["KUBECONFIG"]) == dev.state / "kubeconfig"
    # kubectl, helm and iotistic-billing, as the `next:` line has a person type them.
    assert env["PATH"].split(os.pathsep) == [str(REPO_BIN), str(Path(sys.executable).parent), "$PATH"]
    assert Path(env["KUBECACHEDIR"]) == dev.state / "kube-cache"
    assert _kubectl(env, "get", "namespace", "default").returncode == 0
    # The console's read-only sign-in is a secret of its own, and the runner says where to sign in.
    assert env["ADMIN_VIEWER_TOKEN"] and env["ADMIN_VIEWER_TOKEN"] != env["ADMIN_API_TOKEN"]
    # The operator installs the instance chart from the registry make dev pushed it to.
    assert env["INSTANCE_CHART"].startswith("oci://127.0.0.1:") and env["INSTANCE_CHART_VERSION"] == "0.1.0"
    charts = _kubectl(env, "get", "cust", "acme", "-o", "jsonpath={.status.release.chartVersion}")
    assert charts.stdout == env["INSTANCE_CHART_VERSION"], charts
    console = [line for line in dev.output if line.startswith("console ")]
    assert console and f"{env['BILLING_URL']}/admin/" in console[0], dev.output
    assert "ADMIN_VIEWER_TOKEN" in console[0], console
    # The samples are Ready because their Pods run on the simulated cluster's (kwok's) nodes.
    for sample in SAMPLES:
        ready = _kubectl(
            env, "get", "cust", sample, "-o", 'jsonpath={.status.conditions[?(@.type=="Ready")].status}'
        )
        assert ready.stdout == "True", (sample, ready.stdout, ready.stderr)
        pods = _kubectl(
            env, "get", "pods", "-n", f"customer-{sample}", "-o", "jsonpath={.items[*].spec.nodeName}"
        )
        assert pods.stdout and set(pods.stdout.split()) <= {"kwok-node-0", "kwok-node-1", "kwok-node-2"}, pods
    # The nodes stay Ready past the controller-manager's grace period: kwok renews a Lease for each (without
    # them every Node, and so every instance, went NotReady 50 s after the start).
    leases = _kubectl(
        env, "get", "leases", "-n", "kube-node-lease", "-o", "jsonpath={.items[*].metadata.name}"
    )
    assert set(leases.stdout.split()) >= {"kwok-node-0", "kwok-node-1", "kwok-node-2"}, leases
    # The webhook server answers on BILLING_URL with the admin token of .dev/env.
    request = urllib.request.Request(  # noqa: S310 - loopback
        env["BILLING_URL"] + "/api/queue/stats",
        headers={"Authorization": f"Bearer {env['ADMIN_API_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        assert isinstance(json.loads(response.read()), dict)
    # The dev runner's kubectl (and the operator's helm) cache discovery in the dev state, not in ~/.kube.
    assert list((dev.state / "kube-cache" / "discovery").iterdir())
    # Stripe takes the dev environment's key: the server's start-up line says so (a key stripe-mock
    # refuses made every Stripe call of `make dev` a 401, reported as "not configured").
    log = (dev.state / "webhooks.log").read_text()
    assert "a first call succeeded" in log, log[-2000:]


# ----- the README's examples, against this dev environment -----

README = Path(__file__).resolve().parents[2] / "README.md"
TESTED_BLOCK = re.compile(r"^```bash tested:(?P<name>[a-z-]+)\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)
SHELLS = {"bash", "sh", "shell", "console", "zsh"}
# The README's shell blocks that make test does not run, each with why: every command line of such a
# block (its comment left off) matches the pattern, and each pattern matches one block.
NOT_RUN = {
    r"make (dev|test)": "make dev starts what the dev fixture here starts "
    "(test_a_readme_make_command_runs_what_the_tests_run), and make test is the run these tests are in "
    "(CI's .ci/run)",
    r"make e2e(-kind)?": "make e2e is pytest on tests/e2e, which make test runs; make e2e-kind needs Docker "
    "and kind, which neither this machine nor CI has",
    r"\.venv/bin/python bench/\w+\.py( .*)?": "the benchmarks take minutes on parts of their own and are "
    "run by hand; tests/unit/test_bench_readme.py reads each line's arguments with its script's parser",
    r"(iotistic-billing keys|kubectl (-n iotistic-system|get customers)|helm upgrade iotistic-billing) .*": (
        "the key rotation upgrades the chart's release on a cluster, and the dev environment runs the "
        "operator and the webhook server as processes, without the chart or its Secrets"
    ),
}


def readme_blocks(text: str) -> dict[str, str]:
    return {match["name"]: match["code"] for match in TESTED_BLOCK.finditer(text)}


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Each fenced block of a Markdown text: its info string (`bash tested:env`) and its lines."""
    blocks: list[tuple[str, list[str]]] = []
    info: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if info is None and line.startswith("```"):
            info, lines = line.removeprefix("```").strip(), []
        elif info is not None and line.rstrip() == "```":
            blocks.append((info, lines))
            info = None
        elif info is not None:
            lines.append(line)
    assert info is None, f"a fenced block opened by ```{info} is not closed"
    return blocks


def _json_documents(output: str) -> list[Any]:
    """The JSON values a block printed, one per line that holds one (curl prints no newline after its
    body, so a document can share its line with the next command's first output)."""
    decoder = json.JSONDecoder()
    documents, index = [], 0
    while (start := _next_json(output, index)) != -1:
        try:
            value, index = decoder.raw_decode(output, start)
        except ValueError:
            index = start + 1
            continue
        documents.append(value)
    return documents


def _next_json(output: str, index: int) -> int:
    found = [i for i in (output.find("{", index), output.find("[", index)) if i != -1]
    return min(found, default=-1)


def _check_env(out: str, dev: DevRun) -> None:
    assert re.search(r"^default\s+Active", out, re.MULTILINE), out


def _check_get_customers(out: str, dev: DevRun) -> None:
    header, *rows = out.splitlines()
    columns = ["NAME", "CUSTOMERID", "PLAN", "PHASE", "REASON", "TRIAL-ENDS", "URL", "AGE"]
    assert header.split() == columns, header
    assert {row.split()[0] for row in rows} >= {"acme", "globex"}, out


def _check_queue_stats(out: str, dev: DevRun) -> None:
    (stats,) = _json_documents(out)
    assert set(stats) >= {"Pending", "Provisioning", "Ready", "Failed"}, stats


def _check_signup(out: str, dev: DevRun) -> None:
    (signup,) = _json_documents(out)
    customer = signup["customer"]
    assert re.fullmatch(r"cust_[a-z0-9]+", customer["customer_id"]), signup
    assert (
        customer["email"],
        customer["company_name"],
        customer["full_name"],
        customer["resource_name"],
    ) == (
        "ops@initech.example",
        "Initech",
        "Bill Lumbergh",
        "initech",
    ), signup
    assert signup["subscription"]["plan"] == "trial", signup
    # The dev environment's operator, idle here, mints a new Customer's licence well inside the signup's
    # wait for it (SIGNUP_LICENSE_WAIT, 10 s): the answer is the 201 with the licence, signed with the
    # dev environment's key. (The 202 without one, an operator slower than the wait, is
    # test_webhook_process's, with the wait at 0.) Found in review: a null licence passed.
    assert signup["license"] is not None, signup
    env = dev.env
    claims = jwt.decode(
        signup["license"]["jwt"],
        Path(env["LICENSE_PUBLIC_KEY_PATH"]).read_bytes(),
        algorithms=["RS256"],
        audience="iotistic-instance",
    )
    assert (claims["customerId"], claims["customerName"], claims["plan"]) == (
        customer["customer_id"],
        "Initech",
        "trial",
    ), claims


def _check_checkout(out: str, dev: DevRun) -> None:
    (checkout,) = _json_documents(out)
    assert checkout["session_id"].startswith("cs_"), checkout
    assert checkout["checkout_url"].startswith("https://"), checkout


def _check_reconcile(out: str, dev: DevRun) -> None:
    assert out.splitlines() == [
        "customer.iotistic.io/acme annotated",
        "customer.iotistic.io/acme condition met",
    ], out


def _check_rollout(out: str, dev: DevRun) -> None:
    applied, header, row = out.splitlines()
    assert applied.startswith("instancerollout.iotistic.io/instance-0.2.0 "), applied
    assert header.split() == ["NAME", "VERSION", "STEP", "UPDATED", "HEALTHY", "PHASE", "AGE"], header
    assert row.split()[:6] == ["instance-0.2.0", "0.2.0", "3", "2", "2", "Succeeded"], row


def _check_cli(out: str, dev: DevRun) -> None:
    documents = _json_documents(out)
    assert any(isinstance(d, dict) and d.get("keys") for d in documents), out  # the JWKS
    assert re.search(r"^valid: customer cust_abc123 \(Acme\), plan professional", out, re.MULTILINE), out
    shown = [d["claims"] for d in documents if isinstance(d, dict) and "claims" in d]
    assert shown and shown[0]["plan"] == "professional", out
    assert re.search(r"^hooli\s", out, re.MULTILINE), out  # the list holds the added Customer
    # The upgrade changed the plan (found in review: it was checked by its exit status alone). The list's
    # PLAN is the operator's status.plan once it has one, which may lag the block; the spec does not.
    assert "customer/hooli: spec.plan is now professional;" in out, out
    plan = _kubectl(dev.env, "get", "cust", "hooli", "-o", "jsonpath={.spec.plan}")
    assert plan.stdout == "professional", plan


def _check_usage(out: str, dev: DevRun) -> None:
    ack, again, history, *_ = _json_documents(out)
    # The block's first run against this module's fresh dev environment (nothing else reports for acme
    # there): its report is new, and the only one (found in review: a duplicate passed as well); sent
    # again, it is a duplicate, as the README says (found in review: that was not checked).
    assert dev.runs["usage"] == 1, dev.runs
    assert ack == {"accepted": 1, "duplicate": 0}, ack
    assert again == {"accepted": 0, "duplicate": 1}, again
    assert history["report_count"] == 1, history
    (report,) = history["reports"]
    assert (report["instance_id"], report["active_devices"]) == ("prod-1", 42), report
    # Its report id is the hour the block sent (BEFORE), its period's start.
    assert datetime.fromisoformat(report["report_id"]) == datetime.fromisoformat(report["period_start"])
    customer_id = history["customer_id"]
    # `usage --customer`: the report's day with its 42 devices for an hour (device-hours), and the overage
    # of acme's trial period (10 devices included), not billed: a trial is free.
    # (after the history's JSON on its line: curl ends its body with no newline)
    assert re.search(rf"Usage of {customer_id}\b.*: 30 days, ", out), out
    days = [line.split() for line in out.splitlines() if re.match(r"\d{4}-\d{2}-\d{2}  ", line)]
    assert any(day[2:4] == ["42", "42.000"] for day in days), out
    assert re.search(r"^Billing period \S+ \.\. \S+, plan trial \(", out, re.MULTILINE), out
    # In a month's first hour, the block's last hour was the month before's: the period shown (the one
    # holding now) has no report yet.
    end = datetime.fromisoformat(history["reports"][0]["period_end"])
    overage = "$0.00" if (end.day, end.hour) == (1, 0) else "$64.00"
    if overage == "$64.00":
        assert re.search(r"^devices\s+32\s+\$2\.00 / 1\s+\$64\.00$", out, re.MULTILINE), out
    assert f"\nOverage: {overage}, not billed (plan trial: only paid plans are billed)\n" in out, out
    # `usage --all`: acme's line, its overage in dollars, not billed, and the total of what is.
    (line,) = [line for line in out.splitlines() if line.startswith(customer_id)]
    assert " trial " in line and line.endswith(f"{overage} (not billed)"), line
    assert re.search(
        r"^Overage of every customer's current billing period: \$[0-9,]+\.\d\d", out, re.MULTILINE
    ), out


def _check_notices(out: str, dev: DevRun) -> None:
    log, mail = _json_documents(out)
    assert any(n["kind"] == "license.suspended" for n in log["notices"]), log
    assert [m["Subject"] for m in mail["messages"]] == ["Your Iotistic licence is suspended"], mail


CHECKS: dict[str, Callable[[str, DevRun], None]] = {
    "env": _check_env,
    "get-customers": _check_get_customers,
    "rollout": _check_rollout,
    "queue-stats": _check_queue_stats,
    "signup": _check_signup,
    "checkout": _check_checkout,
    "reconcile": _check_reconcile,
    "cli": _check_cli,
    "notices": _check_notices,
    "usage": _check_usage,
}
# Blocks that show the outcome of asynchronous work (the operator's pass, the notice sender): run again
# until their check holds, as a person would look again.
EVENTUALLY = {"notices": 60.0}
# Blocks that show what another block did: the block the README says comes first is run first when this
# dev environment has not run it (a test run alone with -k, or this module's tests spread over pytest's
# workers, each with a dev environment of its own, as with pytest 9.2: pyproject.toml).
AFTER = {"notices": "cli"}


def test_every_tested_readme_block_has_a_check() -> None:
    text = README.read_text()
    assert list(readme_blocks(text)) == list(CHECKS)
    # A block tagged in a way the pattern does not read (`sh tested:`, `tested:Env`) is no tested block:
    # found in review, it was dropped without a word.
    tagged = [info for info, _ in fenced_blocks(text) if "tested:" in info]
    unread = [info for info in tagged if not re.fullmatch(r"bash tested:[a-z-]+", info)]
    assert len(tagged) == len(TESTED_BLOCK.findall(text)), f"tags the tests do not read: {unread}"


def test_every_readme_shell_block_is_run_or_says_why_not() -> None:
    """Found in review: only blocks tagged `tested:` were run, and an untagged shell block (make dev,
    the benchmarks, make e2e) was neither run nor reported."""
    matched: dict[str, list[list[str]]] = {pattern: [] for pattern in NOT_RUN}
    for info, lines in fenced_blocks(README.read_text()):
        if info.split(" ", 1)[0] not in SHELLS or re.fullmatch(r"bash tested:[a-z-]+", info):
            continue
        commands = [line.partition("#")[0].strip() for line in lines]
        commands = [command for command in commands if command]
        why = [p for p in NOT_RUN if all(re.fullmatch(p, command) for command in commands)]
        assert len(why) == 1, (
            f"README block ```{info} {commands}: tag it tested:<name>, or say in NOT_RUN why not"
        )
        matched[why[0]].append(commands)
    assert {pattern: len(blocks) for pattern, blocks in matched.items()} == dict.fromkeys(NOT_RUN, 1), matched


@pytest.mark.parametrize(
    ("target", "runs"),
    [
        ("dev", ".venv/bin/python -m iotistic_billing.devenv"),  # the runner the dev fixture starts
        ("e2e", ".venv/bin/pytest tests/e2e -q"),
        ("test", ".venv/bin/pytest -q -n 2 --dist loadgroup --durations=15"),
    ],
)
def test_a_readme_make_command_runs_what_the_tests_run(target: str, runs: str) -> None:
    """What NOT_RUN says of the README's make commands: their last step is what these tests run."""
    planned = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", target],
        cwd=README.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert planned[-1] == runs, planned


def test_make_test_runs_every_layer_and_is_what_ci_runs() -> None:
    """What NOT_RUN says of `make test` and `make e2e`: CI runs make test, and its pytest the end-to-end
    tests too."""
    pytest_options = tomllib.loads((README.parent / "pyproject.toml").read_text())["tool"]["pytest"]
    assert pytest_options["ini_options"]["testpaths"] == ["tests/unit", "tests/integration", "tests/e2e"]
    assert (README.parent / ".ci" / "run").read_text().splitlines()[-1] == "make test"


def users_path() -> str:
    """The PATH of a user's shell before `source .dev/env`: this run's without bin/ (the tests put it
    first) and without the virtual environment's scripts, so that the block finds kubectl and
    iotistic-billing by .dev/env or not at all."""
    ours = {REPO_BIN.resolve(), Path(sys.executable).parent.resolve()}
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return os.pathsep.join(f for f in folders if f and Path(f).resolve() not in ours)


def run_readme_block(dev: DevRun, workdir: Path, code: str) -> subprocess.CompletedProcess[str]:
    """The block as a user types it in the repository after `source .dev/env`: here in a folder whose
    `.dev` is this module's dev state, with the PATH a user's shell has."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ".dev").symlink_to(dev.state)
    (workdir / "charts").symlink_to(README.parent / "charts")  # as in a checkout
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail\nsource .dev/env\n{code}"],
        cwd=workdir,
        env={**os.environ, "PATH": users_path()},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("name", list(CHECKS))
def test_readme_example(dev: DevRun, tmp_path: Path, name: str) -> None:
    blocks = readme_blocks(README.read_text())
    code = blocks[name]
    before = AFTER.get(name)
    if before is not None and before not in dev.blocks_run:
        dev.runs[before] += 1
        first = run_readme_block(dev, tmp_path / before, blocks[before])
        assert first.returncode == 0, f"README block {before} exited {first.returncode}:\n{first.stderr}"
        dev.blocks_run.add(before)
    deadline = time.monotonic() + EVENTUALLY.get(name, 0.0)
    attempt = 0
    while True:
        attempt += 1
        dev.runs[name] += 1
        result = run_readme_block(dev, tmp_path / str(attempt), code)
        try:
            assert result.returncode == 0, (
                f"README block {name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
            CHECKS[name](result.stdout, dev)
            dev.blocks_run.add(name)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def test_dev_runner_clean_stop_and_restart(dev: DevRun) -> None:
    env = dev.env
    created = _kubectl(env, "create", "configmap", "kept-between-runs", "--from-literal=a=b")
    assert created.returncode == 0, created.stderr
    # A user's change of a sample's field (another field manager than the samples' apply) stays, and
    # does not fail the next start (found in review: a conflict there failed every start, unexplained).
    changed = _kubectl(env, "patch", "cust", "globex", "--type=merge", "-p", '{"spec":{"plan":"starter"}}')
    assert changed.returncode == 0, changed.stderr
    dev.stop()

    dev.start()
    try:
        again = dev.env
        # A shell that sourced .dev/env before the restart reaches every part after it: the ports are kept
        # (found in review: new ones on every start).
        for name in ("DATABASE_URL", "MAILPIT_URL", "SMTP_URL", "STRIPE_API_BASE", "INSTANCE_CHART"):
            assert again[name] == env[name], name
        assert again["ADMIN_API_TOKEN"] == env["ADMIN_API_TOKEN"]
        assert again["ADMIN_VIEWER_TOKEN"] == env["ADMIN_VIEWER_TOKEN"]
        assert again["CONSOLE_SESSION_KEY"] == env["CONSOLE_SESSION_KEY"]
        kept = _kubectl(again, "get", "configmap", "kept-between-runs", "-o", "jsonpath={.data.a}")
        assert kept.stdout == "b", kept.stderr
        # The kept fake Nodes were taken over (creating them again did not fail the start): the samples
        # stay Ready.
        nodes = _kubectl(again, "get", "nodes", "-l", "type=kwok", "-o", "name")
        assert sorted(nodes.stdout.split()) == [f"node/kwok-node-{index}" for index in range(3)], nodes
        for sample in SAMPLES:
            wait_until(lambda name=sample: _phase(again, name) == "Ready", timeout=60, interval=1)
        plan = _kubectl(again, "get", "cust", "globex", "-o", "jsonpath={.spec.plan}")
        assert plan.stdout == "starter", plan.stderr
    finally:
        dev.stop(burst=True)
