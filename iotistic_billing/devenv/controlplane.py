"""A real local Kubernetes control plane: etcd and kube-apiserver started the way envtest starts them.

No controller-manager, scheduler or kubelet runs here: no garbage collection, namespaces stay
Terminating, Deployments get no Pods. Tests patch Deployment status where they need "available".
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from iotistic_billing.devenv.pki import CertificateAuthority, KeyPair, service_account_key
from iotistic_billing.processes import ManagedProcess, free_port, loopback_open, wait_for_http, wait_for_port

REPO_BIN = Path(__file__).resolve().parents[2] / "bin"


class MissingBinaryError(RuntimeError):
    pass


def find_binary(name: str) -> Path:
    """KUBEBUILDER_ASSETS or TEST_ASSET_<NAME> first (envtest's conventions), then bin/, then PATH."""
    candidates: list[Path] = []
    override = os.environ.get("TEST_ASSET_" + name.upper().replace("-", "_"))
    if override:
        candidates.append(Path(override))
    if os.environ.get("KUBEBUILDER_ASSETS"):
        candidates.append(Path(os.environ["KUBEBUILDER_ASSETS"]) / name)
    candidates.append(REPO_BIN / name)
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise MissingBinaryError(
        f"{name} not found (looked in {', '.join(str(c) for c in candidates) or 'PATH'}); run `make tools`"
    )


class ControlPlane:
    """etcd + kube-apiserver with a throwaway CA, RBAC authorization and an admin kubeconfig."""

    def __init__(self, workdir: Path, etcd_data: Path | None = None) -> None:
        self.workdir = workdir.resolve()
        self.etcd_data = (etcd_data or self.workdir / "etcd").resolve()
        self.certs = self.workdir / "certs"
        self.kubeconfig = self.workdir / "kubeconfig"
        self.etcd: ManagedProcess | None = None
        self.apiserver: ManagedProcess | None = None
        self.api_port = 0
        self._ca: CertificateAuthority | None = None
        self._admin: KeyPair | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 120.0) -> ControlPlane:
        self.certs.mkdir(parents=True, exist_ok=True)
        self.etcd_data.mkdir(parents=True, exist_ok=True)
        try:
            self._write_certificates()
            self._start_etcd(timeout)
            self._start_apiserver(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_certificates(self) -> None:
        ca = CertificateAuthority("iotistic-local-ca")
        serving = ca.issue("kube-apiserver", dns_names=("localhost",), ips=("127.0.0.1",), server=True)
        (self.certs / "ca.crt").write_bytes(ca.cert_pem)
        (self.certs / "apiserver.crt").write_bytes(serving.cert_pem)
        (self.certs / "apiserver.key").write_bytes(serving.key_pem)
        service_account_key(self.certs)
        self._ca = ca
        self._admin = ca.issue("admin", organizations=("system:masters",))
        (self.certs / "admin.crt").write_bytes(self._admin.cert_pem)
        (self.certs / "admin.key").write_bytes(self._admin.key_pem)
        (self.certs / "admin.key").chmod(0o600)

    def _start_etcd(self, timeout: float) -> None:
        client_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        argv = [
            str(find_binary("etcd")),
            f"--data-dir={self.etcd_data}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]
        self.etcd = ManagedProcess("etcd", argv, self.workdir / "etcd.log")
        wait_for_port(client_port, timeout, self.etcd.process)
        self._wait_http(
            f"{self.etcd_url}/health", timeout, self.etcd, lambda body: b'"health":"true"' in body
        )

    def _apiserver_argv(self) -> list[str]:
        return [
            str(find_binary("kube-apiserver")),
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={self.certs}",
            f"--tls-cert-file={self.certs / 'apiserver.crt'}",
            f"--tls-private-key-file={self.certs / 'apiserver.key'}",
            f"--client-ca-file={self.certs / 'ca.crt'}",
            f"--secure-port={self.api_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # Room for thousands of customer instances (each has several Services); envtest's /24 has 254.
            "--service-cluster-ip-range=10.96.0.0/12",
            "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={self.url}/",
            f"--service-account-key-file={self.certs / 'sa.pub'}",
            f"--service-account-signing-key-file={self.certs / 'sa.key'}",
            "--enable-priority-and-fairness=false",
            "--v=1",
        ]

    def _start_apiserver(self, timeout: float) -> None:
        if not self.api_port:
            self.api_port = free_port()
        self.apiserver = ManagedProcess(
            "kube-apiserver", self._apiserver_argv(), self.workdir / "apiserver.log"
        )
        self._write_kubeconfig(self.kubeconfig, self._admin_pair(), "admin")
        # /readyz includes the RBAC bootstrap roles and the default namespace.
        self._wait_http(f"{self.url}/readyz", timeout, self.apiserver, lambda body: body.strip() == b"ok")

    def restart_apiserver(self, timeout: float = 120.0) -> None:
        """Stop and start kube-apiserver on the same port (for fault tests); etcd keeps the data."""
        if self.apiserver is not None:
            self.apiserver.stop()
        self._start_apiserver(timeout)

    def _admin_pair(self) -> KeyPair:
        assert self._admin is not None
        return self._admin

    def user_kubeconfig(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for a non-admin user (client certificate CN=user, O=groups); RBAC applies."""
        assert self._ca is not None
        path = self.workdir / f"kubeconfig-{user.replace(':', '_')}"
        self._write_kubeconfig(path, self._ca.issue(user, organizations=groups), user)
        return path

    def _write_kubeconfig(self, path: Path, pair: KeyPair, user: str) -> None:
        import base64

        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode()

        config: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": b64((self.certs / "ca.crt").read_bytes()),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(pair.cert_pem),
                        "client-key-data": b64(pair.key_pem),
                    },
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user}}],
            "current-context": "local",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        context.load_cert_chain(str(self.certs / "admin.crt"), str(self.certs / "admin.key"))
        return context

    def get(self, path: str) -> Any:
        """GET a path of the API server as admin and decode the JSON (used for version and health)."""
        with loopback_open(self.url + path, context=self._ssl_context(), timeout=10) as response:
            return json.loads(response.read())

    def version(self) -> str:
        return str(self.get("/version")["gitVersion"])

    def _wait_http(
        self, url: str, timeout: float, process: ManagedProcess, ok: Callable[[bytes], bool]
    ) -> None:
        context = self._ssl_context() if url.startswith("https") else None
        wait_for_http(url, process, timeout, ok, context)

    def processes(self) -> list[ManagedProcess]:
        return [process for process in (self.etcd, self.apiserver) if process is not None]

    def stop(self) -> None:
        for process in (self.apiserver, self.etcd):
            if process is not None:
                process.stop()
        self.apiserver = self.etcd = None
