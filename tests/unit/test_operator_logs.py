"""Kopf's per-success INFO lines of the routine handlers are dropped; everything else passes. Kopf posts
no Event."""

from __future__ import annotations

import logging

import kopf
import pytest

from iotistic_billing.operator import handlers
from iotistic_billing.operator.kopf_tuning import QuietRoutineSuccesses, configure_kopf

# The watch handlers handlers.py hands to configure_kopf as routine.
ROUTINE = (handlers.customer_gone,)


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)


@pytest.mark.parametrize(
    "message",
    ["Handler 'customer_gone' succeeded."],
)
def test_routine_successes_are_dropped(message: str) -> None:
    assert not QuietRoutineSuccesses(ROUTINE).filter(record(message))


@pytest.mark.parametrize(
    ("message", "level"),
    [
        ("Handler 'reconcile_customer' succeeded.", logging.INFO),
        ("Daemon 'housekeeping' succeeded.", logging.INFO),
        (
            "Handler 'customer_gone' failed with an exception and will try again in 5 seconds: boom",
            logging.ERROR,
        ),
        ("Handler 'customer_gone' succeeded.", logging.WARNING),
    ],
)
def test_everything_else_is_kept(message: str, level: int) -> None:
    assert QuietRoutineSuccesses(ROUTINE).filter(record(message, level))


def test_kopf_posts_no_event_of_its_own() -> None:
    """Kopf posted a cluster-scoped Customer's and InstanceRollout's Events with the namespace it posted
    into as involvedObject.namespace, which `kubectl describe` never lists: every Event is the
    operator's own (operator/events.py), one per transition or failure."""
    settings, logger = kopf.OperatorSettings(), logging.getLogger("kopf.objects")
    filters = list(logger.filters)
    try:
        configure_kopf(settings, routine=ROUTINE)
    finally:
        logger.filters[:] = filters
    assert settings.posting.enabled is False
