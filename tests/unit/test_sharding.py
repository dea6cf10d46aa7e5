"""The shard rule: every Customer owned by exactly one shard, whatever its label says."""

from __future__ import annotations

import pytest

from iotistic_billing.customer import SHARD_LABEL
from iotistic_billing.operator.sharding import Shard
from iotistic_billing.settings import SettingsError, load_settings


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("label", [None, "0", "1", "2", "4", "7", "gold", ""])
def test_each_customer_has_exactly_one_shard(count: int, label: str | None) -> None:
    labels = {} if label is None else {SHARD_LABEL: label}
    owners = [index for index in range(count) if Shard(index, count).owns(labels)]
    expected = int(label) if label and label.isdigit() and 0 < int(label) < count else 0
    assert owners == [expected]


def test_unsharded_operator_owns_everything_and_selects_nothing() -> None:
    shard = Shard()
    assert shard.selector() is None
    assert shard.owns(None) and shard.owns({SHARD_LABEL: "3"})
    assert shard.peering("iotistic-billing") == "iotistic-billing"
    assert shard.runs_rollouts


def test_selectors_are_the_api_servers_form_of_the_rule() -> None:
    assert Shard(0, 3).selector() == "iotistic.io/shard notin (1,2)"
    assert Shard(2, 3).selector() == "iotistic.io/shard=2"


def test_each_shard_has_a_peering_of_its_own_and_only_shard_zero_runs_rollouts() -> None:
    shards = [Shard(index, 3) for index in range(3)]
    assert [shard.peering("iotistic-billing") for shard in shards] == [
        "iotistic-billing",
        "iotistic-billing-shard-1",
        "iotistic-billing-shard-2",
    ]
    assert [shard.peering("") for shard in shards] == ["", "", ""]  # standalone stays standalone
    assert [shard.runs_rollouts for shard in shards] == [True, False, False]


def test_a_shard_outside_the_count_is_refused() -> None:
    with pytest.raises(ValueError, match="shard index must be 0 to 1, got 2"):
        Shard(2, 2)


def test_settings_name_the_shard_that_does_not_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERATOR_SHARDS", "2")
    monkeypatch.setenv("OPERATOR_SHARD", "2")
    with pytest.raises(SettingsError, match=r"OPERATOR_SHARD: must be below OPERATOR_SHARDS \(2\), got 2"):
        load_settings()
    monkeypatch.setenv("OPERATOR_SHARDS", "0")
    monkeypatch.setenv("OPERATOR_SHARD", "0")
    with pytest.raises(SettingsError, match="OPERATOR_SHARDS"):
        load_settings()
