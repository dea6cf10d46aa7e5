"""A request of a pass's step that the API server refused with a 4xx (an admission policy, an RBAC verb
missing), raised as one error naming the object, for the pass to turn into the step's condition."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kubernetes.client.exceptions import ApiException

from iotistic_billing.k8s import refusal_causes, refusal_message


class Refused(Exception):
    """What was asked of which object, and the API server's words. Not str(ApiException): it has the
    answer's headers (Audit-Id, Date), new every try, and the message is the cause its Warning Event is
    posted once for. 5xx, 429 and no answer are KubernetesUnavailable, never this."""

    def __init__(self, doing: str, error: ApiException) -> None:
        super().__init__(f"the API server refused {doing} ({error.status}): {refusal_message(error)}")
        self.status = error.status


class NamespaceGoing(Exception):
    """A write into the Customer's namespace answered as one being deleted or gone (403 whose cause is
    NamespaceTerminating, 404): no policy's refusal, so no Refused and no Event blaming one; the pass
    looks at the namespace again."""

    def __init__(self, doing: str, error: ApiException) -> None:
        super().__init__(f"{doing}: {refusal_message(error)}; the namespace is looked at again")


@contextmanager
def refused_as(doing: str) -> Iterator[None]:
    """The API server's refusal of a request inside as Refused, saying `doing` ("to create namespace
    customer-acme"); a namespace being deleted or gone as NamespaceGoing. A 409 stays the ApiException:
    a conditional write's object changed since it was read, for the caller to read again."""
    try:
        yield
    except ApiException as error:
        if error.status == 409:
            raise
        if error.status == 404 or _namespace_terminating(error):
            raise NamespaceGoing(doing, error) from error
        raise Refused(doing, error) from error


def _namespace_terminating(error: ApiException) -> bool:
    """A write refused because its namespace is being deleted: the API server's 403 whose
    details.causes[].reason is NamespaceTerminating (a policy's 403 has none)."""
    return error.status == 403 and any(
        cause.get("reason") == "NamespaceTerminating" for cause in refusal_causes(error)
    )


__all__ = ["NamespaceGoing", "Refused", "refused_as"]
