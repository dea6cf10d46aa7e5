"""Kopf handlers that reconcile Customer resources."""
