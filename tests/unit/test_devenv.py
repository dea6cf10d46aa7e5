"""`make dev`'s pure parts: the `.dev/env` a person sources, the kubeconfig of an existing cluster."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from iotistic_billing.devenv.__main__ import dev_commands, existing_kubeconfig, write_env
from iotistic_billing.devenv.controlplane import REPO_BIN


def test_env_puts_the_readme_s_commands_on_a_user_s_path(tmp_path: Path) -> None:
    """After `source .dev/env` in a shell with only the system's PATH, `kubectl` is bin/'s and
    `iotistic-billing` the virtual environment's, as the `next:` line and the README have a person type."""
    env = tmp_path / "env"
    write_env(env, {"BILLING_URL": "http://127.0.0.1:3100"}, dev_commands())
    found = subprocess.run(
        ["bash", "-c", f"source {env}; command -v kubectl; command -v iotistic-billing; echo $BILLING_URL"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )

    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == [
        str(REPO_BIN / "kubectl"),
        str(Path(sys.executable).parent / "iotistic-billing"),
        "http://127.0.0.1:3100",
    ]
    assert os.stat(env).st_mode & 0o077 == 0


def kubeconfig_file(folder: Path, name: str, server: str, current: bool) -> Path:
    """A kubeconfig of one cluster whose CA and client certificate are files named relative to it."""
    folder.mkdir(parents=True)
    for pem in ("ca.crt", "client.crt", "client.key"):
        (folder / pem).write_text(f"{name} {pem}\n")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": "ca.crt"}}],
        "users": [{"name": name, "user": {"client-certificate": "client.crt", "client-key": "client.key"}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
    }
    if current:
        config["current-context"] = name
    path = folder / "config"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_existing_cluster_s_kubeconfig_is_the_merged_list_made_self_contained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KUBECONFIG as kubectl documents it, a list of files; their relative certificate paths resolve."""
    first = kubeconfig_file(tmp_path / "work", "work", "https://work.example:6443", current=True)
    second = kubeconfig_file(tmp_path / "lab", "lab", "https://lab.example:6443", current=False)
    monkeypatch.chdir(tmp_path)  # the relative paths are the files' own, not the working directory's

    merged = yaml.safe_load(
        existing_kubeconfig({"KUBECONFIG": f"{first}{os.pathsep}{second}", "HOME": str(tmp_path)})
    )

    assert merged["current-context"] == "work"
    assert sorted(c["name"] for c in merged["contexts"]) == ["lab", "work"]
    clusters = {c["name"]: c["cluster"] for c in merged["clusters"]}
    assert clusters["lab"]["server"] == "https://lab.example:6443"
    assert base64.b64decode(clusters["work"]["certificate-authority-data"]) == b"work ca.crt\n"
    users = {u["name"]: u["user"] for u in merged["users"]}
    assert base64.b64decode(users["lab"]["client-key-data"]) == b"lab client.key\n"
    assert "certificate-authority" not in clusters["work"] and "client-key" not in users["lab"]


def test_an_existing_cluster_without_a_current_context_is_refused_by_name(tmp_path: Path) -> None:
    lab = kubeconfig_file(tmp_path / "lab", "lab", "https://lab.example:6443", current=False)

    with pytest.raises(SystemExit, match=f"KUBECONFIG {lab} sets no current-context"):
        existing_kubeconfig({"KUBECONFIG": str(lab), "HOME": str(tmp_path)})
