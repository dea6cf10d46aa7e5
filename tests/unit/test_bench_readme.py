"""The README's benchmark commands: each line's arguments as its script reads them (the benchmarks run
for minutes on parts of their own, by hand, so make test only parses them)."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# bench/ is not a package: its scripts import each other by name, as they do when run.
sys.path.append(str(REPO / "bench"))

BENCH_LINE = re.compile(r"^\.venv/bin/python bench/(?P<script>\w+)\.py(?P<arguments>[^#\n]*)", re.MULTILINE)


def readme_bench_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of each line of the README that runs a benchmark, comments left off."""
    text = (REPO / "README.md").read_text()
    return [(m["script"], shlex.split(m["arguments"])) for m in BENCH_LINE.finditer(text)]


def test_the_readme_lists_the_benchmarks() -> None:
    """The pattern finds the README's benchmark block (a reworded line would leave the test below with
    nothing to parse)."""
    scripts = {script for script, _ in readme_bench_commands()}
    assert scripts >= {"license", "reconcile", "apiserver", "webhooks", "mail", "rollout", "kube_client"}


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        pytest.param(script, arguments, id=shlex.join([script, *arguments]))
        for script, arguments in readme_bench_commands()
    ],
)
def test_a_readme_benchmark_command_s_arguments_are_its_script_s(script: str, arguments: list[str]) -> None:
    """Found in review: nothing read the README's benchmark commands, so a flag renamed or dropped in a
    script (or a value it no longer takes) left a command that fails as a person types it."""
    bench = importlib.import_module(script)
    bench.arguments(arguments)  # argparse exits (SystemExit 2) on a flag or value the script refuses


@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("reconcile", ["--sizes", "1,10", "--idel", "70"]),
        ("reconcile", ["--sizes", "1,ten"]),
        ("reconcile", ["--sizes", "1,10", "--shards", "2"]),
        ("webhooks", ["--rates", "100,fast"]),
        ("license", ["--seconds"]),
    ],
)
def test_a_drifted_benchmark_command_is_refused(script: str, arguments: list[str]) -> None:
    """What the test above relies on: a script's arguments() refuses what its run would."""
    with pytest.raises(SystemExit) as refused:
        importlib.import_module(script).arguments(arguments)
    assert refused.value.code == 2
