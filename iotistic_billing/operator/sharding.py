"""Which Customers this operator owns when several share the fleet (docs/architecture.md, "Shards").

Shard k > 0 owns the Customers labelled `iotistic.io/shard=k`; shard 0 owns every other one (no label,
`0`, or a shard that does not run), so a Customer is never left without an operator. The same rule is
the API server's label selector for Kopf's watch and a check of the fresh body at the start of a pass:
the instance Deployments and Secrets, whose events also start passes, are not sharded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from iotistic_billing.customer import SHARD_LABEL
from iotistic_billing.settings import shard_peering


@dataclass(frozen=True, slots=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be 0 to {self.count - 1}, got {self.index}")

    @property
    def _others(self) -> tuple[str, ...]:
        return tuple(str(index) for index in range(1, self.count))

    def selector(self) -> str | None:
        """The label selector of this shard's Customers; None when one operator owns them all."""
        if self.count == 1:
            return None
        if self.index == 0:
            # `notin` also selects objects without the label.
            return f"{SHARD_LABEL} notin ({','.join(self._others)})"
        return f"{SHARD_LABEL}={self.index}"

    def owns(self, labels: Mapping[str, str] | None) -> bool:
        if self.count == 1:
            return True
        value = (labels or {}).get(SHARD_LABEL)
        return value not in self._others if self.index == 0 else value == str(self.index)

    def peering(self, name: str) -> str:
        """This shard's Kopf peering (settings.shard_peering)."""
        return shard_peering(name, self.index)

    @property
    def runs_rollouts(self) -> bool:
        """InstanceRollouts span shards; shard 0 advances them, each shard's passes install them."""
        return self.index == 0

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
