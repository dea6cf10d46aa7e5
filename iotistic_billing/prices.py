"""The Stripe prices this server knows: each paid plan's (STRIPE_PRICE_*) and the metered prices of
the usage overage (STRIPE_METERED_PRICES), and which item of a Stripe subscription is its plan's. The
webhook server's routes, the Stripe client and the Stripe inbox read them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iotistic_billing.customer import PaidPlanName
from iotistic_billing.settings import Settings


@dataclass(frozen=True)
class PriceCatalog:
    """The Stripe price of each paid plan (STRIPE_PRICE_*), both ways, and the metered prices."""

    prices: Mapping[PaidPlanName, str]
    metered: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceCatalog:
        configured: dict[PaidPlanName, str | None] = {
            "starter": settings.stripe_price_starter,
            "professional": settings.stripe_price_professional,
            "enterprise": settings.stripe_price_enterprise,
        }
        return cls(
            {plan: price for plan, price in configured.items() if price},
            tuple(settings.stripe_metered_prices),
        )

    def price_for(self, plan: PaidPlanName) -> str | None:
        return self.prices.get(plan)

    def plan_for(self, price_id: str | None) -> PaidPlanName | None:
        return next((plan for plan, price in self.prices.items() if price == price_id), None)

    def plan_items(self, subscription: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """The items of a Stripe subscription (its JSON) on a plan's price: one in a subscription a
        checkout made, beside its metered prices, in whatever order Stripe lists them."""
        items = subscription.get("items")
        data = items.get("data") if isinstance(items, Mapping) else None
        if not isinstance(data, list):
            return []
        return [item for item in data if isinstance(item, Mapping) and self.plan_for(item_price(item))]

    def plan_item(self, subscription: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The subscription's one item on a plan's price; None when it has none, or several."""
        items = self.plan_items(subscription)
        return items[0] if len(items) == 1 else None


def item_price(item: Mapping[str, Any]) -> str | None:
    """The price id of a subscription item (Stripe expands it into the price object)."""
    price = item.get("price")
    if isinstance(price, Mapping):
        price = price.get("id")
    return price if isinstance(price, str) else None


__all__ = ["PriceCatalog", "item_price"]
