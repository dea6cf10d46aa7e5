"""Kopf's per-success INFO lines of the routine handlers are dropped; everything else passes."""

from __future__ import annotations

import logging

import pytest

from iotistic_billing.operator import handlers
from iotistic_billing.operator.kopf_tuning import QuietRoutineSuccesses

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
