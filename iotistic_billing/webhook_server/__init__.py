"""The aiohttp sidecar: Stripe webhooks, the admin API and usage reports."""
