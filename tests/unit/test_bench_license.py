"""bench/license.py's verdict: the pure part of the script (the script itself is run by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ is not a package: its scripts import each other by name, as they do when run.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import license as bench


def test_a_target_missed_in_one_round_is_missed_though_the_median_meets_it() -> None:
    line, met = bench.summary("mint", [0.85, 0.79, 0.9], 0.8)

    assert not met
    assert "MISSED" in line


def test_the_line_shows_each_round_the_lowest_and_the_median() -> None:
    line, met = bench.summary("verify cold", [0.61, 0.55, 0.7], 0.5)

    assert met
    assert "0.61, 0.55, 0.70" in line
    assert "min 0.55" in line
    assert "median 0.61" in line


def test_a_measurement_without_a_target_is_only_printed() -> None:
    line, met = bench.summary("verify floor", [0.3, 0.2, 0.25], None)

    assert met
    assert "target" not in line
