"""The operator's Events on Customers and InstanceRollouts, every one posted by k8s.KubeApi.create_event
where `kubectl describe` and the console find it (Kopf's own posting is off: kopf_tuning.py).

An Event that cannot be posted is logged and never fails the handler that posts it: what it tells is in
the object's status all the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from iotistic_billing.k8s import EventKind, Kube, KubernetesUnavailable

log = logging.getLogger(__name__)

# An Event as the operator's decisions give it: its type (Normal, Warning), reason and message.
Event = tuple[str, str, str]


async def post_events(
    kube: Kube, kind: EventKind, involved: Mapping[str, Any], events: Iterable[Event]
) -> list[Event]:
    """`events` on the Customer or InstanceRollout `involved` (its body, or its metadata's name and uid),
    in order; those posted, for a caller that says one only once (handlers.post_pass_events)."""
    posted: list[Event] = []
    for event_type, reason, message in events:
        try:
            await kube.create_event(kind, involved, reason=reason, message=message, event_type=event_type)
        except KubernetesUnavailable as error:  # one line: an outage is no bug
            log.warning("Event %s of %s %s not posted: %s", reason, kind, involved["metadata"]["name"], error)
        except Exception:
            log.warning(
                "Event %s of %s %s not posted", reason, kind, involved["metadata"]["name"], exc_info=True
            )
        else:
            posted.append((event_type, reason, message))
    return posted


__all__ = ["Event", "post_events"]
