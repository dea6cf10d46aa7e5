"""Names the operator shares with the cluster: finalizer, labels, annotations, condition reasons
(its field manager is k8s.FieldManager.OPERATOR)."""

from __future__ import annotations

from typing import Final

from iotistic_billing.customer import CUSTOMER_ID_LABEL

FINALIZER: Final = "iotistic.io/customer-protection"

LABEL_CUSTOMER: Final = "iotistic.io/customer"
LABEL_CUSTOMER_ID: Final = CUSTOMER_ID_LABEL
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "iotistic-billing-operator"
# On helm's storage Secret of each revision: the values.values_hash it was installed with.
LABEL_VALUES_HASH: Final = "iotistic.io/values-hash"
# On it too: where the operator that ran its helm runs (helm.helm_runner), so that a pending revision left
# by a process killed with its helm is known by the process restarted in its place (release.py).
LABEL_HELM_RUNNER: Final = "iotistic.io/helm-runner"
# On it too: the operator's Pod that ran its helm (POD_NAME), so that a pending revision whose Pod is gone
# or replaced is known by any process to have lost its helm (helm.helm_pod_gone); and its uid (POD_UID),
# which tells that Pod from a later one of the same name (a StatefulSet's) without comparing clocks.
LABEL_HELM_POD: Final = "iotistic.io/helm-pod"
LABEL_HELM_POD_UID: Final = "iotistic.io/helm-pod-uid"
# On the licence Secret: the history action its licence was recorded under, so that a pass that
# crashed after writing the Secret records the same (jti, action) row, never a second one.
ANNOTATION_LICENSE_ACTION: Final = "iotistic.io/license-action"
# On the licence Secret, "true" when its licence was minted under spec.suspended: the next licence is
# `reinstated` only if this one was suspended, whatever re-mints came between (renewals, a deleted Secret).
ANNOTATION_LICENSE_SUSPENDED: Final = "iotistic.io/license-suspended"

# Kopf workers (one per object with pending events) per watched resource at most.
WORKER_LIMIT: Final = 32

RELEASE_NAME: Final = "instance"

# Condition reasons, CamelCase pairs.
LICENSE_ISSUED: Final = "LicenseIssued"
LICENSE_FAILED: Final = "LicenseFailed"
# PostgreSQL could not be reached for the licence's rows: the pass is retried with the passes' backoff.
DATABASE_UNAVAILABLE: Final = "DatabaseUnavailable"
INSTALL_SUCCEEDED: Final = "InstallSucceeded"
UPGRADE_SUCCEEDED: Final = "UpgradeSucceeded"
RELEASE_UNCHANGED: Final = "ReleaseUnchanged"
INSTALL_FAILED: Final = "InstallFailed"
UPGRADE_FAILED: Final = "UpgradeFailed"
CHART_VERSION_UNAVAILABLE: Final = "ChartVersionUnavailable"
CHART_VERSION_INVALID: Final = "ChartVersionInvalid"
CHART_PULL_FAILED: Final = "ChartPullFailed"
INVALID_SPEC: Final = "InvalidSpec"
# customer-<name> exists and is not this Customer's (namespace_holder): never written to, the Customer stalls.
NAMESPACE_TAKEN: Final = "NamespaceTaken"
# customer-<name> is being deleted (this Customer's, or an earlier one's of the same name): passes wait.
NAMESPACE_TERMINATING: Final = "NamespaceTerminating"
# The API server refused a request of a pass's step with a 4xx (an admission policy, an RBAC verb missing)
# (refusals.Refused): the step's condition names the object and the server's words. The namespace's (its
# create, or its read and the licence Secret's; a refused apply of the Customer's own namespace is a Warning
# Event alone, the pass going on) and the licence Secret's apply are Ready's reason
# too, a Warning Event once a cause, the pass retried with the passes' backoff (the policy may be mended);
# the webhook signing secret's copy is NotificationsReady's alone, looked at again every minute.
NAMESPACE_REFUSED: Final = "NamespaceRefused"
LICENSE_SECRET_REFUSED: Final = "LicenseSecretRefused"  # noqa: S105 (condition reasons, not secrets)
NOTIFICATIONS_SECRET_REFUSED: Final = "NotificationsSecretRefused"  # noqa: S105
PROGRESSING: Final = "Progressing"
DEPLOYMENTS_AVAILABLE: Final = "DeploymentsAvailable"
DEPLOYMENTS_UNAVAILABLE: Final = "DeploymentsUnavailable"
INSTANCE_DISABLED: Final = "InstanceDisabled"
TRIAL_ACTIVE: Final = "TrialActive"
TRIAL_EXPIRED: Final = "TrialExpired"
NOT_IN_TRIAL: Final = "NotInTrial"
MANUAL_BILLING: Final = "ManualBilling"
SUBSCRIPTION_ACTIVE: Final = "SubscriptionActive"
SUBSCRIPTION_PAST_DUE: Final = "SubscriptionPastDue"
SUBSCRIPTION_RESTRICTED: Final = "SubscriptionRestricted"
# PaymentOverdue's reasons: the steps of the dunning ladder, and none.
GRACE_PERIOD: Final = "GracePeriod"
RESTRICTED: Final = "Restricted"
PAYMENT_SUSPENDED: Final = "Suspended"
PAYMENTS_CURRENT: Final = "PaymentsCurrent"
# The subscription ended with a failed payment still unpaid: no step follows (it is unlicensed already).
CANCELED_UNPAID: Final = "CanceledUnpaid"
SUBSCRIPTION_LAPSED: Final = "SubscriptionLapsed"
NO_SUBSCRIPTION: Final = "NoSubscription"
SUSPENDED: Final = "Suspended"
RECONCILED: Final = "Reconciled"
# A Customer being deleted: Ready False and Reconciling True with this reason, phase Terminating.
TERMINATING: Final = "Terminating"
WEBHOOK_SECRET_READY: Final = "WebhookSecretReady"  # noqa: S105 (condition reasons, not secrets)
SECRET_NOT_FOUND: Final = "SecretNotFound"  # noqa: S105
SECRET_KEY_NOT_FOUND: Final = "SecretKeyNotFound"  # noqa: S105
INVALID_SECRET: Final = "InvalidSecret"  # noqa: S105
INVALID_WEBHOOK_URL: Final = "InvalidWebhookUrl"
# Why the housekeeping ran a pass: the Secret a webhook's secretRef names no longer holds what was copied.
WEBHOOK_SECRET_CHANGED: Final = "WebhookSecretChanged"  # noqa: S105
# Why the housekeeping ran a pass: metadata.generation moved past status.observedGeneration with no pass
# (edits that cancelled out while the Customer's Kopf worker was busy leave Kopf no spec change).
GENERATION_NOT_OBSERVED: Final = "GenerationNotObserved"

# Event reasons of a deletion (the finalizer, handlers.delete_customer): done, a step that failed, a
# release helm could not uninstall, left to the namespace's deletion (delete.release_left_to_namespace),
# and a Stripe subscription left billing (delete.subscription_left_billing).
DELETED: Final = "Deleted"
DELETION_FAILED: Final = "DeletionFailed"
UNINSTALL_FAILED: Final = "UninstallFailed"
SUBSCRIPTION_LEFT_ACTIVE: Final = "SubscriptionLeftActive"
# A Customer that Git manages goes by a customer id derived from its uid (customer.unpinned_customer_id).
CUSTOMER_ID_NOT_PINNED: Final = "CustomerIdNotPinned"
# A Stripe-billed Customer made again, its pass waiting for the inbox to give its subscription back.
SUBSCRIPTION_RESTORE_PENDING: Final = "SubscriptionRestorePending"
