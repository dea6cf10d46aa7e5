# syntax=docker/dockerfile:1.7
# One image for both components, `python -m <module>`: the operator by default; the webhook server's
# Deployment passes `iotistic_billing.webhook_server` as its args.
#
#   docker build -t iotistic-billing .
#   docker run iotistic-billing                                  # the operator
#   docker run iotistic-billing iotistic_billing.webhook_server  # the webhook server on :3100
#
# Pin the base images by digest (FROM image:tag@sha256:...) in the release pipeline.

ARG PYTHON_IMAGE=python:3.11-slim
# The helm the operator runs (operator/helm.py); the version bin/helm has in development.
ARG HELM_VERSION=4.3.1

# The official helm release binary (statically linked, so it runs on Debian as well), from the
# alpine/helm image of that exact version.
FROM alpine/helm:${HELM_VERSION} AS helm

# Wheels of the package and of every dependency, built where the build tools may live.
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY iotistic_billing ./iotistic_billing
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed non-root uid/gid: the chart's securityContext runs as 10001 and fsGroup 10001 reads the keys.
RUN groupadd --system --gid 10001 iotistic \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin iotistic
# Installed from the builder's wheels only (no index): what was built is what runs.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels iotistic-billing
COPY --from=helm /usr/bin/helm /usr/local/bin/helm
# The chart the operator installs per Customer (INSTANCE_CHART).
COPY charts/customer-instance /app/charts/customer-instance
RUN helm version --short && helm lint /app/charts/customer-instance --quiet

# The root filesystem is read-only in the cluster: everything that writes goes to /tmp (an emptyDir).
ENV HOME=/tmp \
    HELM_CACHE_HOME=/tmp/helm/cache \
    HELM_CONFIG_HOME=/tmp/helm/config \
    HELM_DATA_HOME=/tmp/helm/data \
    INSTANCE_CHART=/app/charts/customer-instance \
    HELM_BINARY=/usr/local/bin/helm
WORKDIR /app
USER 10001:10001
# 3100: the webhook server; 8080: the operator's /healthz; 8081: the operator's /metrics.
EXPOSE 3100 8080 8081
ENTRYPOINT ["python", "-m"]
CMD ["iotistic_billing.operator"]
