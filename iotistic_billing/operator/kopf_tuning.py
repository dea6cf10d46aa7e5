"""How the operator tunes Kopf: its settings, the storages of its bookkeeping, and a quieter log.

Why each setting has the value it has is said beside it; what was measured for it is in bench/README.md.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

import kopf

from iotistic_billing.customer import GROUP, PLURAL
from iotistic_billing.operator import constants as c


def configure_kopf(
    settings: kopf.OperatorSettings,
    routine: Iterable[Callable[..., Any]],
    customer_selector: str | None = None,
) -> HandledSpecs:
    """Kopf's settings for this operator; `routine`: the watch handlers whose successes are not logged;
    `customer_selector`: this shard's Customers (sharding.py). Returns the diff-base storage, which the
    deletion handler tells to forget a Customer."""
    logging.getLogger("kopf.objects").addFilter(QuietRoutineSuccesses(routine))
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = TransientProgressStorage(prefix="iotistic.io")
    handled = HandledSpecs(prefix="iotistic.io", key="last-handled-configuration")
    settings.persistence.diffbase_storage = handled
    # No Event of Kopf's: it posts a cluster-scoped object's with involvedObject.namespace set to the
    # namespace it posts into, which `kubectl describe` never lists. Every Event is the operator's own
    # (events.post_events), one per transition or failure.
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Kopf starts a worker per object with events, unbounded by default: a thousand Customers applied at
    # once would each hold a worker, a body and a handler state while helm works through them (most of
    # the operator's peak memory). Bounded, the rest wait as queued events, and a worker that saw no
    # event for 0.1 s makes room (at Kopf's 5 s, or 1 s, the Deployments of a thousand instances turning
    # available queued their bodies faster than workers freed up).
    settings.queueing.worker_limit = c.WORKER_LIMIT
    settings.queueing.idle_timeout = 0.1
    # This shard's Customers, chosen by the API server (Deployments and Secrets are not Kopf's to
    # watch: watches.py).
    if customer_selector is not None:
        settings.watching.label_selectors[GROUP, PLURAL] = customer_selector
    return handled


class QuietRoutineSuccesses(logging.Filter):
    """Kopf logs each handler's success at INFO. For the watch handlers (every Customer event) that is
    thousands of lines when 1,000 instances roll out, formatted and written for nothing; failures are
    still logged."""

    def __init__(self, routine: Iterable[Callable[..., Any]]) -> None:
        super().__init__()
        self.routine = frozenset(f"Handler {handler.__name__!r} succeeded." for handler in routine)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.msg in self.routine)


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """Kopf's annotation diff-base storage, building the same essence from less.

    On every Customer event Kopf builds the object's essence (spec, labels, annotations) by deep-copying
    the whole body, managedFields and status included, and then dropping them (a visible share of the
    operator's CPU at scale). Handed only the parts it keeps, it copies those alone. When a handler
    watches a field outside them (Kopf's extra fields: the status, metadata other than labels and
    annotations), Kopf gets the whole body as before.

    Kopf builds an essence for the events of every watched resource, the InstanceRollouts included,
    though only change and daemon handlers use it, and the operator has those for Customers alone (a
    unit test holds it to that): for other objects the essence is empty.
    """

    KEPT_METADATA = ("labels", "annotations")

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        if str(body.get("apiVersion", f"{GROUP}/")).partition("/")[0] != GROUP:
            return cast(kopf.BodyEssence, {})
        paths = [tuple(f.split(".")) if isinstance(f, str) else tuple(f or ()) for f in extra_fields or ()]
        if any(self._dropped(path) for path in paths):
            return super().build(body=body, extra_fields=extra_fields)
        metadata = body.get("metadata") or {}
        lean = {key: value for key, value in body.items() if key not in ("metadata", "status")}
        lean["metadata"] = {key: metadata[key] for key in self.KEPT_METADATA if key in metadata}
        return super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=extra_fields)

    @classmethod
    def _dropped(cls, path: tuple[str, ...]) -> bool:
        """A field the lean body leaves out (the reconcile handler's `spec` is kept)."""
        if path[:1] == ("status",):
            return True
        return path[:1] == ("metadata",) and path[1:2] not in [(key,) for key in cls.KEPT_METADATA]


class HandledSpecs(LeanDiffBaseStorage):
    """The configuration Kopf last handled of each Customer, in the operator's memory.

    Kopf's annotation storage writes it to the Customer after every handled change: one more PATCH of
    the Customer per creation and per spec change, and one more watch event for Kopf to process. Nothing
    needs it to outlive the process: after a start a Customer without it is a creation to Kopf, and
    creation, update and resume run the same idempotent pass, as every Customer has one at start-up
    anyway (resume). The annotation written by earlier
    versions is ignored (and left out of the essence, as before).
    """

    def __init__(self, *, prefix: str, key: str) -> None:
        super().__init__(prefix=prefix, key=key)
        self._handled: dict[str, str] = {}  # uid -> the essence as compact JSON (a tenth of the dict's size)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        encoded = self._handled.get(body.metadata.uid or "")
        return cast(kopf.BodyEssence, json.loads(encoded)) if encoded is not None else None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        uid = body.metadata.uid or ""
        if body.metadata.deletion_timestamp:
            self._handled.pop(uid, None)
            return
        self._handled[uid] = json.dumps(essence, separators=(",", ":"))

    def forget(self, body: kopf.Body) -> None:
        """A deleted Customer's (its deletion handler has finished)."""
        self._handled.pop(body.metadata.uid or "", None)


class TransientProgressStorage(kopf.AnnotationsProgressStorage):
    """Kopf's annotation progress storage, without its marker when no progress annotation stays.

    Storing a handler's progress adds the marker `iotistic.io/kopf-managed` (it tells other Kopf-based
    operators that the prefix is Kopf's) even when the progress is purged in the same cycle, as it is for
    a pass that succeeds at once: the marker alone was a PATCH of every new Customer. It is still written
    beside progress that stays (a handler Kopf will retry), and is never removed once written.
    """

    MARKER = "kopf-managed"

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        annotations = patch.get("metadata", {}).get("annotations", {})
        marker = f"{self.prefix}/{self.MARKER}"
        if marker not in annotations or marker in body.metadata.annotations:
            return
        staying = [k for k, v in annotations.items() if k.startswith(f"{self.prefix}/") and k != marker and v]
        if not staying:
            del annotations[marker]
            if not annotations:
                del patch["metadata"]["annotations"]
                if not patch["metadata"]:
                    del patch["metadata"]
