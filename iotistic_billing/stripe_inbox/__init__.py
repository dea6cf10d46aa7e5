"""The Stripe event inbox: events stored on receipt, then applied in order to Customers and the
subscriptions table (docs/architecture.md, "Stripe events")."""
