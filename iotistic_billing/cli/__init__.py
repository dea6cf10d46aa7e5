"""The `iotistic-billing` command line: one subcommand module per area, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Final, Protocol

# Add a subcommand by adding its module here. Modules are imported when the parser is built, so each
# stays free to import what it needs and `iotistic-billing license verify` loads no database code.
COMMAND_MODULES: Final = (
    "iotistic_billing.cli.keys",
    "iotistic_billing.cli.license",
    "iotistic_billing.cli.customer",
    "iotistic_billing.cli.usage",
)

PROGRAM: Final = "iotistic-billing"

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """Why a command cannot be done, in one sentence. Raised as such: a mistake of the caller (a missing
    file, a bad value), the message naming the argument; exit 2."""

    exit_code = 2


class ServiceUnavailable(CommandError):
    """A service the command needs (the API server, PostgreSQL) cannot be reached or did not answer:
    the same command may work later. Exit 1, so that a cron job tells it from a command to fix."""

    exit_code = 1


# What `--help` says of the exit status; README.md's CLI section says the same.
EXIT_CODES: Final = """exit status:
  0  done
  1  a service (the API server, PostgreSQL) cannot be reached or did not
     answer: try again later; `license verify`: the licence is invalid
  2  a mistake in the command or its settings, or a change refused: the
     message names the argument
"""


def given_option(value: str | None, flag: str) -> str | None:
    """An option as given; an empty one is refused by name, not taken for its default."""
    if value is not None and not value.strip():
        raise CommandError(f"{flag}: must not be empty (leave it out for the default)")
    return value


class CommandModule(Protocol):
    def register(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Iotistic billing and licensing tools.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module: CommandModule = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        # A command group without its subcommand (`iotistic-billing keys`): show what it offers.
        help_parser: argparse.ArgumentParser = getattr(args, "help_parser", parser)
        help_parser.print_help(sys.stderr)
        return 2
    try:
        code = handler(args)
        sys.stdout.flush()  # here, not at exit: a pipe's reader gone shows as the BrokenPipeError below
        return code
    except CommandError as exc:
        print(f"{PROGRAM}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `... | head`: the reader is gone, as for any Unix tool; Python's flush at exit would raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


__all__ = [
    "COMMAND_MODULES",
    "EXIT_CODES",
    "CommandError",
    "ServiceUnavailable",
    "build_parser",
    "given_option",
    "main",
]
