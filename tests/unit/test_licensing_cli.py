"""`iotistic-billing keys` and `iotistic-billing license`, through main(argv) and the installed script."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from iotistic_billing.cli import main
from iotistic_billing.licensing.keys import jwk_thumbprint, read_public_key

SCRIPT = Path(sys.executable).parent / "iotistic-billing"
AUDIENCE = "iotistic-instance"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer shell that sourced .dev/env must not change what these tests see.
    for name in (
        "LICENSE_PRIVATE_KEY_PATH",
        "LICENSE_PUBLIC_KEY_PATH",
        "LICENSE_EXTRA_PUBLIC_KEY_PATHS",
        "LICENSE_ISSUER",
        "LICENSE_AUDIENCE",
        "LICENSE_LIFETIME_DAYS",
        "DEFAULT_TRIAL_DAYS",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cli-keys")
    assert main(["keys", "generate", "--out", str(directory)]) == 0
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mint(capsys: pytest.CaptureFixture[str], key_dir: Path, *extra: str) -> str:
    code, out, err = run(
        capsys,
        "license",
        "mint",
        "--customer-id",
        "cust_abc123",
        "--name",
        "Acme Corp",
        "--private-key",
        str(key_dir / "private-key.pem"),
        *extra,
    )
    assert code == 0, err
    return out.strip()


def test_keys_generate_writes_the_pair_and_prints_the_kid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "keys", "generate", "--bits", "3072", "--out", str(tmp_path / "keys"))
    assert code == 0, err
    public = read_public_key(tmp_path / "keys" / "public-key.pem")
    assert public.key_size == 3072
    assert out.strip() == jwk_thumbprint(public)
    assert stat.S_IMODE((tmp_path / "keys" / "private-key.pem").stat().st_mode) == 0o600


def test_keys_generate_refuses_other_sizes_naming_the_argument(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "keys", "generate", "--bits", "1024", "--out", str(tmp_path))
    assert code == 2
    assert "error: --bits: RSA key size must be one of 2048, 3072, 4096 bits, got 1024" in err
    assert not (tmp_path / "private-key.pem").exists()


def test_keys_generate_does_not_replace_a_key_without_force(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run(capsys, "keys", "generate", "--out", str(tmp_path))[0] == 0
    code, _, err = run(capsys, "keys", "generate", "--out", str(tmp_path))
    assert code == 2
    assert "--out:" in err
    assert "already exists" in err
    assert "--force" in err
    assert run(capsys, "keys", "generate", "--out", str(tmp_path), "--force")[0] == 0


def test_keys_jwks_prints_the_document(capsys: pytest.CaptureFixture[str], key_dir: Path) -> None:
    code, out, _ = run(capsys, "keys", "jwks", str(key_dir / "public-key.pem"))
    assert code == 0
    document = json.loads(out)
    assert document["keys"][0]["kid"] == jwk_thumbprint(read_public_key(key_dir / "public-key.pem"))


def test_license_mint_prints_a_jwt_with_the_requested_grants(
    capsys: pytest.CaptureFixture[str], key_dir: Path
) -> None:
    token = mint(capsys, key_dir, "--plan", "professional", "--lifetime-days", "10")
    claims = jwt.decode(
        token, read_public_key(key_dir / "public-key.pem"), algorithms=["RS256"], audience=AUDIENCE
    )
    assert (claims["customerId"], claims["customerName"], claims["plan"]) == (
        "cust_abc123",
        "Acme Corp",
        "professional",
    )
    assert claims["features"]["maxDevices"] == 50
    assert claims["exp"] - claims["iat"] == 10 * 86400
    assert claims["trial"] == {"isTrialMode": False}
    assert claims["subscription"] == {"status": "active"}


def test_license_mint_trial_defaults_to_default_trial_days(
    capsys: pytest.CaptureFixture[str], key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFAULT_TRIAL_DAYS", "7")
    claims = jwt.decode(mint(capsys, key_dir, "--plan", "trial"), options={"verify_signature": False})
    assert claims["trial"]["isTrialMode"] is True
    assert claims["exp"] - claims["iat"] == 7 * 86400  # capped at the trial end
    assert claims["subscription"]["status"] == "trialing"
    starter_trial = jwt.decode(
        mint(capsys, key_dir, "--plan", "starter", "--trial-days", "3"), options={"verify_signature": False}
    )
    assert (starter_trial["plan"], starter_trial["exp"] - starter_trial["iat"]) == ("starter", 3 * 86400)


def test_license_mint_names_default_trial_days_when_it_makes_a_trial_that_ends_at_once(
    capsys: pytest.CaptureFixture[str], key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFAULT_TRIAL_DAYS", "0")  # allowed: the webhook server's signups may end at once
    code, out, err = run(
        capsys,
        "license",
        "mint",
        "--customer-id",
        "cust_abc123",
        "--name",
        "Acme",
        "--plan",
        "trial",
        "--private-key",
        str(key_dir / "private-key.pem"),
    )
    assert (code, out) == (2, "")
    assert "--trial-days: not given, and DEFAULT_TRIAL_DAYS is 0: the licence ends now" in err


def test_license_mint_reads_the_key_path_from_settings(
    capsys: pytest.CaptureFixture[str], key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LICENSE_PRIVATE_KEY_PATH", str(key_dir / "private-key.pem"))
    monkeypatch.setenv("LICENSE_AUDIENCE", "edge-instance")
    code, out, err = run(
        capsys, "license", "mint", "--customer-id", "cust_abc123", "--name", "A", "--plan", "starter"
    )
    assert code == 0, err
    assert jwt.decode(out.strip(), options={"verify_signature": False})["aud"] == "edge-instance"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "--private-key: not given and LICENSE_PRIVATE_KEY_PATH is not set"),
        (("--private-key", "/nonexistent/key.pem"), "--private-key: /nonexistent/key.pem: cannot read"),
        (("--private-key", "KEY", "--trial-days", "0"), "--trial-days: must be between 1 and 90, got 0"),
        (
            ("--private-key", "KEY", "--lifetime-days", "0"),
            "--lifetime-days: must be between 1 and 366, got 0",
        ),
        (("--private-key", "KEY", "--audience", ""), "--audience: must not be empty"),
        (("--private-key", "KEY", "--issuer", " "), "--issuer: must not be empty"),
        (
            ("--private-key", "KEY", "--customer-id", "Acme Corp"),
            "--customer-id: must match ^cust_[a-z0-9]{6,32}$ as spec.customerId does, got 'Acme Corp'",
        ),
        (("--private-key", "KEY", "--customer-id", "cust_" + "a" * 33), "--customer-id: must match"),
    ],
)
def test_license_mint_errors_name_the_argument(
    capsys: pytest.CaptureFixture[str], key_dir: Path, extra: tuple[str, ...], message: str
) -> None:
    argv = [arg.replace("KEY", str(key_dir / "private-key.pem")) for arg in extra]
    code, out, err = run(
        capsys,
        "license",
        "mint",
        "--customer-id",
        "cust_abc123",
        "--name",
        "Acme",
        "--plan",
        "starter",
        *argv,
    )
    assert code == 2
    assert out == ""
    assert message in err


def test_license_mint_refuses_an_unknown_plan(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["license", "mint", "--customer-id", "c", "--name", "n", "--plan", "gold"])
    assert exited.value.code == 2
    assert "argument --plan: invalid choice: 'gold'" in capsys.readouterr().err


def test_license_verify_valid_and_invalid(capsys: pytest.CaptureFixture[str], key_dir: Path) -> None:
    token = mint(capsys, key_dir, "--plan", "professional")
    public = str(key_dir / "public-key.pem")
    code, out, _ = run(capsys, "license", "verify", token, "--public-key", public)
    assert code == 0
    assert out.startswith("valid: customer cust_abc123 (Acme Corp), plan professional, maxDevices 50")

    header, payload, signature = token.split(".")
    tampered = signature[:10] + ("B" if signature[10] == "A" else "A") + signature[11:]
    code, out, _ = run(capsys, "license", "verify", f"{header}.{payload}.{tampered}", "--public-key", public)
    assert code == 1
    assert out.startswith("invalid: signature does not verify")

    code, out, _ = run(capsys, "license", "verify", token, "--public-key", public, "--audience", "other")
    assert code == 1
    assert "invalid: licence is for audience 'iotistic-instance', not 'other'" in out


def test_license_verify_refuses_a_licence_of_another_customer(
    capsys: pytest.CaptureFixture[str], key_dir: Path
) -> None:
    """Found in review: `license verify` could not be told which customer the licence should be for, so
    a licence copied from another customer's instance showed as valid when support checked it."""
    token = mint(capsys, key_dir, "--plan", "enterprise")
    public = str(key_dir / "public-key.pem")
    code, out, _ = run(
        capsys, "license", "verify", token, "--public-key", public, "--customer-id", "cust_xyz789"
    )
    assert (code, out.strip()) == (
        1,
        "invalid: licence is for customer 'cust_abc123' (claim 'customerId'), not 'cust_xyz789'",
    )
    code, out, _ = run(
        capsys, "license", "verify", token, "--public-key", public, "--customer-id", "cust_abc123"
    )
    assert code == 0
    assert out.startswith("valid: customer cust_abc123 (Acme Corp), plan enterprise")
    for refused, said in (("", "must not be empty"), ("acme", "must match")):
        code, _, err = run(
            capsys, "license", "verify", token, "--public-key", public, "--customer-id", refused
        )
        assert (code, f"--customer-id: {said}" in err) == (2, True), err


def test_license_verify_reads_stdin_and_jwks(
    capsys: pytest.CaptureFixture[str], key_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = mint(capsys, key_dir, "--plan", "starter")
    code, document, _ = run(capsys, "keys", "jwks", str(key_dir / "public-key.pem"))
    assert code == 0
    jwks = tmp_path / "jwks.json"
    jwks.write_text(document)
    monkeypatch.setattr(sys, "stdin", io.StringIO(token + "\n"))
    code, out, err = run(capsys, "license", "verify", "-", "--jwks", str(jwks))
    assert code == 0, err
    assert "plan starter" in out


def test_license_verify_defaults_to_the_settings_public_key(
    capsys: pytest.CaptureFixture[str], key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = mint(capsys, key_dir, "--plan", "enterprise")
    code, _, err = run(capsys, "license", "verify", token)
    assert code == 2
    assert (
        "--public-key: not given and neither LICENSE_PUBLIC_KEY_PATH nor LICENSE_PRIVATE_KEY_PATH is set"
        in err
    )
    monkeypatch.setenv("LICENSE_PUBLIC_KEY_PATH", str(key_dir / "public-key.pem"))
    code, out, _ = run(capsys, "license", "verify", token)
    assert code == 0
    assert "maxDevices -1" in out


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"LICENSE_PUBLIC_KEY_PATH": "MISSING"}, "LICENSE_PUBLIC_KEY_PATH"),
        (
            {"LICENSE_PUBLIC_KEY_PATH": "PUBLIC", "LICENSE_EXTRA_PUBLIC_KEY_PATHS": '["MISSING"]'},
            "LICENSE_EXTRA_PUBLIC_KEY_PATHS",
        ),
        ({"LICENSE_PRIVATE_KEY_PATH": "MISSING"}, "LICENSE_PRIVATE_KEY_PATH"),
        (
            {"LICENSE_PRIVATE_KEY_PATH": "PRIVATE", "LICENSE_PUBLIC_KEY_PATH": "MISSING"},
            "LICENSE_PUBLIC_KEY_PATH",
        ),
    ],
)
def test_license_verify_names_the_setting_a_key_path_came_from(
    capsys: pytest.CaptureFixture[str],
    key_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, str],
    variable: str,
) -> None:
    """Found in review: a key file of the settings that could not be read was blamed on --public-key."""
    missing = str(tmp_path / "missing.pem")
    for name, value in settings.items():
        monkeypatch.setenv(
            name,
            value.replace("MISSING", missing)
            .replace("PUBLIC", str(key_dir / "public-key.pem"))
            .replace("PRIVATE", str(key_dir / "private-key.pem")),
        )
    code, out, err = run(capsys, "license", "verify", "x.y.z")
    assert (code, out) == (2, "")
    assert f"{variable}: {missing}: cannot read" in err
    assert "--public-key" not in err


def test_license_mint_names_the_setting_a_key_path_came_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LICENSE_PRIVATE_KEY_PATH", str(tmp_path / "missing.pem"))
    code, _, err = run(
        capsys, "license", "mint", "--customer-id", "cust_abc123", "--name", "A", "--plan", "starter"
    )
    assert code == 2
    assert f"LICENSE_PRIVATE_KEY_PATH: {tmp_path / 'missing.pem'}: cannot read" in err
    assert "--private-key" not in err


def test_license_verify_takes_the_public_key_from_the_private_key_alone(
    capsys: pytest.CaptureFixture[str], key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: with LICENSE_PRIVATE_KEY_PATH alone (an operator pod), verify refused for want of
    LICENSE_PUBLIC_KEY_PATH, where the webhook server takes the private key's public half."""
    token = mint(capsys, key_dir, "--plan", "starter")
    monkeypatch.setenv("LICENSE_PRIVATE_KEY_PATH", str(key_dir / "private-key.pem"))
    code, out, err = run(capsys, "license", "verify", token)
    assert code == 0, err
    assert out.startswith("valid: customer cust_abc123 (Acme Corp), plan starter")


@pytest.mark.parametrize("private_key", ["missing", "not a key", "another key"])
def test_license_verify_with_both_variables_and_an_unreadable_private_key_uses_the_public_key(
    capsys: pytest.CaptureFixture[str],
    key_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    private_key: str,
) -> None:
    """Found in review: an operator pod sets both variables, and verify, reading the private key first,
    exited 2 when a shell could not read it, where a verifier needs the public key alone."""
    token = mint(capsys, key_dir, "--plan", "starter")
    private_path = tmp_path / "private-key.pem"
    if private_key == "not a key":
        private_path.write_text("not a key")
    elif private_key == "another key":
        assert main(["keys", "generate", "--out", str(tmp_path)]) == 0
        capsys.readouterr()
    monkeypatch.setenv("LICENSE_PRIVATE_KEY_PATH", str(private_path))
    monkeypatch.setenv("LICENSE_PUBLIC_KEY_PATH", str(key_dir / "public-key.pem"))
    code, out, err = run(capsys, "license", "verify", token)
    assert code == 0, err
    assert out.startswith("valid: customer cust_abc123 (Acme Corp), plan starter")


def test_license_verify_errors_name_the_argument(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "license", "verify", "x.y.z", "--public-key", str(tmp_path / "missing.pem"))
    assert (code, "--public-key:" in err, "missing.pem: cannot read" in err) == (2, True, True)
    code, _, err = run(capsys, "license", "verify", "x.y.z", "--jwks", str(tmp_path / "missing.json"))
    assert (code, "--jwks: cannot read" in err) == (2, True)
    for flag in ("--audience", "--issuer"):
        code, _, err = run(capsys, "license", "verify", "x.y.z", "--jwks", "unread.json", flag, "")
        assert (code, f"{flag}: must not be empty" in err) == (2, True)


def test_license_show_decodes_without_verifying(
    capsys: pytest.CaptureFixture[str], key_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = mint(capsys, key_dir, "--plan", "professional")
    code, out, _ = run(capsys, "license", "show", token)
    assert code == 0
    shown = json.loads(out)
    assert shown["verified"] is False
    assert shown["header"]["alg"] == "RS256"
    assert shown["header"]["kid"] == jwk_thumbprint(read_public_key(key_dir / "public-key.pem"))
    assert shown["claims"]["limits"]["maxUsers"] == 15
    code, _, err = run(capsys, "license", "show", "not-a-token")
    assert code == 2
    assert "TOKEN: not a JWT" in err
    # Bytes that are not UTF-8 on standard input (read with surrogateescape): a message, no traceback.
    monkeypatch.setattr(sys, "stdin", io.StringIO(b"\xff\xfe.e30.x".decode("utf-8", "surrogateescape")))
    code, _, err = run(capsys, "license", "show", "-")
    assert code == 2 and "TOKEN: not a JWT (not UTF-8 text)" in err
    # Read strictly, as under a UTF-8 locale without Python's UTF-8 mode (found in review: a traceback).
    for command in ("show", "verify"):
        strict = io.TextIOWrapper(io.BytesIO(b"\xff\xfe.e30.x"), encoding="utf-8", errors="strict")
        monkeypatch.setattr(sys, "stdin", strict)
        code, _, err = run(
            capsys,
            "license",
            command,
            "-",
            *(["--public-key", str(key_dir / "public-key.pem")] if command == "verify" else []),
        )
        assert code == 2 and "TOKEN: not a JWT (not UTF-8 text)" in err, err


def test_commands_without_a_subcommand_show_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "keys" in err
    assert "license" in err
    code, _, err = run(capsys, "license")
    assert code == 2
    assert "mint" in err
    assert "verify" in err


def test_installed_script_round_trip(tmp_path: Path) -> None:
    def script(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *argv], capture_output=True, text=True, input=stdin, check=False, cwd=tmp_path
        )

    generated = script("keys", "generate")
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "keys" / "private-key.pem").exists()
    minted = script(
        "license", "mint", "--customer-id", "cust_abc123", "--name", "Acme", "--plan", "professional",
        "--private-key", "keys/private-key.pem",
    )  # fmt: skip
    assert minted.returncode == 0, minted.stderr
    verified = script("license", "verify", "-", "--public-key", "keys/public-key.pem", stdin=minted.stdout)
    assert verified.returncode == 0, verified.stderr
    assert f"key {generated.stdout.strip()}" in verified.stdout
    refused = script("license", "verify", minted.stdout.strip()[:-8], "--public-key", "keys/public-key.pem")
    assert refused.returncode == 1
    assert refused.stdout.startswith("invalid:")


def test_output_to_a_reader_that_went_away_ends_as_a_unix_tool_does(key_dir: Path) -> None:
    """Found in review: `iotistic-billing ... | head` printed a BrokenPipeError's traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader gone before the first line: `| head -0`
    try:
        done = subprocess.run(
            [str(SCRIPT), "keys", "jwks", str(key_dir / "public-key.pem")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            # Buffered, as a pipe is unless the environment says otherwise: written at the flush.
            env={key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"},
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (("--email", "not-an-email"), "--email: must be an email address"),
        (("--trial-days", "120"), "--trial-days: must be between 0 and 90, got 120"),
        (("--company", "  "), "--company: must not be blank"),
        (("--customer-id", "Acme"), "--customer-id: must match ^cust_[a-z0-9]{6,32}$"),
        (("--name", "x" * 300), "--name: must be at most 200 characters long, got 300"),
        (("--resource-name", "a.b"), "--resource-name: must be lowercase letters, digits and '-'"),
    ],
)
def test_customer_add_errors_name_the_flag_not_the_spec_field(
    capsys: pytest.CaptureFixture[str], flags: tuple[str, str], refusal: str
) -> None:
    """Found in review: `customer add` said `spec.trial.days must be ...`, a field the user never typed;
    the README has a bad argument named. Refused before any cluster is asked (none here)."""
    given = {"--email": "ops@hooli.example", "--company": "Hooli", **dict([flags])}
    code, _, err = run(capsys, "customer", "add", *(part for pair in given.items() for part in pair))
    assert code == 2
    assert err.startswith(f"iotistic-billing: error: {refusal}"), err


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (
            ("--plan", "starter", "--trial-days", "14"),
            "--trial-days: a manually billed starter plan has no trial; pass it with --plan trial or"
            " --billing stripe",
        ),
        (("--resource-name", ""), "--resource-name: must not be empty (leave it out for the default)"),
        (("--customer-id", ""), "--customer-id: must not be empty (leave it out for the default)"),
        (("--name", ""), "--name: must not be empty (leave it out for the default)"),
    ],
)
def test_customer_add_refuses_a_flag_it_would_ignore(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    flags: tuple[str, ...],
    refusal: str,
) -> None:
    """Found in review: `--plan starter --trial-days 14` wrote spec.trial.days, which the operator reads
    for a manually billed Customer only on the trial plan, and said "created (plan starter)"; an empty
    `--resource-name` (an unset variable) was taken for the default name, an empty `--customer-id` or
    `--name` dropped (a Customer made with a derived id). Refused before any cluster is asked (none
    here)."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-cluster"))  # a shell's cluster is never asked
    code, out, err = run(
        capsys, "customer", "add", "--email", "ops@hooli.example", "--company", "Hooli", *flags
    )
    assert (code, out) == (2, "")
    assert err.strip() == f"iotistic-billing: error: {refusal}"


def test_help_says_what_each_exit_status_means(capsys: pytest.CaptureFixture[str]) -> None:
    """Found in review: every failure exited 2, a cluster or database away as a bad argument, and no
    help said which exit status meant what."""
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    said = capsys.readouterr().out
    assert "exit status:" in said
    assert "  1  a service (the API server, PostgreSQL) cannot be reached" in said
    assert "`license verify`: the licence is invalid" in said
    assert "  2  a mistake in the command" in said
