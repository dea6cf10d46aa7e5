"""The helm processes themselves: none runs past HELM_TIMEOUT (it is killed, with what it started, and its
step is retried), and what a failed helm said reaches conditions without helm's own log lines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.operator import constants as c
from iotistic_billing.operator.charts import ChartStore
from iotistic_billing.operator.context import OperatorContext
from iotistic_billing.operator.helm import (
    TIMED_OUT,
    Helm,
    HelmError,
    helm_error_text,
    helm_runner,
    upgrade_install_args,
)
from iotistic_billing.operator.outcomes import PassOutcome
from iotistic_billing.operator.release import ensure_release
from iotistic_billing.settings import load_settings
from tests.conftest import eventually
from tests.unit.test_instance_chart import INSTANCE_DEPLOYMENTS, LICENCE, DeployedRevisions, release_step
from tests.unit.test_operator_state import target

# Far above the timeouts below: a helm that is not stopped fails the test instead of hanging it.
GUARD_SECONDS = 20

# A helm whose registry or API server never answers, with a child of its own holding helm's output
# (as a plugin or a post-renderer would): both pids go to the file $HELM_STAND_IN_PIDS names.
STAND_IN = """#!/bin/sh
echo $$ >> "$HELM_STAND_IN_PIDS"
sleep 600 &
echo $! >> "$HELM_STAND_IN_PIDS"
wait
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")  # a zombie is gone but for its parent's wait()
    try:
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class StandIn:
    def __init__(self, binary: Path, pids: Path) -> None:
        self.binary = binary
        self.pids = pids
        self.seen: list[int] = []

    def started(self) -> list[int]:
        """The pids of the stand-in helms and their children started since the last call."""
        found = [int(line) for line in self.pids.read_text().split()] if self.pids.exists() else []
        self.pids.unlink(missing_ok=True)
        self.seen += found
        return found


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    binary = tmp_path / "helm"
    binary.write_text(STAND_IN)
    binary.chmod(0o755)
    pids = tmp_path / "pids"
    monkeypatch.setenv("HELM_STAND_IN_PIDS", str(pids))  # helm gets the operator's environment
    helper = StandIn(binary, pids)
    yield helper
    helper.started()
    for pid in helper.seen:  # whatever a failing test left behind (not a pid taken since)
        if alive(pid) and _cmdline(str(pid)).split()[:2] in (["sleep", "600"], ["/bin/sh", str(binary)]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def timeouts(operation: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "iotistic_operator_helm_operations_total", {"operation": operation, "result": TIMED_OUT}
        )
        or 0.0
    )


async def test_every_helm_command_is_killed_with_its_children_at_the_timeout(
    stand_in: StandIn, tmp_path: Path
) -> None:
    """Found in review: `helm pull` from a registry that took the connection and never answered hung
    for minutes, holding a helm slot and the Customer's lock (its deletion waited), logging nothing."""
    helm = Helm(str(stand_in.binary), None, 1, timeout=0.5)
    calls = {
        "pull": lambda: helm.pull("oci://registry.example/charts/instance", "0.2.0", tmp_path),
        "upgrade": lambda: helm.upgrade_install("instance", "customer-acme", tmp_path, {}, "0" * 32),
        "get": lambda: helm.deployments("instance", "customer-acme", 3),
        # A timeout is no "not found": status must not read it as no release, uninstall as none to remove.
        "status": lambda: helm.status("instance", "customer-acme"),
        "uninstall": lambda: helm.uninstall("instance", "customer-acme"),
        "rollback": lambda: helm.rollback("instance", "customer-acme"),
    }
    for operation, call in calls.items():
        # At 0 before any timeout: a series that first appears at 1 is no increase to the alert.
        before = REGISTRY.get_sample_value(
            "iotistic_operator_helm_operations_total", {"operation": operation, "result": TIMED_OUT}
        )
        assert before is not None, operation
        started = time.monotonic()
        async with asyncio.timeout(GUARD_SECONDS):
            with pytest.raises(HelmError) as killed:
                await call()
        took = time.monotonic() - started

        error = killed.value
        assert 0.5 <= took < 5, (operation, took)
        assert (error.command, error.timed_out, error.permanent, error.stuck) == (
            operation,
            True,
            False,
            False,
        )
        assert "did not finish within 0.5 s (HELM_TIMEOUT)" in error.message, error.message
        assert error.message.startswith(f"helm {operation}"), error.message
        pids = stand_in.started()
        assert len(pids) == 2 and gone(pids), (operation, pids)  # helm and the child it started
        assert helm.in_flight == 0
        assert timeouts(operation) == before + 1


async def test_an_upgrade_that_hangs_is_a_retried_upgrade_failure(stand_in: StandIn, tmp_path: Path) -> None:
    step = release_step(Helm(str(stand_in.binary), None, 1, timeout=0.5), tmp_path)
    running = step.release(deployments=list(INSTANCE_DEPLOYMENTS))
    renewed = LICENCE.model_copy(update={"sha256": "b" * 64})  # new values: an upgrade is due

    async with asyncio.timeout(GUARD_SECONDS):
        outcome = await ensure_release(step.ctx, step.aim, renewed, running, may_exist=True)

    assert (outcome.result, outcome.reason, outcome.permanent) == ("failed", c.UPGRADE_FAILED, False)
    assert "helm upgrade --install of release instance in customer-acme did not finish" in outcome.message
    passed = PassOutcome(license=renewed, release=outcome)
    assert passed.stalled_reason is None and passed.failure == outcome.message  # retried, not stalled
    assert gone(stand_in.started())


async def test_a_registry_that_never_answers_is_a_retried_chart_pull_failure(tmp_path: Path) -> None:
    """The real helm against a registry that takes connections and never answers (the review paused
    one with `kill -STOP`): a listening socket nobody reads."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        settings = load_settings(
            instance_chart=f"oci://127.0.0.1:{port}/charts/customer-instance",
            instance_chart_version="0.1.0",
            instance_chart_plain_http=True,
        )
        helm = Helm(str(find_binary("helm")), None, 1, timeout=2)
        cache = tmp_path / "charts"
        ctx = cast(
            OperatorContext,
            SimpleNamespace(
                settings=settings,
                helm=helm,
                kube=DeployedRevisions({}),
                charts=ChartStore(settings, helm, cache),
            ),
        )
        started = time.monotonic()
        async with asyncio.timeout(GUARD_SECONDS):
            outcome = await ensure_release(ctx, target(), LICENCE, None, may_exist=False)
        took = time.monotonic() - started

    assert (outcome.result, outcome.reason, outcome.permanent) == ("failed", c.CHART_PULL_FAILED, False)
    assert outcome.message == (
        f"helm pull of oci://127.0.0.1:{port}/charts/customer-instance 0.1.0 did not finish within 2 s"
        " (HELM_TIMEOUT) and was killed"
    )
    assert 2 <= took < 8, took
    assert helm.in_flight == 0
    # No helm pulling into the cache is left.
    assert not [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and str(cache) in _cmdline(pid) and alive(int(pid))
    ]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# What helm v4.3 wrote to stderr when the API server refused an upgrade (tests/integration/test_helm.py
# checks the real one): its log line repeats the error.
REFUSED_UPGRADE = (
    'level=WARN msg="upgrade failed" name=instance error="failed to create resource: server-side apply'
    ' failed for object customer-acme/x /v1, Kind=ConfigMap: .bogusField: field not declared in schema"\n'
    "Error: UPGRADE FAILED: failed to create resource: server-side apply failed for object"
    " customer-acme/x /v1, Kind=ConfigMap: .bogusField: field not declared in schema\n"
)


class HangingPulls:
    """`Helm.pull` against a registry that never answers: each pull fails, TIMED_OUT, after `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.pulls = 0

    async def pull(self, reference: str, version: str, destination: Path, **_: object) -> None:
        self.pulls += 1
        await asyncio.sleep(self.seconds)
        raise HelmError(f"pull of {reference} {version}", TIMED_OUT, timed_out=True)


async def test_passes_waiting_for_a_pull_that_failed_share_its_failure_instead_of_pulling_again(
    tmp_path: Path,
) -> None:
    """Found in review: the passes that waited for a version's pull each pulled again once it failed, one
    after another, so with a registry that never answers the eighth pass slot was held eight times
    HELM_TIMEOUT (48 minutes at 360 s), and no other Customer's pass started. Those that waited get its
    failure; a pass that comes after it pulls again (the registry may be back)."""
    settings = load_settings(
        instance_chart="oci://registry.example/charts/customer-instance", instance_chart_version="0.1.0"
    )
    helm = HangingPulls(0.2)
    charts = ChartStore(settings, cast(Helm, helm), tmp_path / "charts")
    started = time.monotonic()
    async with asyncio.timeout(GUARD_SECONDS):
        outcomes = await asyncio.gather(*(charts.get("1.3.0") for _ in range(8)), return_exceptions=True)
    assert all(isinstance(outcome, HelmError) and outcome.timed_out for outcome in outcomes), outcomes
    assert helm.pulls == 1 and time.monotonic() - started < 1.5
    # An error each (a later review: one raised again grew its traceback, holding every waiter's frames).
    assert len({id(outcome) for outcome in outcomes}) == 8
    with pytest.raises(HelmError):
        await charts.get("1.3.0")
    assert helm.pulls == 2


@pytest.mark.parametrize(
    ("stderr", "said"),
    [
        (
            REFUSED_UPGRADE,
            "Error: UPGRADE FAILED: failed to create resource: server-side apply failed for object"
            " customer-acme/x /v1, Kind=ConfigMap: .bogusField: field not declared in schema",
        ),
        # With a timestamp too (slog's default text handler), and a warning printed before the error.
        (
            'time=2026-01-02T03:04:05Z level=WARN msg="upgrade failed" error=x\n'
            "WARNING: Kubernetes configuration file is group-readable.\nError: UPGRADE FAILED: x\n",
            "Error: UPGRADE FAILED: x",
        ),
        # An error of several lines keeps them all: the schema's failure paths mark it permanent.
        (
            'level=WARN msg="upgrade failed" error=y\nError: UPGRADE FAILED: values don\'t meet the'
            " specifications of the schema(s) in the following chart(s):\ncustomer-instance:\n"
            "- at '/plan': x\n",
            "Error: UPGRADE FAILED: values don't meet the specifications of the schema(s) in the following"
            " chart(s):\ncustomer-instance:\n- at '/plan': x",
        ),
        # No Error line: the rest of what it said; only log lines: those rather than nothing.
        ("level=INFO msg=starting\nsomething broke\n", "something broke"),
        ('level=ERROR msg="it broke"\n', 'level=ERROR msg="it broke"'),
    ],
)
def test_a_failed_helm_is_reported_without_its_log_lines(stderr: str, said: str) -> None:
    assert helm_error_text(stderr) == said


async def test_helm_s_log_line_does_not_reach_the_error(tmp_path: Path) -> None:
    """Found in review: conditions, Events and rollout failures started with helm's log line and then
    repeated the error."""
    failing = tmp_path / "helm"
    failing.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{REFUSED_UPGRADE}EOF\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(HelmError) as refused:
        await Helm(str(failing), None, 1, timeout=10).upgrade_install(
            "instance", "customer-acme", tmp_path, {}, "0" * 32
        )
    assert refused.value.message.startswith("Error: UPGRADE FAILED: ") and "\n" not in refused.value.message
    assert "level=" not in refused.value.message and refused.value.permanent


def test_the_helm_runner_is_one_per_place_and_apart_for_each_shard_and_peer_on_a_host() -> None:
    """Found in review: the runner named the host and the shard's peering only, which is "" for every
    standalone shard: two shards on one host took each other's pending revisions for their own."""
    places = [(0, "", 0), (1, "", 0), (0, "billing", 0), (1, "billing", 0), (0, "billing", 10)]
    runners = [helm_runner("operator-0", *place) for place in places]
    assert len(set(runners)) == len(places)
    assert helm_runner("operator-0", 1, "", 0) == runners[1] != helm_runner("operator-1", 1, "", 0)


def test_the_operator_s_upgrade_labels_its_revision_with_where_and_in_which_pod_its_helm_ran() -> None:
    """The helm-pod labels let any process tell a pending revision whose Pod is gone or made again, by
    its uid (release.py); outside a Pod (POD_NAME unset) there are none, as a host name there is no Pod's."""
    path = Path("chart")
    uid = "6c1f3a2e-8d4b-4f0a-9e7c-2b5d1a0f3c4e"
    labelled = upgrade_install_args("instance", "customer-a", path, path, "0" * 32, "r1", "operator-0", uid)
    assert labelled[labelled.index("--labels") + 1].split(",") == [
        f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}",
        f"{c.LABEL_VALUES_HASH}={'0' * 32}",
        f"{c.LABEL_HELM_RUNNER}=r1",
        f"{c.LABEL_HELM_POD}=operator-0",
        f"{c.LABEL_HELM_POD_UID}={uid}",
    ]
    unlabelled = upgrade_install_args("instance", "customer-a", path, path, "0" * 32, "r1")
    assert c.LABEL_HELM_POD not in unlabelled[unlabelled.index("--labels") + 1]


def test_the_operator_s_upgrade_forces_the_conflicts_of_fields_another_manager_took() -> None:
    """Found in review: after `kubectl scale deploy instance-api` (kubectl then owns .spec.replicas)
    the API server refused every server-side apply of the upgrades that followed, a suspension's among
    them, retried for ever. The operator owns the release: server-side apply, conflicts forced (helm's
    `auto` applies client-side after a revision applied so, and refuses --force-conflicts there), never
    --force-replace (or helm 3's --force), which helm refuses beside it."""
    path = Path("chart")
    args = upgrade_install_args("instance", "customer-a", path, path, "0" * 32)
    assert "--force-conflicts" in args
    assert args[args.index("--server-side") + 1] == "true"
    assert not {"--force", "--force-replace"} & set(args)


async def test_a_rollback_forces_the_conflicts_of_fields_another_manager_took(tmp_path: Path) -> None:
    """The recovery's rollback applies as an upgrade does: a field `kubectl scale` took refused it too."""
    argv = tmp_path / "argv"
    recording = tmp_path / "helm"
    recording.write_text(f'#!/bin/sh\necho "$@" > {argv}\n')
    recording.chmod(0o755)
    await Helm(str(recording), None, 1, timeout=10).rollback("instance", "customer-acme", 5)
    args = argv.read_text().split()
    assert args[:3] == ["rollback", "instance", "5"] and "--force-conflicts" in args
    assert args[args.index("--server-side") + 1] == "true"
    assert not {"--force", "--force-replace"} & set(args)


@pytest.mark.parametrize(
    "refusal",
    [
        # install, upgrade, upgrade and rollback (helm 4.3.1's pkg/action install.go, upgrade.go,
        # rollback.go).
        "Error: INSTALL FAILED: unable to build kubernetes objects from release manifest",
        "Error: UPGRADE FAILED: unable to build kubernetes objects from new release manifest",
        "Error: UPGRADE FAILED: unable to build kubernetes objects from current release manifest",
    ],
)
def test_a_kind_the_cluster_lacks_stalls_an_upgrade_as_it_does_an_install(refusal: str) -> None:
    """Found in review: only install's wording was permanent, so a chart version adding a ServiceMonitor
    on a cluster without its CRD stalled new installs but retried every upgrade for ever."""
    message = (
        f'{refusal}: resource mapping not found for name: "instance" namespace: "" from "": no matches'
        ' for kind "ServiceMonitor" in version "monitoring.coreos.com/v1"\nensure CRDs are installed first'
    )
    refused = HelmError("upgrade", message)
    assert refused.permanent and not refused.stuck


# helm 4.3.1's stderr, run with --debug, uninstalling a release with an object of a kind whose CRD was
# removed since (a fresh discovery cache); without --debug its last line alone.
UNBUILDABLE_UNINSTALL = (
    'level=DEBUG msg="getting release history" name=instance\n'
    'level=DEBUG msg="uninstall: deleting release" name=instance\n'
    'level=DEBUG msg="updating release" key=sh.helm.release.v1.instance.v1\n'
    'level=DEBUG msg="uninstall: Failed to delete release" error="[unable to build kubernetes objects for'
    ' delete: resource mapping not found for name: \\"instance\\" namespace: \\"\\" from \\"\\": no matches'
    ' for kind \\"ServiceMonitor\\" in version \\"monitoring.coreos.com/v1\\"\\nensure CRDs are installed'
    ' first]"\n'
    "Error: failed to delete release: instance\n"
)


async def test_an_uninstall_that_cannot_build_the_release_s_objects_says_why(tmp_path: Path) -> None:
    """Found in review: helm 4 says only "failed to delete release: instance" when it cannot build the
    objects of a release (a ServiceMonitor whose CRD was removed), why only in its debug log: the
    deletion's Warning said nothing more, and could not be told from the API server away."""
    failing = tmp_path / "helm"
    failing.write_text(
        "#!/bin/sh\ncase \" $* \" in *' --debug '*) cat >&2 <<'EOF'\n"
        f"{UNBUILDABLE_UNINSTALL}EOF\n;; *) echo 'Error: failed to delete release: instance' >&2;; esac\n"
        "exit 1\n"
    )
    failing.chmod(0o755)
    with pytest.raises(HelmError) as refused:
        await Helm(str(failing), None, 1, timeout=10).uninstall("instance", "customer-acme")
    assert refused.value.message == (
        "Error: failed to delete release: instance: unable to build kubernetes objects for delete: resource"
        ' mapping not found for name: "instance" namespace: "" from "": no matches for kind "ServiceMonitor"'
        ' in version "monitoring.coreos.com/v1"\nensure CRDs are installed first'
    )
    assert refused.value.missing_kind and not refused.value.stuck


def test_helm_s_other_failures_are_no_missing_kind() -> None:
    """The API server away or refusing is retried by whatever failed: only NoKindMatchError is a kind the
    cluster lacks."""
    assert not HelmError("uninstall", "Error: uninstall: Kubernetes cluster unreachable").missing_kind
    assert not HelmError("uninstall", "no matches for kind X", timed_out=True).missing_kind
    refused = HelmError(
        "uninstall",
        helm_error_text(
            'level=DEBUG msg="uninstall: Failed to delete release" error="[unable to build kubernetes objects'
            ' for delete: Get \\"https://127.0.0.1:6443/api\\": dial tcp 127.0.0.1:6443: connect: connection'
            ' refused]"\nError: failed to delete release: instance\n'
        ),
    )
    assert refused.message.endswith("connect: connection refused") and not refused.missing_kind


def started_helms(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once a helm's process was started and handed to the call (asyncio's subprocess start, cancelled
    itself, kills the child it just made: a helm that cannot yet have touched a release)."""
    handed = asyncio.Event()
    start = asyncio.create_subprocess_exec

    async def started(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        process = await start(*args, **kwargs)
        handed.set()
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", started)
    return handed


async def test_a_helm_running_when_the_operator_stops_runs_to_its_end_then_the_stop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the CI failure's follow-up: Kopf cancels its handlers 2 s after SIGTERM, the cancelled
    pass left its helm to be killed as the process exited, and the release stayed pending-* until the
    next operator, in a new Pod, waited out HELM_TIMEOUT (6 min) to recover it. A cancelled helm call
    now waits for its helm (cancelled again meanwhile, as stop_tasks does), then raises the cancellation."""
    done = tmp_path / "done"
    binary = tmp_path / "helm"
    binary.write_text(f'#!/bin/sh\nsleep 1\ntouch "{done}"\necho ok\n')
    binary.chmod(0o755)
    helm = Helm(str(binary), None, 1, timeout=GUARD_SECONDS)
    handed = started_helms(monkeypatch)
    call = asyncio.ensure_future(helm._run("status", doing="status"))
    await asyncio.wait_for(handed.wait(), 10)  # cancelled once the helm runs, not before
    call.cancel()
    await asyncio.sleep(0.2)
    call.cancel()  # cancelled again: still waits
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, GUARD_SECONDS)
    assert done.exists(), "the helm was cut off"
    assert helm.in_flight == 0


async def test_a_cancelled_helm_past_the_timeout_is_killed_with_its_children(
    stand_in: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the stop waits for is bounded by HELM_TIMEOUT: a helm that never ends is killed then."""
    helm = Helm(str(stand_in.binary), None, 1, timeout=0.5)
    handed = started_helms(monkeypatch)
    call = asyncio.ensure_future(helm._run("upgrade", doing="upgrade"))
    await asyncio.wait_for(handed.wait(), 10)

    async def running() -> bool:  # the helm and its child
        return stand_in.pids.exists() and len(stand_in.pids.read_text().split()) == 2

    await eventually(running, within=10, interval=0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, GUARD_SECONDS)
    started = stand_in.started()
    assert len(started) == 2 and gone(started), started


async def test_a_pass_stopped_as_its_timed_out_helm_is_reaped_stops(
    stand_in: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: Python 3.11's wait_for returned the killed helm's end that came in with the
    operator's stop and dropped the stop, so a pass whose helm ran past HELM_TIMEOUT, stopped as that helm
    was reaped, went on with its failure (UpgradeFailed) to patch the Customer's status."""
    task: asyncio.Task[Any] | None = None
    start = asyncio.create_subprocess_exec

    async def started(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        process = await start(*args, **kwargs)
        wait = process.wait

        async def reaped() -> int:
            code = await wait()
            assert task is not None
            task.cancel()  # the stop arrives as the killed helm's end does
            return code

        monkeypatch.setattr(process, "wait", reaped)
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", started)
    step = release_step(Helm(str(stand_in.binary), None, 1, timeout=0.5), tmp_path)
    running = step.release(deployments=list(INSTANCE_DEPLOYMENTS))
    renewed = LICENCE.model_copy(update={"sha256": "b" * 64})  # new values: an upgrade is due
    task = asyncio.create_task(ensure_release(step.ctx, step.aim, renewed, running, may_exist=True))
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(GUARD_SECONDS):
            await task
    assert gone(stand_in.started())
