"""bench/reconcile.py's checks and what it prints before a run is whole: the pure parts of the script
(the script itself is run by hand)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# bench/ is not a package: its scripts import each other by name, as they do when run.
sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import reconcile as bench

BENCH = Path(bench.__file__).parent


def test_the_progress_line_carries_no_ratio() -> None:
    """Printed before the licence Secrets are counted and all Customers are Ready, and for one size
    before the second bare loop: a ratio there is not the run's."""
    result = {"customers": 100, "operator_s": 20.0, "bare_helm_s": 17.0, "ratio": 1.18, "ratio_to_alone": 1.1}

    line = bench.progress_line(result)

    assert "ratio" not in line
    assert '"operator_s": 20.0' in line


def test_a_missing_licence_secret_stops_the_run_under_python_o() -> None:
    """`python -O` drops asserts: the check must not be one."""
    check = (
        f"import sys; sys.path.append({str(BENCH)!r}); import reconcile; "
        "reconcile.check_licence_secrets(99, 100, 1)"
    )

    done = subprocess.run([sys.executable, "-O", "-c", check], capture_output=True, text=True, timeout=60)

    assert done.returncode != 0
    assert "99 licence Secrets for 100 Customers and 1 warm-up(s)" in done.stderr


def test_the_ratio_is_against_the_mean_of_the_bare_loops_before_and_after() -> None:
    assert bench.against_bare(110.0, 90.0, 110.0) == {
        "bare_helm_s": 100.0,
        "ratio": 1.1,
        "bare_helm_before_s": 90.0,
        "bare_helm_after_s": 110.0,
    }


METRICS = """# HELP iotistic_operator_license_expiry_timestamp_seconds Expiry of each customer's licence
# TYPE iotistic_operator_license_expiry_timestamp_seconds gauge
iotistic_operator_license_expiry_timestamp_seconds{customer_id="cust_aaaa"} 1.8e+09
iotistic_operator_license_expiry_timestamp_seconds{customer_id="cust_bbbb"} 1.8e+09
iotistic_operator_helm_operations_total{operation="install",result="success"} 2.0
"""


def test_the_customers_a_shard_minted_for_are_read_from_its_metrics() -> None:
    assert bench.label_values(METRICS, bench.LICENCE_EXPIRY, "customer_id") == {"cust_aaaa", "cust_bbbb"}


def test_shards_that_each_handled_their_own_customers_and_together_all_pass() -> None:
    owners = {"cust_a0": 0, "cust_a1": 1, "cust_b0": 0, "cust_b1": 1}

    assert bench.shard_problems(owners, [{"cust_a0", "cust_b0"}, {"cust_a1", "cust_b1"}]) == []


def test_a_shard_that_handled_another_shards_customer_is_reported() -> None:
    owners = {"cust_a0": 0, "cust_a1": 1}

    problems = bench.shard_problems(owners, [{"cust_a0", "cust_a1"}, {"cust_a1"}])

    assert problems == ["shard 0 handled Customers of other shards: cust_a1"]


def test_a_customer_no_shard_handled_is_reported() -> None:
    owners = {"cust_a0": 0, "cust_a1": 1, "cust_b1": 1}

    problems = bench.shard_problems(owners, [{"cust_a0"}, {"cust_a1"}])

    assert problems == ["no shard handled: cust_b1"]
