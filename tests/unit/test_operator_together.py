"""`together`: the pass's two concurrent API steps (the namespace and the read of the licence Secret)."""

from __future__ import annotations

import asyncio

import pytest

from iotistic_billing.operator.reconcile import together


async def test_both_results_come_back_in_order() -> None:
    async def slow() -> str:
        await asyncio.sleep(0.01)
        return "namespace"

    async def fast() -> int:
        return 1

    assert await together(slow(), fast()) == ("namespace", 1)


async def test_a_failure_is_raised_only_after_the_other_step_ended() -> None:
    ended: list[str] = []

    async def fails() -> None:
        raise RuntimeError("forbidden")

    async def still_running() -> str:
        await asyncio.sleep(0.01)
        ended.append("read")
        return "secret"

    with pytest.raises(RuntimeError, match="forbidden"):
        await together(fails(), still_running())
    assert ended == ["read"]


async def test_the_first_failure_wins_when_both_fail() -> None:
    async def fails(message: str) -> None:
        raise RuntimeError(message)

    with pytest.raises(RuntimeError, match="namespace"):
        await together(fails("namespace"), fails("secret"))
