"""The aiohttp sidecar: Stripe webhooks, the admin API and the routes customer instances call.

`create_app(settings)` in `app` builds it; `python -m iotistic_billing.webhook_server` runs it.
"""
