"""Iotistic billing and licensing control plane: a Kopf operator and an aiohttp webhook server."""

__version__ = "0.1.0"
