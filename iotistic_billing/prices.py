"""The Stripe prices this server knows: each paid plan's (STRIPE_PRICE_*). The webhook server's routes,
the Stripe client and the Stripe inbox read them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from iotistic_billing.customer import PaidPlanName
from iotistic_billing.settings import Settings


@dataclass(frozen=True)
class PriceCatalog:
    """The Stripe price of each paid plan (STRIPE_PRICE_*), both ways."""

    prices: Mapping[PaidPlanName, str]

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceCatalog:
        configured: dict[PaidPlanName, str | None] = {
            "starter": settings.stripe_price_starter,
            "professional": settings.stripe_price_professional,
            "enterprise": settings.stripe_price_enterprise,
        }
        return cls({plan: price for plan, price in configured.items() if price})

    def price_for(self, plan: PaidPlanName) -> str | None:
        return self.prices.get(plan)

    def plan_for(self, price_id: str | None) -> PaidPlanName | None:
        return next((plan for plan, price in self.prices.items() if price == price_id), None)


__all__ = ["PriceCatalog"]
