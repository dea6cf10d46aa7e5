"""`make dev`: PostgreSQL, a simulated cluster, stripe-mock, Mailpit, the CRDs, the operator and the webhook
server, the samples, then `ready`; Ctrl-C stops it all.

The cluster is the end-to-end tests' simulated one (iotistic_billing.devenv.simulated: the local control
plane plus kube-controller-manager, kube-scheduler and kwok's fake nodes), so the sample Customers' instances
really roll out and turn Ready. Data (PostgreSQL, etcd) stays under the state directory (default `.dev/`), so
a second run starts again from it. `.dev/env` holds shell `export` lines for kubectl, curl and the CLI, and
puts bin/ and the virtual environment's scripts first on PATH; the ports it names are kept in
`.dev/ports.json`, so a shell that sourced it keeps working across restarts. A stop request during start-up
stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Final, Protocol

import yaml

from iotistic_billing.db import migrate
from iotistic_billing.db.embedded import EmbeddedPostgres
from iotistic_billing.devenv.controlplane import REPO_BIN, MissingBinaryError, find_binary
from iotistic_billing.devenv.mailpit import Mailpit
from iotistic_billing.devenv.registry import ChartRegistry
from iotistic_billing.devenv.simulated import SimulatedCluster
from iotistic_billing.devenv.stripe_mock import StripeMock
from iotistic_billing.licensing.keys import generate_private_key, write_key_pair
from iotistic_billing.processes import (
    ManagedProcess,
    StartTimeout,
    free_port,
    port_is_free,
    wait_for_http,
)

REPO = REPO_BIN.parent
DATABASE = "billing"
DEV_PRICES = {
    "STRIPE_PRICE_STARTER": "price_dev_starter",
    "STRIPE_PRICE_PROFESSIONAL": "price_dev_professional",
    "STRIPE_PRICE_ENTERPRISE": "price_dev_enterprise",
}
# Seconds the operator and the webhook server have to answer their health check.
SERVICE_START_TIMEOUT: Final = 60.0


class Part(Protocol):
    """A part `make dev` starts: stopped at the end, and its processes watched once it is ready."""

    def stop(self) -> None: ...

    def processes(self) -> list[ManagedProcess]: ...


class StopRequested(Exception):
    """SIGINT or SIGTERM during start-up: the parts started so far are stopped, nothing more starts."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class KeptPorts:
    """The loopback ports of the parts `.dev/env` names (PostgreSQL, stripe-mock, Mailpit, the registry),
    kept in a file of the state folder and taken again at the next start: a shell that sourced `.dev/env`
    before a restart reaches them after it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.ports: dict[str, int] = {
                str(part): int(port) for part, port in json.loads(path.read_text()).items()
            }
        except (OSError, ValueError, AttributeError, TypeError):  # none yet, or not ours: new ports
            self.ports = {}

    def port(self, part: str) -> int:
        """The part's kept port, else a free one (`keep` it once the part listens)."""
        kept = self.ports.get(part)
        if kept is None:
            return free_port()
        if not port_is_free(kept):
            raise RuntimeError(
                f"port {kept} of {part}, kept in {_shown(self.path)}, is taken by another process (another"
                f" `make dev` on {_shown(self.path.parent)}?); stop it, or delete {_shown(self.path)} to"
                " start on new ports (and source .dev/env again)"
            )
        return kept

    def keep(self, part: str, port: int) -> None:
        self.ports[part] = port
        self.path.write_text(json.dumps(self.ports, indent=2, sort_keys=True) + "\n")


def _refuse_taken(setting: str, port: int, part: str) -> None:
    """A server started on a port another process holds fails to bind, while its health check, asked on
    that port, is answered by the other one: a second `make dev` (another worktree) printed `ready`."""
    if not port_is_free(port):
        hint = ", or choose another: PORT=<port> make dev" if setting == "PORT" else ""
        raise RuntimeError(
            f"{setting} {port} of {part} is taken by another process (another `make dev`?); stop it{hint}"
        )


def _kept_secret(path: Path, make: str) -> str:
    """A generated secret that survives restarts, so tokens in scripts stay valid."""
    if not path.exists():
        path.write_text(make)
        path.chmod(0o600)
    return path.read_text().strip()


def _shown(path: Path) -> Path:
    """A path as a person in the repository types it (`.dev/env`), else in full."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def write_env(path: Path, values: dict[str, str], commands: list[Path]) -> None:
    """Shell `export` lines of `values`, and `commands` (absolute folders) put first on the PATH the shell
    that sources them already has."""
    lines = [f"export {key}={shlex.quote(value)}\n" for key, value in values.items()]
    folders = ":".join(shlex.quote(str(folder.absolute())) for folder in commands)
    lines.append(f'export PATH={folders}:"$PATH"\n')
    path.write_text("".join(lines))
    path.chmod(0o600)


def dev_commands() -> list[Path]:
    """Where the commands the README has a person type after `source .dev/env` are: kubectl and helm in
    bin/, `iotistic-billing` among the scripts of the virtual environment that runs `make dev`."""
    return [REPO_BIN, Path(sysconfig.get_path("scripts"))]


def existing_kubeconfig(environ: Mapping[str, str]) -> bytes:
    """The kubeconfig a user's kubectl reads, as one self-contained file: KUBECONFIG may list several
    files, and their certificate and key paths are relative to the file that names them, so a copy of the
    bytes of one file was neither the user's cluster nor readable from .dev/."""
    view = subprocess.run(
        [str(find_binary("kubectl")), "config", "view", "--flatten", "--raw"],
        env=dict(environ),
        capture_output=True,
        check=False,
    )
    source = environ.get("KUBECONFIG") or "~/.kube/config"
    if view.returncode != 0:
        problem = view.stderr.decode().strip()
        raise SystemExit(f"USE_EXISTING_CLUSTER=true: kubectl cannot read KUBECONFIG {source}: {problem}")
    if not (yaml.safe_load(view.stdout) or {}).get("current-context"):
        raise SystemExit(f"USE_EXISTING_CLUSTER=true: KUBECONFIG {source} sets no current-context")
    return view.stdout


class DevEnvironment:
    def __init__(self, state: Path, use_existing_cluster: bool, port: int) -> None:
        self.state = state.resolve()
        self.use_existing_cluster = use_existing_cluster
        self.port = port
        self.stops: list[tuple[str, Part]] = []

    def _start_part(self, name: str, part: Part, start: Callable[[], object], logs: Path) -> None:
        """`start()` of a part, registered for the stop before it starts (a stop request during its start
        stops what it started); a start that times out is one line naming the part and where its logs are
        (the log of the process that was slow, when the part is several: the cluster)."""
        self.stops.append((name, part))
        try:
            start()
        except TimeoutError as slow:
            # Its first line: the ones after it are the log's tail, which the log has.
            reason = str(slow).splitlines()[0].rstrip(":") if str(slow) else "timed out"
            if isinstance(slow, StartTimeout) and slow.log_path is not None:
                logs = slow.log_path
            raise RuntimeError(f"{name} did not start in time ({reason}); see {_shown(logs)}") from None

    def ended_part(self) -> str | None:
        """The first process of a started part that is no longer running, in one line naming its log:
        `make dev` is then no longer what its `ready` said (an operator that crashed answered nothing,
        and the terminal still said ready)."""
        for name, part in self.stops:
            for process in part.processes():
                if not process.running():
                    what = name if process.name == name else f"{process.name} ({name})"
                    log = f"; see {_shown(process.log_path)}" if process.log_path is not None else ""
                    return f"{what} {process.ended()}{log}"
        return None

    def start(self) -> dict[str, str]:
        # Before the parts that take minutes: the webhook server's port is known now.
        _refuse_taken("PORT", self.port, "webhooks")
        self.state.mkdir(parents=True, exist_ok=True)
        env: dict[str, str] = {}
        ports = KeptPorts(self.state / "ports.json")

        postgres = EmbeddedPostgres(self.state / "postgres", ports.port("postgres"))
        self._start_part("postgres", postgres, postgres.start, self.state / "postgres" / "postgres.log")
        ports.keep("postgres", postgres.port)
        url = (
            postgres.database_url(DATABASE)
            if postgres.database_exists(DATABASE)
            else postgres.create_database(DATABASE)
        )
        self._migrate(url)
        env["DATABASE_URL"] = url
        print(f"postgres      {url}", flush=True)

        # The parts on kept ports first: the cluster's parts take free ports, which could be one of them.
        try:
            stripe = StripeMock(self.state, ports.port("stripe-mock"))
            self._start_part("stripe-mock", stripe, stripe.start, self.state / "stripe-mock.log")
            ports.keep("stripe-mock", stripe.port)
            env["STRIPE_API_BASE"] = stripe.url
            # stripe-mock takes `sk_test_` and letters or digits only: with an underscore after the prefix
            # every call of the dev environment was a 401.
            env["STRIPE_SECRET_KEY"] = "sk_test_devstripemock"  # noqa: S105 - a test-mode key for stripe-mock
            print(f"stripe-mock   {stripe.url}", flush=True)
        except MissingBinaryError as missing:
            print(f"stripe-mock   not started: {missing}", flush=True)

        mailpit = Mailpit(
            self.state, http_port=ports.port("mailpit-http"), smtp_port=ports.port("mailpit-smtp")
        )
        self._start_part("mailpit", mailpit, mailpit.start, self.state / "mailpit.log")
        ports.keep("mailpit-http", mailpit.http_port)
        ports.keep("mailpit-smtp", mailpit.smtp_port)
        env["SMTP_URL"] = mailpit.smtp_url
        env["MAILPIT_URL"] = mailpit.url
        print(f"mailpit       {mailpit.url} (the notices' mail; SMTP {mailpit.smtp_url})", flush=True)
        # A webhook receiver a developer runs on this machine: customers' webhooks reach only public
        # addresses unless allowed (a deployment allows its in-cluster receivers the same way).
        env["NOTIFY_WEBHOOK_ALLOWED_CIDRS"] = '["127.0.0.0/8", "::1/128"]'

        # The instance chart as a deployed operator gets it: from an OCI registry, at the fleet's version.
        registry = ChartRegistry(self.state, port=ports.port("registry"))
        self._start_part("registry", registry, registry.start, self.state / "registry.log")
        ports.keep("registry", registry.port)
        env["INSTANCE_CHART_VERSION"] = registry.push(REPO / "charts" / "customer-instance")
        env["INSTANCE_CHART"] = registry.reference("customer-instance")
        env["INSTANCE_CHART_PLAIN_HTTP"] = "true"
        print(
            f"registry      {env['INSTANCE_CHART']}:{env['INSTANCE_CHART_VERSION']} (helm push --plain-http)",
            flush=True,
        )

        kubeconfig = self.state / "kubeconfig"
        if self.use_existing_cluster:
            flattened = existing_kubeconfig(os.environ)
            # Private before it holds the user's inlined client keys.
            kubeconfig.touch(mode=0o600)
            kubeconfig.chmod(0o600)
            kubeconfig.write_bytes(flattened)
            source = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            print(f"cluster       existing, from {source}", flush=True)
        else:
            # The end-to-end tests' simulated cluster, where the samples' instances roll out: its
            # parts' folders and logs under the state folder (.dev/kwok.log, ...), etcd's data in .dev/etcd.
            # Its API server's port may change: .dev/kubeconfig, which KUBECONFIG names, is written anew.
            cluster = SimulatedCluster(self.state, etcd_data=self.state / "etcd")
            self._start_part("cluster", cluster, cluster.start, self.state)
            kubeconfig.write_bytes(cluster.kubeconfig.read_bytes())
            kubeconfig.chmod(0o600)
            # helm's and kubectl's discovery cache of this control plane, not one more in ~/.kube/cache.
            env["KUBECACHEDIR"] = str(self.state / "kube-cache")
            plane = cluster.plane
            print(f"control plane {plane.url} (Kubernetes {plane.version()})", flush=True)
            print(
                f"nodes         {', '.join(cluster.node_names)} (kwok: Pods turn Ready, no container runs)",
                flush=True,
            )
        env["KUBECONFIG"] = str(kubeconfig)

        self._apply(kubeconfig, env, REPO / "crds", wait_established=True)
        keys = self.state / "keys"
        if not (keys / "private-key.pem").exists():
            write_key_pair(generate_private_key(), keys)
        env["LICENSE_PRIVATE_KEY_PATH"] = str(keys / "private-key.pem")
        env["LICENSE_PUBLIC_KEY_PATH"] = str(keys / "public-key.pem")
        env["ADMIN_API_TOKEN"] = _kept_secret(self.state / "admin-token", secrets.token_hex(32))
        # The admin console's read-only sign-in: its own kept secret, never the admin token.
        env["ADMIN_VIEWER_TOKEN"] = _kept_secret(self.state / "viewer-token", secrets.token_hex(32))
        if env["ADMIN_VIEWER_TOKEN"] == env["ADMIN_API_TOKEN"]:
            raise SystemExit(
                f"{self.state / 'viewer-token'} holds the admin token; delete it to get a new one"
            )
        # Seals the console's sessions: kept, so a restart does not sign anyone out.
        env["CONSOLE_SESSION_KEY"] = _kept_secret(
            self.state / "console-session-key", secrets.token_urlsafe(32)
        )
        env["STRIPE_WEBHOOK_SECRET"] = _kept_secret(
            self.state / "webhook-secret", "whsec_" + secrets.token_hex(24)
        )
        env.update(DEV_PRICES)
        env["BILLING_URL"] = f"http://127.0.0.1:{self.port}"
        write_env(self.state / "env", env, dev_commands())

        self._start_service(
            "operator",
            "iotistic_billing.operator",
            env,
            {
                # A dev run is alone: standalone, so a restart never waits for a killed run's peering record.
                "OPERATOR_PEERING": "",
                "OPERATOR_LIVENESS_PORT": str(free_port()),
                "OPERATOR_METRICS_PORT": str(free_port()),
                # /healthz is checked on 127.0.0.1: a POD_IP of a shell in a Pod would move it to IPv6.
                "POD_IP": "",
            },
            health="OPERATOR_LIVENESS_PORT",
        )
        self._start_service(
            "webhooks",
            "iotistic_billing.webhook_server",
            env,
            {"PORT": str(self.port), "STRIPE_INBOX_PORT": str(free_port())},
            health="PORT",
        )
        print(
            f"console       {env['BILLING_URL']}/admin/ (sign in with ADMIN_API_TOKEN, or ADMIN_VIEWER_TOKEN"
            f" to look only: source {_shown(self.state / 'env')})",
            flush=True,
        )
        self._apply(kubeconfig, env, REPO / "manifests" / "samples", missing_only=True)
        samples = sorted((REPO / "manifests" / "samples").glob("*.yaml"))
        print(f"samples       {', '.join(sample.stem for sample in samples)}", flush=True)
        return env

    def _migrate(self, url: str) -> None:
        """The dev database brought to this checkout's newest migration. One a newer checkout migrated
        (a switch back to an older branch) is an error saying so: alembic's traceback said only that it
        could not locate the revision."""
        before = migrate.current_revision(url)
        if before is not None and before not in migrate.known_revisions():
            data, env = _shown(self.state / "postgres"), _shown(self.state / "env")
            head = migrate.head_revision()
            raise RuntimeError(
                f"the database in {data} is at migration {before}, which this checkout does not know (its"
                f" newest is {head}): a newer checkout migrated it. Take it back from that checkout: with its"
                f" `make dev` running, `source {env}; python -m iotistic_billing.db.migrate --to {head}` in"
                f" another shell; or delete {data} to start with an empty database"
            )
        migrate.upgrade(url)

    def _start_service(
        self, name: str, module: str, env: dict[str, str], extra: dict[str, str], health: str
    ) -> None:
        """A product process as a user starts it, logging to .dev/<name>.log; returns once it is healthy."""
        service_env = {
            **os.environ,
            **env,
            **extra,
            "PATH": f"{REPO_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        for setting, value in extra.items():
            if setting.endswith("PORT"):
                _refuse_taken(setting, int(value), name)
        log = self.state / f"{name}.log"
        url = f"http://127.0.0.1:{service_env[health]}/healthz"
        process = ManagedProcess(name, [sys.executable, "-m", module], log, env=service_env)
        self._start_part(name, process, lambda: wait_for_http(url, process, SERVICE_START_TIMEOUT), log)
        print(f"{name:<13} {url} (log {process.log_path})", flush=True)

    def _apply(
        self,
        kubeconfig: Path,
        env: dict[str, str],
        folder: Path,
        wait_established: bool = False,
        missing_only: bool = False,
    ) -> None:
        """`kubectl apply --server-side` of the folder's manifests; `missing_only`: of those whose object
        does not exist yet (the samples: a user's change to one stays, and a field they took over from
        the sample's apply would otherwise fail the next start with a conflict)."""
        files = sorted(folder.glob("*.yaml"))
        kubectl = [str(find_binary("kubectl")), "--kubeconfig", str(kubeconfig)]
        kubectl_env = {**os.environ, **env}
        if missing_only:
            files = [file for file in files if _kubectl(kubectl, kubectl_env, "get", "-f", str(file)) is None]
        if not files:
            return
        _kubectl(
            kubectl,
            kubectl_env,
            "apply",
            "--server-side",
            *(f"--filename={file}" for file in files),
            check=True,
        )
        if wait_established:
            _kubectl(
                kubectl,
                kubectl_env,
                "wait",
                "--for=condition=Established",
                # Ours only: with USE_EXISTING_CLUSTER one of someone else's, not Established, failed it.
                *(f"--filename={file}" for file in files),
                "--timeout=60s",
                check=True,
            )

    def stop(self) -> None:
        for name, part in reversed(self.stops):
            print(f"stopping {name}", flush=True)
            part.stop()
        self.stops.clear()


def _kubectl(kubectl: list[str], env: dict[str, str], *args: str, check: bool = False) -> str | None:
    """kubectl's output; None when it failed, or with `check` a failure that says kubectl's message."""
    done = subprocess.run([*kubectl, *args], capture_output=True, text=True, env=env)
    if done.returncode == 0:
        return done.stdout
    if check:
        raise RuntimeError(f"kubectl {args[0]} failed: {done.stderr.strip()}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iotistic_billing.devenv", description=__doc__)
    parser.add_argument("--state", type=Path, default=REPO / ".dev", help="state directory (default .dev)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3100")))
    args = parser.parse_args(argv)

    stops: list[int] = []
    starting = [True]

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # No lock: a handler calling threading.Event.set deadlocked when a second signal (a double
        # Ctrl-C, `timeout`'s signal to the process and its group) ran it again inside the first one,
        # which held the Event's lock. The runner then never stopped its processes. The first signal
        # during start-up breaks it off; any other is a note, so that none breaks off the stop.
        stops.append(signum)
        if starting and len(stops) == 1:
            raise StopRequested(signum)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    dev = DevEnvironment(args.state, os.environ.get("USE_EXISTING_CLUSTER") == "true", args.port)
    try:
        try:
            try:
                dev.start()
            finally:
                starting.clear()
        except StopRequested as stop:
            print(f"make dev: stopped by {stop} before it was ready", file=sys.stderr, flush=True)
            return 128 + stop.signum
        except RuntimeError as error:  # a part that would not start, in its own words
            print(f"make dev: {error}", file=sys.stderr, flush=True)
            return 1
        print(f"\nnext: source {args.state / 'env'}; kubectl get cust; iotistic-billing --help", flush=True)
        print("ready", flush=True)
        while not stops:
            if (ended := dev.ended_part()) is not None:
                print(f"make dev: {ended}; stopping the rest", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.2)
    finally:
        dev.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
