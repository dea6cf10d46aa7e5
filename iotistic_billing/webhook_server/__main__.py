"""`python -m iotistic_billing.webhook_server`: settings first (a bad one exits 2 naming the variable),
then the server on PORT until SIGTERM or SIGINT, which let in-flight requests finish."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from iotistic_billing.settings import SettingsError, load_settings
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.options import ServerOptions

log = logging.getLogger("iotistic_billing.webhook_server")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The SDK logs request parameters at debug level; they never belong in our logs.
    logging.getLogger("stripe").setLevel(logging.WARNING)
    try:
        settings = load_settings()
        if settings.database_url is None:
            raise SettingsError("DATABASE_URL: required by the webhook server (make dev sets it in .dev/env)")
        options = ServerOptions()
        app = create_app(settings, options=options)
    except SettingsError as error:
        print(f"iotistic-billing webhook server: {error}", file=sys.stderr)
        return 2
    log.info(
        "listening on :%d (Stripe %s, admin API %s)",
        settings.port,
        "configured" if settings.stripe_configured else "not configured",
        "enabled" if settings.admin_api_token is not None else "closed: ADMIN_API_TOKEN unset",
    )
    # run_app turns SIGTERM and SIGINT into a graceful exit: the listener closes, in-flight requests get
    # shutdown_timeout seconds to finish, then cleanup_ctx closes the clients.
    web.run_app(
        app,
        host="0.0.0.0",  # noqa: S104 - a server in a Pod listens on its Pod's addresses
        port=settings.port,
        shutdown_timeout=options.shutdown_timeout,
        handle_signals=True,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
