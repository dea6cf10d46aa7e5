"""The test harness's operator process: one that exits before it is live fails with its log's end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import OperatorProcess


def test_an_operator_that_exits_before_it_is_live_fails_with_the_end_of_its_log(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    operator = OperatorProcess(env, tmp_path / "operator.log")
    with pytest.raises(AssertionError) as failed:
        operator.start()
    assert "operator exited with 2" in str(failed.value)
    assert "iotistic-billing operator: DATABASE_URL: required" in str(failed.value)
