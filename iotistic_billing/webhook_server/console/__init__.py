"""The admin console: server-rendered pages under /admin/ for the billing and support team, over the same
services the JSON API uses (docs/architecture.md, "The admin console")."""
