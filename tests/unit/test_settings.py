"""Settings are read from the earlier system's environment names and refuse bad values by name."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from iotistic_billing.customer import DNS_NAME_PATTERN
from iotistic_billing.operator.sharding import Shard
from iotistic_billing.settings import Settings, SettingsError, load_settings
from iotistic_billing.webhook_server.app import create_app
from iotistic_billing.webhook_server.options import ServerOptions


def test_defaults_and_earlier_system_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "3200")
    monkeypatch.setenv("STRIPE_PRICE_PROFESSIONAL", "price_pro")
    monkeypatch.setenv("DEFAULT_TRIAL_DAYS", "7")
    monkeypatch.setenv("BASE_DOMAIN", "example.test")
    settings = load_settings()
    assert (settings.port, settings.stripe_price_professional) == (3200, "price_pro")
    assert (settings.default_trial_days, settings.base_domain) == (7, "example.test")
    assert settings.stripe_configured is False
    assert settings.database_url is None
    assert settings.trusted_proxies == []
    assert settings.notify_webhook_allowed_cidrs == []  # customers' webhooks: public addresses only
    assert settings.usage_close_grace == 3600
    assert settings.notice_retention_days == 90
    assert settings.stripe_event_retention_days == 90
    assert (settings.wrong_tokens_per_minute, settings.wrong_tokens_per_minute_total) == (10, 100)


def test_trusted_proxies_are_a_json_list_of_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTED_PROXIES", '["10.244.0.0/16", "fd00::/8"]')
    assert [str(network) for network in load_settings().trusted_proxies] == ["10.244.0.0/16", "fd00::/8"]


def test_the_webhooks_allowed_networks_are_a_json_list_of_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_WEBHOOK_ALLOWED_CIDRS", '["10.96.0.0/12", "fd00::/8"]')
    allowed = load_settings().notify_webhook_allowed_cidrs
    assert [str(network) for network in allowed] == ["10.96.0.0/12", "fd00::/8"]


def test_metered_prices_are_a_json_list_apart_from_the_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRIPE_METERED_PRICES", '["price_devices", "price_api_calls"]')
    assert load_settings().stripe_metered_prices == ["price_devices", "price_api_calls"]
    monkeypatch.setenv("STRIPE_PRICE_STARTER", "price_devices")
    with pytest.raises(SettingsError, match="STRIPE_METERED_PRICES: price_devices is STRIPE_PRICE_STARTER"):
        load_settings()
    monkeypatch.setenv("STRIPE_METERED_PRICES", '["price_m", "price_m"]')
    with pytest.raises(SettingsError, match="STRIPE_METERED_PRICES: price_m is listed twice"):
        load_settings()
    monkeypatch.setenv("STRIPE_METERED_PRICES", "price_m")
    with pytest.raises(SettingsError, match="STRIPE_METERED_PRICES: must be a JSON list"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("PORT", "70000", "PORT: Input should be less than or equal to 65535"),
        ("DEFAULT_TRIAL_DAYS", "120", "DEFAULT_TRIAL_DAYS: Input should be less than or equal to 90"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL: must be a postgresql:// URL"),
        ("ADMIN_API_TOKEN", "short", "ADMIN_API_TOKEN: must be at least 16 characters"),
        ("TRUSTED_PROXIES", '["10.1.2.3/8"]', "TRUSTED_PROXIES: '10.1.2.3/8' is not a network"),
        ("TRUSTED_PROXIES", "10.0.0.0/8", "TRUSTED_PROXIES: must be a JSON list"),
        ("POD_IP", "10.0.0.300", "POD_IP: must be an IPv4 or IPv6 address (got '10.0.0.300')"),
        # It labels helm's release records: a label value, 63 characters at most.
        ("POD_NAME", "operator-" + "x" * 60, "POD_NAME: String should have at most 63 characters"),
        ("POD_NAME", "operator,x=y", "POD_NAME: String should match pattern"),
        # Its uid, labelled beside it, is a Kubernetes uid (36 characters), read with the name alone.
        ("POD_UID", "2f1c0e9a-5b7d-4c3e-9f8a-1b2c3d4e5f6", "POD_UID: String should match pattern"),
        ("POD_UID", "2F1C0E9A-5B7D-4C3E-9F8A-1B2C3D4E5F60", "POD_UID: String should match pattern"),
        ("POD_UID", "2f1c0e9a-5b7d-4c3e-9f8a-1b2c3d4e5f60", "POD_UID: set without POD_NAME"),
        (
            "NOTIFY_WEBHOOK_ALLOWED_CIDRS",
            '["127.0.0.1/8"]',
            "NOTIFY_WEBHOOK_ALLOWED_CIDRS: '127.0.0.1/8' is not a network",
        ),
        ("NOTIFY_WEBHOOK_ALLOWED_CIDRS", "127.0.0.0/8", "NOTIFY_WEBHOOK_ALLOWED_CIDRS: must be a JSON list"),
        ("LICENSE_EXTRA_PUBLIC_KEY_PATHS", "/k.pem", "LICENSE_EXTRA_PUBLIC_KEY_PATHS: must be a JSON list"),
        ("USAGE_CLOSE_GRACE", "-1", "USAGE_CLOSE_GRACE: Input should be greater than or equal to 0"),
        ("HELM_TIMEOUT", "0", "HELM_TIMEOUT: Input should be greater than or equal to 10"),
        # A notice pruned before its fact stops being written again (a usage period) would go out again.
        ("NOTICE_RETENTION_DAYS", "0", "NOTICE_RETENTION_DAYS: Input should be greater than or equal to 32"),
        ("NOTICE_RETENTION_DAYS", "31", "NOTICE_RETENTION_DAYS: Input should be greater than or equal to 32"),
        ("NOTICE_RETENTION_DAYS", "90d", "NOTICE_RETENTION_DAYS: Input should be a valid integer"),
        ("NOTICE_RETENTION_DAYS", "1.5", "NOTICE_RETENTION_DAYS: Input should be a valid integer"),
        # A Stripe event pruned while Stripe may still deliver it again would be applied again.
        (
            "STRIPE_EVENT_RETENTION_DAYS",
            "30",
            "STRIPE_EVENT_RETENTION_DAYS: Input should be greater than or equal to 31",
        ),
        (
            "STRIPE_EVENT_RETENTION_DAYS",
            "36501",
            "STRIPE_EVENT_RETENTION_DAYS: Input should be less than or equal",
        ),
        (
            "STRIPE_EVENT_RETENTION_DAYS",
            "90d",
            "STRIPE_EVENT_RETENTION_DAYS: Input should be a valid integer",
        ),
        # An item of a list names the list and the item, not a variable `<LIST>_0` (found in review).
        ("STRIPE_METERED_PRICES", '["", "x"]', "STRIPE_METERED_PRICES: item 0: String should have at least"),
        # Instances are served at <name>.<BASE_DOMAIN>, which the instance chart takes as a DNS name only.
        ("BASE_DOMAIN", "apps.example.com.", "BASE_DOMAIN: String should match pattern"),
        ("BASE_DOMAIN", "Apps.Example.com", "BASE_DOMAIN: String should match pattern"),
        # Hosts the resolver cannot encode: every delivery to them would fail.
        (
            "NOTIFY_WEBHOOK_URL",
            "https://hooks..example.com/x",
            "NOTIFY_WEBHOOK_URL: host 'hooks..example.com' is not a valid host name",
        ),
        ("NOTIFY_WEBHOOK_URL", f"https://{'a' * 64}.example/x", "NOTIFY_WEBHOOK_URL: host 'aaaa"),
        # Intervals finite and sane (found in review: `inf`, `1e400` and `nan` loaded, a timer that never
        # fires or a comparison always false, and a timer of almost nothing spins).
        ("OPERATOR_TIMER_INTERVAL", "inf", "OPERATOR_TIMER_INTERVAL: Input should be a finite number"),
        ("OPERATOR_TIMER_INTERVAL", "1e400", "OPERATOR_TIMER_INTERVAL: Input should be a finite number"),
        ("OPERATOR_TIMER_INTERVAL", "nan", "OPERATOR_TIMER_INTERVAL: Input should be a finite number"),
        (
            "OPERATOR_TIMER_INTERVAL",
            "0.001",
            "OPERATOR_TIMER_INTERVAL: Input should be greater than or equal",
        ),
        ("OPERATOR_TIMER_INTERVAL", "86400", "OPERATOR_TIMER_INTERVAL: Input should be less than or equal"),
        ("HELM_TIMEOUT", "0.001", "HELM_TIMEOUT: Input should be greater than or equal"),
        ("HELM_TIMEOUT", "nan", "HELM_TIMEOUT: Input should be a finite number"),
        ("USAGE_FLUSH_INTERVAL", "inf", "USAGE_FLUSH_INTERVAL: Input should be a finite number"),
        ("USAGE_FLUSH_INTERVAL", "1e-9", "USAGE_FLUSH_INTERVAL: Input should be greater than or equal"),
        ("USAGE_METER_INTERVAL", "1e400", "USAGE_METER_INTERVAL: Input should be a finite number"),
        ("USAGE_METER_INTERVAL", "0.01", "USAGE_METER_INTERVAL: Input should be greater than or equal"),
        ("USAGE_METER_INTERVAL", "604800", "USAGE_METER_INTERVAL: Input should be less than or equal"),
        ("USAGE_KEY_CACHE_TTL", "inf", "USAGE_KEY_CACHE_TTL: Input should be a finite number"),
        ("USAGE_KEY_CACHE_TTL", "86400", "USAGE_KEY_CACHE_TTL: Input should be less than or equal"),
        # A re-send of an event whose record was lost must come within Stripe's 24 hours of de-duplication.
        ("USAGE_METER_INTERVAL", "86400", "USAGE_METER_INTERVAL: Input should be less than or equal to 432"),
        ("USAGE_CLOSE_GRACE", "inf", "USAGE_CLOSE_GRACE: Input should be a finite number"),
        ("USAGE_CLOSE_GRACE", "nan", "USAGE_CLOSE_GRACE: Input should be a finite number"),
        ("SIGNUP_LICENSE_WAIT", "nan", "SIGNUP_LICENSE_WAIT: Input should be a finite number"),
        # No wrong token at all would lock every token out.
        (
            "WRONG_TOKENS_PER_MINUTE",
            "0",
            "WRONG_TOKENS_PER_MINUTE: Input should be greater than or equal to 1",
        ),
        (
            "WRONG_TOKENS_PER_MINUTE_TOTAL",
            "0.5",
            "WRONG_TOKENS_PER_MINUTE_TOTAL: Input should be a valid integer",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert message in str(refused.value)


@pytest.mark.parametrize(
    "variable",
    [
        "LICENSE_ISSUER",
        "LICENSE_AUDIENCE",
        "STRIPE_API_BASE",
        "BASE_DOMAIN",
        "INSTANCE_CHART",
        "HELM_BINARY",
        "BILLING_URL",
        "NOTIFY_FROM",
    ],
)
def test_an_empty_value_of_a_setting_with_a_default_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "")
    with pytest.raises(SettingsError, match=f"{variable}: String should have at least 1 character"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("STRIPE_SECRET_KEY", "", "must not be empty (leave it unset to run without Stripe)"),
        ("STRIPE_WEBHOOK_SECRET", " ", "must not be empty"),
        ("STRIPE_SECRET_KEY", "sk_test_abc\n", "must not start or end with white space"),
    ],
)
def test_a_stripe_secret_set_empty_is_refused_not_taken_for_a_key(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    """Found in review: `STRIPE_SECRET_KEY=` counted as set, and the first call to Stripe failed (401)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=re.escape(f"{variable}: {problem}")) as refused:
        load_settings()
    assert "sk_test_abc" not in str(refused.value)


@pytest.mark.parametrize("variable", ["LICENSE_PRIVATE_KEY_PATH", "LICENSE_PUBLIC_KEY_PATH"])
def test_a_licence_key_path_set_empty_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Found in review: `LICENSE_PRIVATE_KEY_PATH=` loaded as Path('.'), the working directory, and failed
    only when the key was read ("LICENSE_PRIVATE_KEY_PATH: .: cannot read (Is a directory)"), though
    the README says an empty value stops the start naming its variable."""
    monkeypatch.setenv(variable, "")
    with pytest.raises(SettingsError, match=re.escape(f"{variable}: must not be empty (leave it unset")):
        load_settings()


def test_the_readme_names_every_setting_an_empty_value_of_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: the README said an empty value stops the start, while STRIPE_PRICE_*, POD_IP,
    OPERATOR_PEERING and the licence key paths loaded set empty."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    sentence = " ".join(readme.split("\n## Configuration\n", 1)[1].strip().split("\n\n", 1)[0].split())
    loaded = set()
    for name in Settings.model_fields:
        with monkeypatch.context() as env:
            env.setenv(name.upper(), "")
            try:
                load_settings()
            except SettingsError:
                continue
        loaded.add(name.upper())

    # The plans' prices are named once, then by their ends (`_PROFESSIONAL`).
    unnamed = {
        name
        for name in loaded
        if f"`{name}`" not in sentence and f"`{name.removeprefix('STRIPE_PRICE')}`" not in sentence
    }
    assert "POD_IP" in loaded and not unnamed, sentence


@pytest.mark.parametrize("variable", ["admin_api_token", "admin_viewer_token"])
def test_an_admin_token_with_a_files_last_newline_is_refused_by_name(variable: str) -> None:
    """Found in review: a token read from a file kept its newline, passed the length check, and every
    admin call was a 401, as the server strips what a client sends."""
    with pytest.raises(SettingsError) as refused:
        load_settings(**{variable: "a" * 20 + "\n"})
    assert f"{variable.upper()}: must not start or end with white space (a file's last newline?)" in str(
        refused.value
    )
    assert "a" * 20 not in str(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("ADMIN_API_TOKEN", "tooshort", "tooshort"),
        ("SMTP_URL", "ftp://billing:hunter2@mail.example", "hunter2"),  # a credential without the word
        ("DATABASE_URL", "mysql://billing:hunter2@db.example/billing", "hunter2"),
    ],
)
def test_secret_values_never_appear_in_the_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, secret: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable) as refused:
        load_settings()
    assert secret not in str(refused.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CONSOLE_SESSION_KEY": "k" * 31}, "CONSOLE_SESSION_KEY: must be at least 32 characters"),
        ({"CONSOLE_SESSION_KEY": "k" * 44 + "\n"}, "CONSOLE_SESSION_KEY: must hold no spaces or line breaks"),
        (
            {"ADMIN_API_TOKEN": "t" * 40, "CONSOLE_SESSION_KEY": "t" * 40},
            "CONSOLE_SESSION_KEY: must be a secret of its own, not ADMIN_API_TOKEN",
        ),
        (
            {"ADMIN_VIEWER_TOKEN": "v" * 40, "CONSOLE_SESSION_KEY": "v" * 40},
            "CONSOLE_SESSION_KEY: must be a secret of its own, not ADMIN_API_TOKEN or ADMIN_VIEWER_TOKEN",
        ),
    ],
)
def test_the_console_session_key_is_a_long_secret_of_its_own(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert message in str(refused.value)
    assert env["CONSOLE_SESSION_KEY"] not in str(refused.value)
    monkeypatch.setenv("CONSOLE_SESSION_KEY", "0123456789abcdef" * 2)
    key = load_settings().console_session_key
    assert key is not None and key.get_secret_value() == "0123456789abcdef" * 2


@pytest.mark.parametrize(
    ("key", "livemode"),
    [
        ("sk_live_abc", True),
        ("rk_live_abc", True),
        ("sk_test_abc", False),
        ("rk_test_abc", False),
        ("sk_other_abc", None),
        (None, None),
    ],
)
def test_the_stripe_key_says_which_mode_s_events_are_applied(
    monkeypatch: pytest.MonkeyPatch, key: str | None, livemode: bool | None
) -> None:
    """Found in review: an event's livemode was never checked, so a test-mode event reaching a live
    deployment (a staging cluster sharing customer ids) was applied. The key's mode is the one whose
    events apply; with no key (or one of no known kind) every event is, as before."""
    if key is not None:
        monkeypatch.setenv("STRIPE_SECRET_KEY", key)
    assert load_settings().stripe_livemode is livemode


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"INSTANCE_CHART": "oci://registry.example/charts/customer-instance"},
            "INSTANCE_CHART_VERSION: required",
        ),
        (
            {
                "INSTANCE_CHART": "oci://registry.example/charts/customer-instance:0.2.0",
                "INSTANCE_CHART_VERSION": "0.2.0",
            },
            "INSTANCE_CHART: must be a chart directory or oci://",
        ),
        (
            {
                "INSTANCE_CHART": "oci://registry.example/charts/customer-instance",
                "INSTANCE_CHART_VERSION": "latest",
            },
            "INSTANCE_CHART_VERSION: String should match pattern",
        ),
        ({"HELM_CHART_PATH": "charts/customer-instance"}, "HELM_CHART_PATH: renamed INSTANCE_CHART"),
        (
            {"INSTANCE_CHART_REGISTRY_CONFIG": "/nonexistent/config.json"},
            "INSTANCE_CHART_REGISTRY_CONFIG: cannot read /nonexistent/config.json as a Docker config JSON",
        ),
        (
            {"INSTANCE_CHART_UPGRADE": "eventually"},
            "INSTANCE_CHART_UPGRADE: Input should be 'rollout' or 'immediate'",
        ),
    ],
)
def test_the_instance_chart_is_a_directory_or_an_oci_chart_at_a_version(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_an_oci_chart_with_its_fleet_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTANCE_CHART", "oci://127.0.0.1:5000/charts/customer-instance")
    monkeypatch.setenv("INSTANCE_CHART_VERSION", "0.2.0")
    monkeypatch.setenv("INSTANCE_CHART_PLAIN_HTTP", "true")
    settings = load_settings()
    assert (settings.instance_chart_version, settings.instance_chart_plain_http) == ("0.2.0", True)
    assert (
        load_settings(instance_chart="charts/customer-instance").instance_chart == "charts/customer-instance"
    )


def test_the_registry_config_is_a_docker_config_with_auths(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"credsStore": "desktop"}')
    with pytest.raises(SettingsError, match=r'INSTANCE_CHART_REGISTRY_CONFIG: .* has no "auths" object'):
        load_settings(instance_chart_registry_config=str(config))
    config.write_text('{"auths": {"registry.example": {"auth": "dTpw"}}}')
    assert load_settings(instance_chart_registry_config=str(config)).instance_chart_registry_config == config


def test_signup_license_wait_is_read_and_bounded_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().signup_license_wait == 10
    monkeypatch.setenv("SIGNUP_LICENSE_WAIT", "25")
    assert load_settings().signup_license_wait == 25
    monkeypatch.setenv("SIGNUP_LICENSE_WAIT", "26")  # past the server's drain at shutdown (30 s)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "SIGNUP_LICENSE_WAIT: Input should be less than or equal to 25" in str(refused.value)


INSTANCE_CHART_SCHEMA = Path(__file__).parents[2] / "charts" / "customer-instance" / "values.schema.json"


@pytest.mark.parametrize(
    "url", ["billing.example.com", "https://a b", "https://", "ftp://billing.example.com", "http://a\tb"]
)
def test_billing_url_the_instance_chart_refuses_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Found in review: any non-empty BILLING_URL started the operator, and every Customer's helm run then
    failed for good (InstallFailed) on the instance chart's billingUrl pattern."""
    pattern = json.loads(INSTANCE_CHART_SCHEMA.read_text())["properties"]["billingUrl"]["pattern"]
    assert not re.search(pattern, url)  # what helm would refuse
    monkeypatch.setenv("BILLING_URL", url)
    with pytest.raises(SettingsError, match="BILLING_URL: must be an http:// or https:// URL"):
        load_settings()
    monkeypatch.setenv("BILLING_URL", "https://billing.example.com:8443/base")
    assert re.search(pattern, load_settings().billing_url)


def test_a_close_grace_past_stripes_meter_window_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a period is metered up to USAGE_CLOSE_GRACE + USAGE_METER_INTERVAL after its end;
    at Stripe's 35 days or more its events are past the window Stripe takes, and nothing is billed."""
    day = 24 * 3600
    monkeypatch.setenv("USAGE_METER_INTERVAL", str(day // 2))
    monkeypatch.setenv("USAGE_CLOSE_GRACE", str(34.5 * day))
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "USAGE_CLOSE_GRACE: with USAGE_METER_INTERVAL it must stay under Stripe's 35 days" in str(
        refused.value
    )
    monkeypatch.setenv("USAGE_CLOSE_GRACE", str(34 * day))
    assert load_settings().usage_close_grace == 34 * day


@pytest.mark.parametrize(
    ("liveness", "metrics", "refused"), [("8080", "8080", True), ("9090", "9090", True), ("0", "0", False)]
)
def test_operator_ports_differ(
    monkeypatch: pytest.MonkeyPatch, liveness: str, metrics: str, refused: bool
) -> None:
    """Found in review: one port for both loaded, and the operator then died with EADDRINUSE naming
    neither setting (0 turns each off, so two zeros are no clash)."""
    monkeypatch.setenv("OPERATOR_LIVENESS_PORT", liveness)
    monkeypatch.setenv("OPERATOR_METRICS_PORT", metrics)
    if not refused:
        assert load_settings().operator_liveness_port == 0
        return
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert f"OPERATOR_LIVENESS_PORT: must differ from OPERATOR_METRICS_PORT (both {liveness})" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("peering", "shards", "message"),
    [
        ("Iotistic-Billing", "1", "OPERATOR_PEERING: must be a lowercase DNS subdomain"),
        ("iotistic_billing", "1", "OPERATOR_PEERING: must be a lowercase DNS subdomain"),
        ("billing..peering", "1", "OPERATOR_PEERING: must be a lowercase DNS subdomain"),
        ("-billing", "1", "OPERATOR_PEERING: must be a lowercase DNS subdomain"),
        ("a" * 254, "1", "OPERATOR_PEERING: at most 253 characters"),
        # Shard 11's peering is <name>-shard-11: 9 characters more.
        ("a" * 250, "12", "OPERATOR_PEERING: at most 244 characters with OPERATOR_SHARDS=12"),
    ],
)
def test_peering_name_is_a_dns_subdomain(
    monkeypatch: pytest.MonkeyPatch, peering: str, shards: str, message: str
) -> None:
    """Found in review: a peering name the API server refuses (not a DNS subdomain, or over 253 characters
    once a shard's `-shard-<k>` is added) was a 422 in ensure_peering and a traceback at start."""
    monkeypatch.setenv("OPERATOR_PEERING", peering)
    monkeypatch.setenv("OPERATOR_SHARDS", shards)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("peering", "shards"), [("", 1), ("", 64), ("billing.example-peering", 1), ("a" * 244, 64)]
)
def test_every_shard_s_peering_is_a_name_the_api_server_takes(peering: str, shards: int) -> None:
    settings = load_settings(operator_peering=peering, operator_shards=shards)
    for index in range(shards):
        name = Shard(index, shards).peering(settings.operator_peering)
        assert name == "" or (re.fullmatch(DNS_NAME_PATTERN, name) and len(name) <= 253), name


def test_stripe_with_plan_prices_and_no_metered_ones_is_warned_at_the_start_not_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found in review: with STRIPE_METERED_PRICES left empty, checkouts made subscriptions without metered
    items, Stripe took every overage meter event and invoiced none, the API said billed, and nothing
    said so."""
    unmetered = load_settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        stripe_secret_key="sk_test_" + "a" * 24,
        stripe_price_starter="price_starter",
    )
    (warning,) = unmetered.start_warnings()
    assert warning.startswith("STRIPE_METERED_PRICES is empty:") and "invoices none" in warning
    with caplog.at_level(logging.WARNING, logger="iotistic_billing.webhook_server.app"):
        create_app(unmetered, options=ServerOptions())
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [
        warning
    ]
    # Metered prices listed, or no Stripe, or no plan price (nothing checked out): nothing to say.
    assert unmetered.model_copy(update={"stripe_metered_prices": ["price_overage"]}).start_warnings() == []
    assert unmetered.model_copy(update={"stripe_secret_key": None}).start_warnings() == []
    assert unmetered.model_copy(update={"stripe_price_starter": None}).start_warnings() == []
    # The inbox process (probes only) leaves it to its server.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iotistic_billing.webhook_server.app"):
        create_app(unmetered, options=ServerOptions(probes_only=True))
    assert not [record for record in caplog.records if "STRIPE_METERED_PRICES" in record.getMessage()]
