"""`python -m iotistic_billing.webhook_server`: settings first (a bad one exits 2 naming the variable),
then the server on PORT until SIGTERM or SIGINT, which let in-flight requests finish.

The server answers Stripe once an event is stored; applying events is the job of a second process it
starts beside itself (`--role inbox`, health and metrics on STRIPE_INBOX_PORT), on the other core, so
that applying never delays an answer. It is restarted if it dies, and stopped with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from kubernetes.client.exceptions import ApiException

from iotistic_billing.k8s import FieldManager, KubeApi, KubernetesUnavailable, api_client, refusal_message
from iotistic_billing.logs import configure_logging
from iotistic_billing.processes import ManagedProcess
from iotistic_billing.served_crds import CUSTOMERS_CRD, StaleCrds, WrittenCrd, check_served_crds
from iotistic_billing.settings import Settings, SettingsError, load_settings
from iotistic_billing.usage.options import UsageOptions
from iotistic_billing.webhook_server.access_log import access_log_arguments
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.options import RateLimit, ServerOptions

log = logging.getLogger("iotistic_billing.webhook_server")


def start_inbox(settings: Settings) -> Callable[[web.Application], Awaitable[None]]:
    """An on_startup hook: run the inbox process for as long as the server runs."""

    port = inbox_port(settings)

    async def run(app: web.Application) -> None:
        argv = [sys.executable, "-m", "iotistic_billing.webhook_server", "--role", "inbox"]
        env = {**os.environ, "PORT": str(port)}

        async def supervise() -> None:
            while True:
                child = ManagedProcess("stripe-inbox", argv, None, env=env)
                try:
                    # The thread ends with the process, also when cancelling stops it below.
                    await asyncio.to_thread(child.process.wait)
                    log.warning("stripe inbox process exited with %s; restarting", child.process.returncode)
                finally:
                    child.stop()
                await asyncio.sleep(1)

        task = asyncio.create_task(supervise())

        async def stop(app: web.Application) -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.on_cleanup.append(stop)

    return run


def inbox_port(settings: Settings) -> int:
    """STRIPE_INBOX_PORT, or PORT + 1 when it is 0; a port the server does not use itself."""
    port = settings.stripe_inbox_port or settings.port + 1
    if port > 65535:
        raise SettingsError(f"STRIPE_INBOX_PORT: unset, it is PORT + 1 = {port}, not a port; set it")
    if port == settings.port:
        raise SettingsError(f"STRIPE_INBOX_PORT: must differ from PORT (both {port})")
    return port


async def freeze_startup_objects(app: web.Application) -> None:
    """What the start made (modules, schemas, clients: some 235,000 objects) lives as long as the
    process: out of the cyclic collector's full passes, which then walk what requests make
    (bench/README.md, bench/usage.py)."""
    gc.freeze()


def stale_crds(crds: Sequence[WrittenCrd], timeout: float) -> str | None:
    """Why not to start: a Customer CRD older than this version, which would drop what the server
    writes (spec.subscription, status.usage) in silence. An API server that cannot be read is no reason,
    only logged: Stripe's events and usage reports need PostgreSQL alone."""
    api = KubeApi(api_client("webhook-server"), FieldManager.SIGNUP, timeout=timeout)
    try:
        check_served_crds(api, crds)
    except StaleCrds as error:
        return str(error)
    except KubernetesUnavailable as error:
        log.warning("CRDs not checked: %s", error)
    except ApiException as error:
        log.warning("CRDs not checked: %s", refusal_message(error))
    finally:
        api.close()
    return None


def main(argv: list[str] | None = None, crds: Sequence[WrittenCrd] = (CUSTOMERS_CRD,)) -> int:
    """`crds`: the CRDs the server checks before it starts (the tests name a stale copy)."""
    parser = argparse.ArgumentParser(prog="python -m iotistic_billing.webhook_server")
    parser.add_argument("--role", choices=("server", "inbox"), default="server")
    role = parser.parse_args(argv).role
    if role == "inbox":
        # Below the server in CPU priority: under load, answering Stripe comes first, applying follows.
        os.nice(10)
    configure_logging(os.environ.get("LOG_FORMAT", "json"))
    # The SDK logs request parameters at debug level; they never belong in our logs.
    logging.getLogger("stripe").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        if settings.database_url is None:
            raise SettingsError("DATABASE_URL: required by the webhook server (make dev sets it in .dev/env)")
        limit = RateLimit(settings.rate_limit_per_second, settings.rate_limit_burst)
        workers = settings.stripe_inbox_workers if role == "inbox" else 0
        options = ServerOptions(
            rate_per_address=limit,
            rate_per_key=limit,
            wrong_tokens_per_address=RateLimit.per_minute(settings.wrong_tokens_per_minute),
            wrong_tokens=RateLimit.per_minute(settings.wrong_tokens_per_minute_total),
            trusted_proxies=tuple(settings.trusted_proxies),
            license_wait=settings.signup_license_wait,
            inbox_workers=workers,
            probes_only=role == "inbox",
        )
        usage = UsageOptions(
            flush_interval=settings.usage_flush_interval,
            # The inbox process receives no reports; one meter run at a time is enough (it is locked).
            meter_interval=settings.usage_meter_interval if role == "server" else None,
            key_cache_ttl=settings.usage_key_cache_ttl,
            close_grace=settings.usage_close_grace,
            raw_retention_months=settings.usage_raw_retention,
        )
        app = create_app(settings, options=options, usage=usage)
        if role == "server" and settings.stripe_inbox_workers > 0:
            app.on_startup.append(start_inbox(settings))
        app.on_startup.append(freeze_startup_objects)
    except SettingsError as error:
        print(f"iotistic-billing webhook server: {error}", file=sys.stderr)
        return 2
    # The server's alone: the inbox process it starts runs after this check.
    stale = stale_crds(crds, options.kube_timeout) if role == "server" else None
    if stale is not None:
        print(f"iotistic-billing webhook server: {stale}", file=sys.stderr)
        return 1
    log.info(
        "%s listening on :%d (Stripe %s, admin API %s)",
        role,
        settings.port,
        # Whether Stripe takes the key is the next line, once the app has called it.
        "key set" if settings.stripe_configured else "not configured",
        "enabled" if settings.admin_api_token is not None else "closed: ADMIN_API_TOKEN unset",
    )
    # run_app turns SIGTERM and SIGINT into a graceful exit: the listener closes, in-flight requests get
    # shutdown_timeout seconds to finish, then cleanup_ctx closes the clients.
    web.run_app(
        app,
        # No host: every address of each family the kernel has (asyncio binds 0.0.0.0 and ::), so an
        # IPv6 or dual-stack cluster's kubelet, Service and ingress reach it as an IPv4 one's do.
        host=None,
        port=settings.port,
        shutdown_timeout=options.shutdown_timeout,
        handle_signals=True,
        print=None,
        # A line a request, less the probes and scrapes that succeed; none with ACCESS_LOG=false.
        **access_log_arguments(settings),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
