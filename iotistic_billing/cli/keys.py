"""`iotistic-billing keys`: create the licence signing key pair and publish public keys as JWKS."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iotistic_billing.cli import CommandError
from iotistic_billing.licensing.keys import (
    ALLOWED_KEY_SIZES,
    LicenseKeyError,
    generate_private_key,
    jwk_thumbprint,
    jwks_document,
    read_public_key,
    write_key_pair,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = subparsers.add_parser("keys", help="licence signing keys")
    keys.set_defaults(help_parser=keys)
    commands = keys.add_subparsers(title="keys commands", metavar="COMMAND")

    generate = commands.add_parser(
        "generate",
        help="write a new RSA key pair and print its key id",
        description="Write private-key.pem (mode 0600) and public-key.pem; print the key id (RFC 7638).",
    )
    generate.add_argument(
        "--bits",
        type=int,
        default=2048,
        help=f"RSA key size, one of {', '.join(map(str, ALLOWED_KEY_SIZES))} (default 2048)",
    )
    generate.add_argument(
        "--out", type=Path, default=Path("keys"), metavar="DIR", help="directory (default keys)"
    )
    generate.add_argument("--force", action="store_true", help="replace an existing key pair in DIR")
    generate.set_defaults(handler=_generate)

    jwks = commands.add_parser("jwks", help="print the JWKS document of public keys (signing key first)")
    jwks.add_argument("public_keys", nargs="+", type=Path, metavar="PUBLIC_KEY", help="PEM public key files")
    jwks.set_defaults(handler=_jwks)


def _generate(args: argparse.Namespace) -> int:
    try:
        private_key = generate_private_key(args.bits)
    except LicenseKeyError as exc:
        raise CommandError(f"--bits: {exc}") from None
    try:
        private_path, public_path = write_key_pair(private_key, args.out, overwrite=args.force)
    except LicenseKeyError as exc:
        raise CommandError(f"--out: {exc} (pass --force to replace it)") from None
    except OSError as exc:
        raise CommandError(f"--out: cannot write to {args.out} ({exc.strerror})") from None
    # The key id alone on stdout, for scripts; the rest is for people.
    print(f"wrote {private_path} (mode 0600) and {public_path}", file=sys.stderr)
    print(jwk_thumbprint(private_key.public_key()))
    return 0


def _jwks(args: argparse.Namespace) -> int:
    try:
        keys = [read_public_key(path) for path in args.public_keys]
    except LicenseKeyError as exc:
        raise CommandError(f"PUBLIC_KEY: {exc}") from None
    print(json.dumps(jwks_document(keys), indent=2))
    return 0
