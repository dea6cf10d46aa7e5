"""`iotistic-billing license`: mint, verify and show licences by hand (support, tests, air-gapped sites)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from iotistic_billing.cli import CommandError, given_option
from iotistic_billing.customer import CUSTOMER_ID_PATTERN
from iotistic_billing.licensing.keys import LicenseKeyError, SigningKeys
from iotistic_billing.licensing.minting import (
    SUBSCRIPTION_STATUSES,
    LicenseCustomer,
    MintingError,
    SubscriptionTerms,
    TrialTerms,
    mint_license,
)
from iotistic_billing.licensing.plans import PLAN_NAMES, UNLICENSED_PLAN_NAME, plan_by_name
from iotistic_billing.licensing.verifier import LicenseVerifier
from iotistic_billing.settings import Settings, SettingsError, load_settings
from iotistic_billing.webhook_server.keyring import LicenseKeyring

MAX_TRIAL_DAYS = 90  # spec.trial.days of the Customer resource
MAX_LIFETIME_DAYS = 366


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    license_parser = subparsers.add_parser("license", help="mint, verify and show licences")
    license_parser.set_defaults(help_parser=license_parser)
    commands = license_parser.add_subparsers(title="license commands", metavar="COMMAND")

    mint = commands.add_parser(
        "mint",
        help="sign a licence and print the JWT",
        description="Sign a licence with the private key (LICENSE_PRIVATE_KEY_PATH) and print the JWT.",
    )
    mint.add_argument(
        "--customer-id", required=True, help="customer id: cust_ and 6-32 of a-z0-9, e.g. cust_abc123"
    )
    mint.add_argument("--name", required=True, help="customer (company) name")
    mint.add_argument("--plan", required=True, choices=(*PLAN_NAMES, UNLICENSED_PLAN_NAME))
    mint.add_argument(
        "--trial-days",
        type=int,
        metavar="N",
        help="trial ending in N days (default for --plan trial: DEFAULT_TRIAL_DAYS)",
    )
    mint.add_argument(
        "--subscription-status", choices=SUBSCRIPTION_STATUSES, help="default trialing or active"
    )
    mint.add_argument("--private-key", type=Path, metavar="PATH", help="default LICENSE_PRIVATE_KEY_PATH")
    mint.add_argument("--lifetime-days", type=int, metavar="N", help="default LICENSE_LIFETIME_DAYS (30)")
    mint.add_argument("--issuer", help="default LICENSE_ISSUER")
    mint.add_argument("--audience", help="default LICENSE_AUDIENCE")
    mint.set_defaults(handler=_mint)

    verify = commands.add_parser(
        "verify",
        help="verify a licence; exit 1 when it is invalid",
        description=(
            "Verify signature, validity window, audience and, with --customer-id, the customer; print valid"
            " or invalid and the reason."
        ),
    )
    verify.add_argument("token", metavar="TOKEN", help="the JWT, or - to read it from standard input")
    source = verify.add_mutually_exclusive_group()
    source.add_argument(
        "--public-key",
        type=Path,
        action="append",
        metavar="PATH",
        help="PEM public key, repeatable (default: LICENSE_PUBLIC_KEY_PATH, else the public half of"
        " LICENSE_PRIVATE_KEY_PATH, and LICENSE_EXTRA_PUBLIC_KEY_PATHS)",
    )
    source.add_argument("--jwks", type=Path, metavar="FILE", help="JWKS document of the public keys")
    verify.add_argument("--audience", help="default LICENSE_AUDIENCE")
    verify.add_argument("--issuer", help="also require this issuer")
    verify.add_argument(
        "--customer-id",
        help="also require this customer (claims customerId and sub): the instance's CUSTOMER_ID",
    )
    verify.set_defaults(handler=_verify)

    show = commands.add_parser("show", help="decode a licence WITHOUT verifying it; print header and claims")
    show.add_argument("token", metavar="TOKEN", help="the JWT, or - to read it from standard input")
    show.set_defaults(handler=_show)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise CommandError(str(exc)) from None


def _token(argument: str) -> str:
    try:
        token = sys.stdin.read() if argument == "-" else argument
    except UnicodeError:  # read strictly, as under a UTF-8 locale without Python's UTF-8 mode
        raise CommandError("TOKEN: not a JWT (not UTF-8 text)") from None
    token = token.strip()
    if not token:
        raise CommandError("TOKEN: empty (pass the JWT, or - and the JWT on standard input)")
    return token


def _mint(args: argparse.Namespace) -> int:
    settings = _settings()
    if not re.fullmatch(CUSTOMER_ID_PATTERN, args.customer_id):
        # A licence names a customer id the Customers, the API and the history can hold (spec.customerId).
        refused = args.customer_id
        raise CommandError(
            f"--customer-id: must match {CUSTOMER_ID_PATTERN} as spec.customerId does, got {refused!r}"
        )
    if not args.name.strip():
        raise CommandError("--name: must not be empty")
    lifetime_days = settings.license_lifetime_days if args.lifetime_days is None else args.lifetime_days
    if not 1 <= lifetime_days <= MAX_LIFETIME_DAYS:
        raise CommandError(f"--lifetime-days: must be between 1 and {MAX_LIFETIME_DAYS}, got {lifetime_days}")
    trial_days = args.trial_days
    if trial_days is not None and not 1 <= trial_days <= MAX_TRIAL_DAYS:
        raise CommandError(f"--trial-days: must be between 1 and {MAX_TRIAL_DAYS}, got {trial_days}")
    if trial_days is None and args.plan == "trial":
        trial_days = settings.default_trial_days
        if trial_days == 0:  # valid for the webhook server's signups (a trial that ends at once)
            raise CommandError("--trial-days: not given, and DEFAULT_TRIAL_DAYS is 0: the licence ends now")
    private_key_path = args.private_key or settings.license_private_key_path
    if private_key_path is None:
        raise CommandError("--private-key: not given and LICENSE_PRIVATE_KEY_PATH is not set")
    try:
        keys = SigningKeys.from_pem_files(private_key_path)
    except LicenseKeyError as exc:
        source = "--private-key" if args.private_key else "LICENSE_PRIVATE_KEY_PATH"
        raise CommandError(f"{source}: {exc}") from None

    now = datetime.now(UTC)
    trial = TrialTerms(is_trial_mode=False)
    if trial_days is not None:
        trial = TrialTerms(is_trial_mode=True, ends_at=now + timedelta(days=trial_days))
    status = args.subscription_status or ("trialing" if trial.is_trial_mode else "active")
    try:
        minted = mint_license(
            customer=LicenseCustomer(args.customer_id, args.name),
            plan=plan_by_name(args.plan, allow_unlicensed=True),
            trial=trial,
            subscription=SubscriptionTerms(status),
            now=now,
            keys=keys,
            issuer=given_option(args.issuer, "--issuer") or settings.license_issuer,
            audience=given_option(args.audience, "--audience") or settings.license_audience,
            lifetime=timedelta(days=lifetime_days),
        )
    except MintingError as exc:
        raise CommandError(str(exc)) from None
    print(minted.token)
    return 0


def _verifier(args: argparse.Namespace) -> LicenseVerifier:
    settings = _settings()
    audience = given_option(args.audience, "--audience") or settings.license_audience
    issuer = given_option(args.issuer, "--issuer")
    try:
        if args.jwks is not None:
            try:
                document = args.jwks.read_text()
            except OSError as exc:
                raise CommandError(f"--jwks: cannot read {args.jwks} ({exc.strerror})") from None
            return LicenseVerifier.from_jwks(document, audience=audience, issuer=issuer)
        if args.public_key:
            return LicenseVerifier.from_pem_files(*args.public_key, audience=audience, issuer=issuer)
    except (LicenseKeyError, ValueError) as exc:
        raise CommandError(f"{'--jwks' if args.jwks is not None else '--public-key'}: {exc}") from None
    # The settings' public keys, the private key's public half only without LICENSE_PUBLIC_KEY_PATH:
    # a shell that cannot read the operator's private key still verifies. Errors name the variable.
    try:
        keyring = LicenseKeyring.from_settings(settings, verifier=True)
    except SettingsError as exc:
        raise CommandError(str(exc)) from None
    if not keyring.configured:
        raise CommandError(
            "--public-key: not given and neither LICENSE_PUBLIC_KEY_PATH nor LICENSE_PRIVATE_KEY_PATH is set"
        )
    return LicenseVerifier(keyring.public_keys, audience=audience, issuer=issuer)


def _verify(args: argparse.Namespace) -> int:
    customer_id = given_option(args.customer_id, "--customer-id")
    if customer_id is not None and not re.fullmatch(CUSTOMER_ID_PATTERN, customer_id):
        raise CommandError(
            f"--customer-id: must match {CUSTOMER_ID_PATTERN} as spec.customerId does, got {customer_id!r}"
        )
    verifier = _verifier(args)
    license = verifier.verify(_token(args.token), customer_id=customer_id)
    if not license.valid:
        print(f"invalid: {license.reason}")
        return 1
    expires = license.expires_at.isoformat() if license.expires_at else "never"
    trial = f", trial ends {license.trial.ends_at.isoformat()}" if license.trial.ends_at else ""
    print(
        f"valid: customer {license.customer_id} ({license.customer_name}), plan {license.plan}, "
        f"maxDevices {license.features.max_devices}, key {license.kid}, expires {expires}{trial}"
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    token = _token(args.token)
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise CommandError(f"TOKEN: not a JWT ({exc})") from None
    except UnicodeError:  # bytes that are not UTF-8 on standard input
        raise CommandError("TOKEN: not a JWT (not UTF-8 text)") from None
    print(json.dumps({"verified": False, "header": header, "claims": claims}, indent=2))
    return 0
