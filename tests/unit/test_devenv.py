"""`make dev`'s pure parts: the `.dev/env` a person sources, the kubeconfig of an existing cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from iotistic_billing.devenv.__main__ import dev_commands, write_env
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
