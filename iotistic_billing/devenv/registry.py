"""An OCI registry (CNCF Distribution, `bin/registry`) on a free (or given) loopback port, for `make dev`
and the tests: the customer-instance chart is pushed to it with `helm push` and the operator installs from its
`oci://` reference, as a deployed operator does from a real registry."""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.processes import (
    ManagedProcess,
    OneProcess,
    free_port,
    loopback_open,
    wait_for_http,
    wait_for_port,
)

# Where charts go in the registry: oci://<host>/charts/<chart name>.
CHART_NAMESPACE = "charts"


def _helm(argv: list[str], chart: Path) -> None:
    """A helm command of a push; its failure in helm's words (a chart that does not lint, a registry
    that refuses it), not a CalledProcessError's traceback."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        problem = done.stderr.strip() or done.stdout.strip()
        raise RuntimeError(f"helm {argv[1]} of {chart} failed: {problem}")


class ChartRegistry(OneProcess):
    """`credentials` (user, password): the registry asks for them (htpasswd, over plain HTTP on
    loopback only), and `registry_config` writes the Docker config JSON helm logs in with."""

    def __init__(
        self, workdir: Path, credentials: tuple[str, str] | None = None, port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: ManagedProcess | None = None
        self.credentials = credentials
        self.config = self.registry_config(workdir / "registry-config.json") if credentials else None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reference(self, chart: str) -> str:
        """The `oci://` reference of a chart pushed here (helm and the operator take it)."""
        return f"oci://{self.host}/{CHART_NAMESPACE}/{chart}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> ChartRegistry:
        for attempt in range(1, attempts + 1):
            config = self.workdir / "registry.yaml"
            settings: dict[str, Any] = {
                "version": 0.1,
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(self.workdir / "registry")}},
                "http": {"addr": self.host},
            }
            if self.credentials is not None:
                settings["auth"] = {"htpasswd": {"realm": "charts", "path": str(self._htpasswd())}}
            config.write_text(yaml.safe_dump(settings))
            argv = [str(find_binary("registry")), "serve", str(config)]
            self.process = ManagedProcess("registry", argv, self.workdir / "registry.log")
            try:
                if self.credentials is None:
                    wait_for_http(f"http://{self.host}/v2/", self.process, timeout)
                else:  # /v2/ answers 401 without credentials: listening is up
                    wait_for_port(self.port, timeout, self.process.process)
                return self
            except RuntimeError:
                # Another process can take a free port between our probe and the registry's bind.
                self.process.stop()
                if attempt == attempts:
                    raise
                self.port = free_port()
        return self

    def _htpasswd(self) -> Path:
        import bcrypt  # the tests' and make dev's dependency only

        assert self.credentials is not None
        user, password = self.credentials
        path = self.workdir / "htpasswd"
        path.write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}\n")
        return path

    def registry_config(self, path: Path) -> Path:
        """The Docker config JSON of this registry's credentials (what a dockerconfigjson Secret holds)."""
        assert self.credentials is not None
        auth = base64.b64encode(":".join(self.credentials).encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": auth}}}))
        return path

    def push(self, chart: Path, version: str | None = None) -> str:
        """`helm package` and `helm push` of a chart directory (at `version`, else its own); the version."""
        helm = str(find_binary("helm"))
        with tempfile.TemporaryDirectory(dir=self.workdir) as packages:
            argv = [helm, "package", str(chart), "--destination", packages]
            if version is not None:
                argv += ["--version", version]
            _helm(argv, chart)
            (package,) = Path(packages).glob("*.tgz")
            target = f"oci://{self.host}/{CHART_NAMESPACE}"
            login = []
            if self.credentials is not None:
                login = ["--registry-config", str(self.registry_config(self.workdir / "push-config.json"))]
            _helm([helm, "push", str(package), target, "--plain-http", *login], chart)
        return version or str(yaml.safe_load((chart / "Chart.yaml").read_text())["version"])

    def tags(self, chart: str) -> list[str]:
        """The versions of `chart` the registry holds (the OCI distribution API's tag list)."""
        request = urllib.request.Request(f"http://{self.host}/v2/{CHART_NAMESPACE}/{chart}/tags/list")
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with loopback_open(request, timeout=10) as answer:
            tags: list[str] = json.loads(answer.read()).get("tags") or []
        return tags


__all__ = ["CHART_NAMESPACE", "ChartRegistry"]
