"""A request of a pass's step that the API server refused with a 4xx (an admission policy, an RBAC verb
missing), raised as one error naming the object, for the pass to turn into the step's condition."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kubernetes.client.exceptions import ApiException

from iotistic_billing.k8s import refusal_message


class Refused(Exception):
    """What was asked of which object, and the API server's words. Not str(ApiException): it has the
    answer's headers (Audit-Id, Date), new every try, and the message is the cause its Warning Event is
    posted once for. 5xx, 429 and no answer are KubernetesUnavailable, never this."""

    def __init__(self, doing: str, error: ApiException) -> None:
        super().__init__(f"the API server refused {doing} ({error.status}): {refusal_message(error)}")
        self.status = error.status


@contextmanager
def refused_as(doing: str) -> Iterator[None]:
    """The API server's refusal of a request inside as Refused, saying `doing` ("to create namespace
    customer-acme")."""
    try:
        yield
    except ApiException as error:
        raise Refused(doing, error) from error


__all__ = ["Refused", "refused_as"]
