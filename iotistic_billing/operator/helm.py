"""The real helm CLI as asyncio subprocesses, bounded by a semaphore (no blocking call in the loop)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from iotistic_billing.operator import constants as c
from iotistic_billing.operator.metrics import HELM_IN_FLIGHT, HELM_OPERATIONS
from iotistic_billing.workers import to_the_end

log = logging.getLogger(__name__)

# Errors helm reports for input it will refuse again: retrying the same values cannot help.
_PERMANENT_MARKERS = (
    "values don't meet the specifications of the schema",
    "at '/",  # JSON-schema failure paths
    "parse error",
    # An object of a kind the cluster lacks (a ServiceMonitor without its CRD), in helm 4's wordings:
    # install's "from release manifest", upgrade's and rollback's "from new/current release manifest"
    # (a stuck release's recovery by rollback is retried all the same: release.ensure_release).
    "unable to build kubernetes objects from",
    "is invalid:",
    "field not declared in schema",  # server-side apply of an object with an unknown field
    "error converting yaml to json",
    "chart requires kubeversion",
)
_STUCK_MARKER = "another operation (install/upgrade/rollback) is in progress"
# A kind the cluster lacks now (a CRD removed since the release was made), as the API server's discovery
# tells helm when it builds a release's objects (k8s.io/apimachinery's NoKindMatchError).
_MISSING_KIND_MARKER = "no matches for kind"
# `uninstall: Release not loaded: <name>: release: not found` (helm's storage/driver.ErrReleaseNotFound).
_RELEASE_NOT_FOUND = "release: not found"
# The result label of iotistic_operator_helm_operations_total for a helm killed at HELM_TIMEOUT (the
# chart's PrometheusRule alerts on it).
TIMED_OUT = "timeout"
# The commands the operator runs (the first argument, the `operation` label).
_COMMANDS = ("pull", "upgrade", "get", "status", "uninstall", "rollback")
# helm v4 logs through Go's slog before it prints its error, and the log line repeats that error:
# `level=WARN msg="upgrade failed" name=instance error="..."`.
_LOG_LINE = re.compile(r"^(?:time=\S+ )?level=[A-Z]+ msg=")
# helm v4's uninstall says only `failed to delete release: <name>`; why is in its debug log line alone
# (pkg/action/uninstall.go), a Go-quoted list of errors: `error="[unable to build kubernetes objects
# for delete: ...]"`.
_DELETE_FAILED = re.compile(r'msg="uninstall: Failed to delete release" error=("(?:[^"\\]|\\.)*")')


class HelmError(Exception):
    def __init__(self, command: str, message: str, *, timed_out: bool = False) -> None:
        super().__init__(f"helm {command} failed: {message}")
        self.command = command
        self.message = message
        # Killed at HELM_TIMEOUT: whatever it was waiting for may answer on the next pass.
        self.timed_out = timed_out
        lowered = message.lower()
        self.permanent = not timed_out and any(marker in lowered for marker in _PERMANENT_MARKERS)
        self.stuck = not timed_out and _STUCK_MARKER in lowered
        # An object of the release is of a kind the cluster lacks: its objects are gone with its CRD, and
        # helm cannot build the release's objects (an uninstall fails so every try).
        self.missing_kind = not timed_out and _MISSING_KIND_MARKER in lowered


def helm_error_text(stderr: str) -> str:
    """What a failed helm said went wrong, for conditions and Events: from its first `Error:` line on,
    without helm's own log lines (which repeat the error before it); the whole of it when that leaves
    nothing. A failed uninstall's cause, in its debug log line alone, is added after it."""
    lines = [line for line in stderr.strip().splitlines() if not _LOG_LINE.match(line)]
    errors = next((index for index, line in enumerate(lines) if line.startswith("Error:")), 0)
    said = "\n".join(lines[errors:]).strip() or stderr.strip()
    cause = _DELETE_FAILED.search(stderr)
    if cause is None:
        return said
    try:
        why = str(json.loads(cause.group(1)))
    except ValueError:  # an escape Go has and JSON lacks (\x..): as it was written
        why = cause.group(1)[1:-1]
    if why.startswith("[") and why.endswith("]"):
        why = why[1:-1]
    return f"{said}: {why}"


@dataclass(frozen=True)
class HelmRelease:
    name: str
    namespace: str
    revision: int
    status: str
    chart_version: str
    # The Deployments of the release's manifest: what readiness waits for and drift brings back.
    deployments: tuple[str, ...] = ()
    # When its revision's operation began (helm's info.last_deployed): the age of a pending revision.
    last_deployed: datetime | None = None


# A manifest's Deployment document, and its metadata block (parsed alone: a whole document costs ten times
# as much, and this runs after every install).
_DEPLOYMENT_KIND = re.compile(r"^kind: *Deployment *$", re.MULTILINE)
_METADATA_BLOCK = re.compile(r"^metadata:[ \t]*\n((?:(?:[ \t]+.*)?\n)*)", re.MULTILINE)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def manifest_deployments(manifest: str, release: str, namespace: str) -> tuple[str, ...]:
    """The names of the release's Deployments in its manifest (helm's YAML documents), sorted: those the
    operator follows, labelled `app.kubernetes.io/instance: <release>` in the release's namespace. Any
    other Deployment a chart has would never be seen present, and would be upgraded for on every pass."""
    names = []
    for document in manifest.split("\n---"):
        if not _DEPLOYMENT_KIND.search(document):
            continue
        block = _METADATA_BLOCK.search(document + "\n")
        try:
            text = "metadata:\n" + block.group(1) if block else document
            parsed = yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 - a safe loader, the C one if built
        except yaml.YAMLError:
            continue  # helm installed it, so it parses as a whole; a block cut oddly is left out
        meta = parsed.get("metadata") if isinstance(parsed, dict) else None
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            continue
        labels = meta.get("labels")
        if (
            isinstance(labels, dict)
            and labels.get("app.kubernetes.io/instance") == release
            and meta.get("namespace") in (None, namespace)
        ):
            names.append(meta["name"])
    return tuple(sorted(names))


def chart_version(chart: Path) -> str:
    """Read once per change of Chart.yaml (every pass asks)."""
    chart_file = chart / "Chart.yaml"
    return _chart_version(chart_file, chart_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _chart_version(chart_file: Path, _mtime_ns: int) -> str:
    return str(yaml.safe_load(chart_file.read_text())["version"])


def chart_values_schema(chart: Path) -> dict[str, Any] | None:
    """The chart's values.schema.json, read once per change of it; None when the chart has none (helm
    then checks no value) or it is not a JSON object (helm says why when it installs)."""
    schema_file = chart / "values.schema.json"
    try:
        mtime_ns = schema_file.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return _chart_values_schema(schema_file, mtime_ns)


@functools.lru_cache(maxsize=16)
def _chart_values_schema(schema_file: Path, _mtime_ns: int) -> dict[str, Any] | None:
    try:
        schema = json.loads(schema_file.read_text())
    except ValueError:
        return None
    return schema if isinstance(schema, dict) else None


def helm_environment() -> dict[str, str]:
    """The environment of every helm process (the reconcile benchmark's baseline uses it too).

    GOGC=400 unless set: a helm process lives a fraction of a second, and Go's default collector
    (GOGC=100) spent a fifth of its CPU (bench/README.md).
    """
    return {"GOGC": "400", **os.environ, "HELM_MAX_HISTORY": "5"}


def helm_runner(host: str, shard: int, peering: str, priority: int) -> str:
    """The label value naming where helm runs: the operator's host (its Pod's name), shard, peering and
    priority, the same across restarts of the process there and apart for each replica and shard (two
    operators on one host with all four alike are one too many: each takes the other's for its own)."""
    return hashlib.sha256(f"{host}/{shard}/{peering}/{priority}".encode()).hexdigest()[:20]


# Server-side apply that takes over any field another manager holds (`kubectl scale`, `kubectl edit`):
# the operator owns its releases. `true`, not helm's `auto`, which applies client-side when the revision
# before was so applied (installed by helm 3, or by hand with --server-side=false), and refuses
# --force-conflicts there. Never --force-replace (helm 3's --force): it deletes and re-creates what it
# cannot patch, and cannot be combined with --force-conflicts.
SERVER_SIDE_APPLY = ("--server-side", "true", "--force-conflicts")


def upgrade_install_args(
    name: str,
    namespace: str,
    chart: Path,
    values_file: Path,
    values_hash: str,
    runner: str = "",
    pod: str = "",
    pod_uid: str = "",
) -> list[str]:
    """The operator's `helm upgrade --install` (the reconcile benchmark's baseline runs the same).

    Without client-side OpenAPI validation: it downloads and parses the API server's OpenAPI document in
    every helm process (much of an install's CPU, bench/README.md), while the server-side apply that
    follows validates every object against the same schema anyway.

    The operator owns the release (SERVER_SIDE_APPLY): a field another manager took since (a `kubectl
    scale` owns the Deployment's .spec.replicas) made the API server refuse every later upgrade, a
    suspension's 0 replicas among them, retried for ever.
    """
    return [
        "upgrade",
        "--install",
        name,
        str(chart),
        "--namespace",
        namespace,
        "--values",
        str(values_file),
        "--history-max",
        "5",
        "--disable-openapi-validation",
        *SERVER_SIDE_APPLY,
        # On helm's storage Secrets too, where the operator's server-side filtered watch sees them.
        # The hash lets a pass whose status write was lost (a crash after helm) see that the newest
        # revision is already the one it wants (release.py).
        "--labels",
        f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY},{c.LABEL_VALUES_HASH}={values_hash}"
        + (f",{c.LABEL_HELM_RUNNER}={runner}" if runner else "")
        + (f",{c.LABEL_HELM_POD}={pod}" if pod else "")
        + (f",{c.LABEL_HELM_POD_UID}={pod_uid}" if pod and pod_uid else ""),
        "--output",
        "json",
    ]


class Helm:
    def __init__(
        self,
        binary: str,
        kubeconfig: str | None,
        concurrency: int,
        *,
        timeout: float,
        runner: str = "",
        pod: str = "",
        pod_uid: str = "",
    ) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self._slots = asyncio.Semaphore(concurrency)
        self.in_flight = 0
        # HELM_TIMEOUT: a helm waiting on a registry or an API server that never answers held its slot
        # and its Customer's lock (which a deletion waits for) for as long as it hung.
        self.timeout = timeout
        # helm_runner of this process, and when it started: a revision with this label that began before
        # was begun by the process before it here, killed with its helm (begun_by_predecessor).
        self.runner = runner
        self.started = datetime.now(UTC)
        # The operator's Pod (POD_NAME and POD_UID; "" outside one): a revision naming a Pod that is gone
        # or was made again lost its helm, whichever process looks (helm_pod_gone).
        self.pod = pod
        self.pod_uid = pod_uid
        for command in _COMMANDS:  # at 0 from the start: a series born at 1 is no increase to Prometheus
            HELM_OPERATIONS.labels(command, TIMED_OUT)

    async def _run(self, *args: str, doing: str) -> str:
        """helm with `args`; `doing` names what it does (`pull of <chart> <version>`) in the error of a
        helm that did not finish within the timeout."""
        argv = [self.binary, *args]
        if self.kubeconfig:
            argv += ["--kubeconfig", self.kubeconfig]
        async with self._slots:
            self.in_flight += 1
            HELM_IN_FLIGHT.inc()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=helm_environment(),
                )
                try:
                    # Run to its end through a cancellation (the operator stopping: Kopf cancels its
                    # handlers 2 s after SIGTERM): a helm cut off leaves its release pending-*, which the
                    # next operator in another Pod recovers only after HELM_TIMEOUT (release.py).
                    stdout, stderr = await to_the_end(_communicate(process, self.timeout))
                except asyncio.CancelledError:
                    # Still running: HELM_TIMEOUT came first, or the wait itself was cancelled.
                    if process.returncode is None:
                        await _kill(process)
                        log.warning("helm %s was killed unfinished as the operator stopped", doing)
                    raise
                except TimeoutError:
                    await _kill(process)
                    HELM_OPERATIONS.labels(args[0], TIMED_OUT).inc()
                    message = (
                        f"helm {doing} did not finish within {self.timeout:g} s (HELM_TIMEOUT) and was killed"
                    )
                    log.warning("%s", message)
                    raise HelmError(args[0], message, timed_out=True) from None
            finally:
                self.in_flight -= 1
                HELM_IN_FLIGHT.dec()
        HELM_OPERATIONS.labels(args[0], "success" if process.returncode == 0 else "failure").inc()
        if process.returncode != 0:
            raise HelmError(
                args[0],
                helm_error_text(stderr.decode(errors="replace")) or f"exit code {process.returncode}",
            )
        return stdout.decode()

    async def pull(
        self,
        reference: str,
        version: str,
        destination: Path,
        *,
        plain_http: bool = False,
        registry_config: Path | None = None,
    ) -> None:
        """`helm pull` of one version of an OCI chart, unpacked under `destination`; with the registry's
        credentials from `registry_config` (a Docker config JSON) when given."""
        args = ["pull", reference, "--version", version, "--untar", "--destination", str(destination)]
        if registry_config is not None:
            args += ["--registry-config", str(registry_config)]
        await self._run(
            *args, *(["--plain-http"] if plain_http else []), doing=f"pull of {reference} {version}"
        )

    async def upgrade_install(
        self, name: str, namespace: str, chart: Path, values: dict[str, Any], values_hash: str
    ) -> HelmRelease:
        """`helm upgrade --install` without --wait: readiness is judged from the Deployments later."""
        with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="values-") as values_file:
            json.dump(values, values_file)
            values_file.flush()
            out = await self._run(
                *upgrade_install_args(
                    name,
                    namespace,
                    chart,
                    Path(values_file.name),
                    values_hash,
                    self.runner,
                    self.pod,
                    self.pod_uid,
                ),
                doing=f"upgrade --install of release {name} in {namespace}",
            )
        return _release(json.loads(out))

    async def deployments(self, name: str, namespace: str, revision: int) -> tuple[str, ...]:
        """The Deployments of revision `revision`'s manifest (`helm get manifest`), parsed as after an
        install: for a release whose status does not list them (release.py)."""
        manifest = await self._run(
            "get",
            "manifest",
            name,
            "--namespace",
            namespace,
            "--revision",
            str(revision),
            doing=f"get manifest of release {name} in {namespace}",
        )
        return manifest_deployments(manifest, name, namespace)

    async def status(self, name: str, namespace: str) -> HelmRelease | None:
        try:
            out = await self._run(
                "status",
                name,
                "--namespace",
                namespace,
                "--output",
                "json",
                doing=f"status of release {name} in {namespace}",
            )
        except HelmError as error:
            if not error.timed_out and "not found" in error.message.lower():
                return None
            raise
        return _release(json.loads(out))

    async def uninstall(self, name: str, namespace: str) -> bool:
        """False when there was no such release (an uninstall retried after a crash). With --debug: helm
        says why it failed to delete the release only in its debug log (helm_error_text)."""
        try:
            await self._run(
                "uninstall",
                name,
                "--namespace",
                namespace,
                "--debug",
                doing=f"uninstall of release {name} in {namespace}",
            )
        except HelmError as error:
            # helm's storage answering no release (driver.ErrReleaseNotFound), not any "not found": a
            # release helm cannot build the objects of says "resource mapping not found".
            if not error.timed_out and _RELEASE_NOT_FOUND in error.message.lower():
                return False
            raise
        return True

    def begun_by_predecessor(self, release: HelmRelease, labels: dict[str, str]) -> bool:
        """A pending revision (`labels` of its storage Secret) that the process before this one in the same
        place began: its helm died with it, none still works on it. Only an upgrade's or an install's:
        a rollback's revision has the labels of the revision it goes back to (`helm rollback` copies
        them), which name who wrote that one, not who rolls back."""
        return (
            bool(self.runner)
            and release.status in LABELLED_BY_ITS_HELM
            and labels.get(c.LABEL_HELM_RUNNER) == self.runner
            and (release.last_deployed is not None and release.last_deployed < self.started)
        )

    async def rollback(self, name: str, namespace: str, revision: int | None = None) -> None:
        """To `revision`, by default the one before the newest; over fields another manager took since,
        as an upgrade does (SERVER_SIDE_APPLY)."""
        to = [] if revision is None else [str(revision)]
        await self._run(
            "rollback",
            name,
            *to,
            "--namespace",
            namespace,
            *SERVER_SIDE_APPLY,
            doing=f"rollback of release {name} in {namespace}",
        )


# The pending statuses whose revision carries the labels of the helm that wrote it (begun_by_predecessor).
LABELLED_BY_ITS_HELM = ("pending-upgrade", "pending-install")


def helm_pod(release: HelmRelease, labels: dict[str, str]) -> str | None:
    """The operator's Pod whose helm began a pending upgrade or install (`labels` of its storage Secret);
    None for any other revision, a rollback's (its labels are the revision's it goes back to) or one
    written before the label or outside a Pod."""
    if release.status not in LABELLED_BY_ITS_HELM:
        return None
    return labels.get(c.LABEL_HELM_POD) or None


def helm_pod_gone(labels: dict[str, str], pod: dict[str, Any] | None) -> bool:
    """Whether the helm of a pending revision (`labels` of its storage Secret) died with its Pod: `pod`
    (the metadata of the Pod helm_pod names, None when there is none) is gone, or is another Pod of that
    name (a StatefulSet's, made again): its uid is not the one labelled. Told by uid, never by time: the
    API server's clock and the operator's differ. A Pod still there, Terminating too, may still be
    running it; so may a Pod of that name when the revision has no uid label (written before it)."""
    if pod is None:
        return True
    uid = labels.get(c.LABEL_HELM_POD_UID)
    return bool(uid) and (pod.get("metadata") or {}).get("uid") != uid


async def _communicate(process: asyncio.subprocess.Process, within: float) -> tuple[bytes, bytes]:
    """helm's output at its end; TimeoutError when it runs past `within` seconds (HELM_TIMEOUT). Timed
    with asyncio.timeout like every wait of the package (see workers.py), though to_the_end's task,
    which runs it, is one nobody cancels."""
    async with asyncio.timeout(within):
        return await process.communicate()


async def _kill(process: asyncio.subprocess.Process) -> None:
    """SIGKILL to helm and to whatever it started (a plugin, a post-renderer): one left holding helm's
    output pipes would keep the wait for helm's end from returning. helm stays in the operator's process
    group, so a kill of the operator's group (tests/conftest.py) still reaches it."""
    for pid in (*_descendants(process.pid), process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        # Not wait_for, which dropped a stop that came in as the killed helm's end did (see workers.py): the
        # helm that timed out was then a HelmError to a pass the operator had cancelled, which went on to
        # patch its Customer's status.
        async with asyncio.timeout(10):
            await process.wait()
    except TimeoutError:
        log.warning("helm (pid %d) killed, its output still open after 10 s", process.pid)


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc (the operator runs on Linux); found before any is killed,
    as a killed parent's children move to init."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


def _release(document: dict[str, Any]) -> HelmRelease:
    return HelmRelease(
        name=document["name"],
        namespace=document["namespace"],
        revision=int(document["version"]),
        status=document["info"]["status"],
        # `helm status` (unlike upgrade) leaves the chart out of its JSON.
        chart_version=str(document.get("chart", {}).get("metadata", {}).get("version", "")),
        deployments=manifest_deployments(
            str(document.get("manifest") or ""), document["name"], document["namespace"]
        ),
        last_deployed=_helm_time(document["info"].get("last_deployed")),
    )


def _helm_time(text: object) -> datetime | None:
    """A time in helm's JSON (RFC 3339, nanoseconds, `Z`); None when absent or not one."""
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None
