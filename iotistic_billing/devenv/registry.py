"""An OCI registry (CNCF Distribution, `bin/registry`) on a free loopback port, for `make dev` and the
tests: the customer-instance chart is pushed to it with `helm push` and the operator installs from its
`oci://` reference, as a deployed operator does from a real registry."""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import yaml

from iotistic_billing.devenv.controlplane import find_binary
from iotistic_billing.processes import ManagedProcess, free_port, wait_for_http

# Where charts go in the registry: oci://<host>/charts/<chart name>.
CHART_NAMESPACE = "charts"


class ChartRegistry:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reference(self, chart: str) -> str:
        """The `oci://` reference of a chart pushed here (helm and the operator take it)."""
        return f"oci://{self.host}/{CHART_NAMESPACE}/{chart}"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> ChartRegistry:
        for attempt in range(1, attempts + 1):
            config = self.workdir / "registry.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "version": 0.1,
                        "log": {"level": "warn", "accesslog": {"disabled": True}},
                        "storage": {"filesystem": {"rootdirectory": str(self.workdir / "registry")}},
                        "http": {"addr": self.host},
                    }
                )
            )
            argv = [str(find_binary("registry")), "serve", str(config)]
            self.process = ManagedProcess("registry", argv, self.workdir / "registry.log")
            try:
                wait_for_http(f"http://{self.host}/v2/", self.process, timeout)
                return self
            except RuntimeError:
                # Another process can take a free port between our probe and the registry's bind.
                self.process.stop()
                if attempt == attempts:
                    raise
                self.port = free_port()
        return self

    def push(self, chart: Path, version: str | None = None) -> str:
        """`helm package` and `helm push` of a chart directory (at `version`, else its own); the version."""
        helm = str(find_binary("helm"))
        with tempfile.TemporaryDirectory(dir=self.workdir) as packages:
            argv = [helm, "package", str(chart), "--destination", packages]
            if version is not None:
                argv += ["--version", version]
            subprocess.run(argv, check=True, capture_output=True, text=True)
            (package,) = Path(packages).glob("*.tgz")
            target = f"oci://{self.host}/{CHART_NAMESPACE}"
            subprocess.run(
                [helm, "push", str(package), target, "--plain-http"],
                check=True,
                capture_output=True,
                text=True,
            )
        return version or str(yaml.safe_load((chart / "Chart.yaml").read_text())["version"])

    def tags(self, chart: str) -> list[str]:
        """The versions of `chart` the registry holds (the OCI distribution API's tag list)."""
        url = f"http://{self.host}/v2/{CHART_NAMESPACE}/{chart}/tags/list"
        with urllib.request.urlopen(url, timeout=10) as answer:
            tags: list[str] = json.loads(answer.read()).get("tags") or []
        return tags

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


__all__ = ["CHART_NAMESPACE", "ChartRegistry"]
