"""Notices to customers and the platform team: written in the transaction of the fact that causes them
(the outbox), then sent by mail and signed webhooks, each once (docs/architecture.md, "Notices")."""
