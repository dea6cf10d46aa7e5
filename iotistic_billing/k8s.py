"""One way to reach the Kubernetes API for every part (operator, webhook server, CLI)."""

from __future__ import annotations

import os
from typing import Any

import kubernetes


def api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """The given kubeconfig, else KUBECONFIG; in a Pod without either, its service account."""
    config: Any = kubernetes.config
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return kubernetes.client.ApiClient()
    client: kubernetes.client.ApiClient = config.new_client_from_config(config_file=kubeconfig)
    return client
