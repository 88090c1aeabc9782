"""selfix.settings: defaults, parsing of every variable, cross-checks, secrets kept out of every rendering."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from selfix.settings import (
    HOME_VAR,
    SPECS,
    Settings,
    SettingsError,
    Spec,
    default_of,
    defaults,
    implicit_home_paths,
    known_variables,
    load,
)

PASSWORD = "kafka-pw-7f3a9c"
SECRET_KEY = "s3-secret-5e1d22"


def test_defaults_load_from_an_empty_environment() -> None:
    s = load({})
    assert isinstance(s, Settings)
    assert s.kafka_bootstrap is None and not s.kafka_enabled
    assert s.s3_endpoint is None and not s.s3_enabled
    assert s.comfy_port == 8188 and s.comfy_host == "127.0.0.1"
    assert s.comfy_url == "http://127.0.0.1:8188"
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.s3_use_ssl is False
    assert s.spool_dir == Path("/app/spool")
    assert s.user_prefix == "users/{userId}/"
    assert s.max_attempts == 3
    assert s.gpu_soft_mark < s.gpu_hard_mark
    assert s.kafka_sasl_password is None and s.s3_secret_key is None


def test_load_reads_only_the_mapping_given() -> None:
    # os.environ of the test process must not leak into load({...})
    assert load({"COMFY_PORT": "9999"}).comfy_port == 9999
    assert load({}).comfy_port == 8188


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.env)
def test_every_spec_parses_its_own_default(spec: Spec) -> None:
    value = spec.parse(default_of(spec))
    assert getattr(load({}), spec.attr) == value


def test_selfix_home_moves_every_path_default_and_an_explicit_path_wins() -> None:
    derived = [spec for spec in SPECS if HOME_VAR in spec.default]
    assert {s.env for s in derived} >= {"SPOOL_DIR", "STORE_DIR", "MODELS_DIR", "TEMP_DIR", "LORA_CACHE_DIR",
                                         "COMFY_OUTPUT_DIR", "COMFY_INPUT_DIR", "COMFY_LOG_DIR"}
    assert all(str(getattr(load({}), s.attr)).startswith("/app/") for s in derived)
    moved = load({"SELFIX_HOME": "/srv/node-1/"})
    assert all(str(getattr(moved, s.attr)).startswith("/srv/node-1/") for s in derived)
    assert moved.comfy_output_dir == Path("/srv/node-1/comfy/output")
    assert load({"SELFIX_HOME": "/srv/n", "SPOOL_DIR": "/fast/spool"}).spool_dir == Path("/fast/spool")
    assert defaults("/x")["LORA_CACHE_DIR"] == "/x/loras"


def test_implicit_home_paths_names_what_would_land_under_the_default_home() -> None:
    assert implicit_home_paths({"SELFIX_HOME": "/srv"}) == []
    assert "SPOOL_DIR" in implicit_home_paths({}) and "TEMP_DIR" in implicit_home_paths({"SPOOL_DIR": "/s"})
    assert "SPOOL_DIR" not in implicit_home_paths({"SPOOL_DIR": "/s"})
    everything = {s.env: "/x" for s in SPECS if HOME_VAR in s.default}
    assert implicit_home_paths(everything) == []


def test_specs_match_the_settings_fields_one_to_one() -> None:
    attrs = [spec.attr for spec in SPECS]
    envs = [spec.env for spec in SPECS]
    assert len(set(attrs)) == len(attrs)
    assert len(set(envs)) == len(envs)
    assert set(attrs) == {f.name for f in dataclasses.fields(Settings)}
    assert known_variables() == frozenset(envs)
    assert all(spec.doc.strip() for spec in SPECS)


def test_the_seed_variable_names_are_kept() -> None:
    seed = {
        "KAFKA_BOOTSTRAP_SERVER", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD", "KAFKA_GROUP_ID", "KAFKA_TOPIC_INPUT", "KAFKA_TOPIC_OUTPUT", "S3_ENDPOINT",
        "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_REGION", "S3_BUCKET", "S3_USE_SSL", "COMFY_PORT", "COMFY_HOST",
        "MODELS_DIR", "TEMP_DIR",
    }
    assert seed <= known_variables()


@pytest.mark.parametrize(
    ("env", "raw", "attr", "expected"),
    [
        ("COMFY_PORT", "1", "comfy_port", 1),
        ("COMFY_PORT", "65535", "comfy_port", 65535),
        ("METRICS_PORT", "9100", "metrics_port", 9100),
        ("S3_USE_SSL", "TRUE", "s3_use_ssl", True),
        ("S3_USE_SSL", "yes", "s3_use_ssl", True),
        ("S3_USE_SSL", "on", "s3_use_ssl", True),
        ("S3_USE_SSL", "0", "s3_use_ssl", False),
        ("S3_USE_SSL", "off", "s3_use_ssl", False),
        ("QUEUE_AHEAD", "0", "queue_ahead", 0),
        ("MAX_ATTEMPTS", "7", "max_attempts", 7),
        ("GPU_HARD_MARK", "1", "gpu_hard_mark", 1.0),
        ("KAFKA_SECURITY_PROTOCOL", "sasl_ssl", "kafka_security_protocol", "SASL_SSL"),
        ("KAFKA_SASL_MECHANISM", "scram-sha-512", "kafka_sasl_mechanism", "SCRAM-SHA-512"),
        ("LOG_FORMAT", "JSON", "log_format", "json"),
        ("USER_PREFIX", "tenants/{userId}", "user_prefix", "tenants/{userId}/"),
        ("COMFYUI_DIR", "/opt/comfy", "comfyui_dir", Path("/opt/comfy")),
        ("TEMPLATES_DIR", "", "templates_dir", None),
    ],
)
def test_good_values_parse(env: str, raw: str, attr: str, expected: object) -> None:
    assert getattr(load({env: raw}), attr) == expected


BAD_VALUES = [
    ("COMFY_PORT", "0"),
    ("COMFY_PORT", "70000"),
    ("COMFY_PORT", "abc"),
    ("COMFY_PORT", ""),
    ("METRICS_PORT", "-1"),
    ("MAX_ATTEMPTS", "0"),
    ("MAX_ATTEMPTS", "-1"),
    ("MAX_ATTEMPTS", "2.5"),
    ("QUEUE_AHEAD", "-1"),
    ("FREE_EVERY_JOBS", "-3"),
    ("MAX_MESSAGE_BYTES", "-10"),
    ("JOB_TIMEOUT_S", "0"),
    ("JOB_TIMEOUT_S", "-5"),
    ("JOB_TIMEOUT_S", "nan"),
    ("RETRY_BASE_S", "-1"),
    ("LORA_CACHE_MAX_GB", "lots"),
    ("S3_USE_SSL", "maybe"),
    ("S3_USE_SSL", "2"),
    ("KAFKA_STATUS_EVENTS", "enabled"),
    ("GPU_SOFT_MARK", "1.5"),
    ("GPU_HARD_MARK", "1.01"),
    ("GPU_SOFT_MARK", "0"),
    ("GPU_SOFT_MARK", "-0.2"),
    ("USER_PREFIX", "users/"),
    ("USER_PREFIX", "users/{userid}/"),
    ("USER_PREFIX", "users/{userId}/../x"),
    ("USER_PREFIX", "../{userId}/"),
    ("USER_PREFIX", "/users/{userId}/"),
    ("SPOOL_DIR", ""),
    ("KAFKA_SECURITY_PROTOCOL", "TLS"),
    ("KAFKA_SASL_MECHANISM", "GSSAPI"),
    ("LOG_LEVEL", "LOUD"),
    ("LOG_FORMAT", "xml"),
]


@pytest.mark.parametrize(("env", "raw"), BAD_VALUES)
def test_bad_values_raise_an_error_naming_the_variable(env: str, raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({env: raw})
    assert env in str(info.value)


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        load({"COMFY_PORT": "abc", "MAX_ATTEMPTS": "-1", "S3_USE_SSL": "maybe"})
    message = str(info.value)
    assert "COMFY_PORT" in message and "MAX_ATTEMPTS" in message and "S3_USE_SSL" in message


def test_soft_mark_above_hard_mark_is_refused() -> None:
    with pytest.raises(SettingsError) as info:
        load({"GPU_SOFT_MARK": "0.9", "GPU_HARD_MARK": "0.8"})
    assert "GPU_SOFT_MARK" in str(info.value)
    equal = load({"GPU_SOFT_MARK": "0.9", "GPU_HARD_MARK": "0.9"})
    assert equal.gpu_soft_mark == equal.gpu_hard_mark == 0.9


def test_retry_base_above_retry_max_is_refused() -> None:
    with pytest.raises(SettingsError) as info:
        load({"RETRY_BASE_S": "10", "RETRY_MAX_S": "1"})
    assert "RETRY_BASE_S" in str(info.value)


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SASL_PASSWORD": PASSWORD}, "KAFKA_SASL_USERNAME"),
        ({"KAFKA_SASL_USERNAME": "svc"}, "KAFKA_SASL_PASSWORD"),
    ],
)
def test_sasl_needs_username_and_password_when_kafka_is_set(protocol: str, given: dict[str, str],
                                                            missing: str) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVER": "broker:9092", "KAFKA_SECURITY_PROTOCOL": protocol, **given}
    with pytest.raises(SettingsError) as info:
        load(env)
    assert missing in str(info.value)
    assert PASSWORD not in str(info.value)


def test_sasl_without_credentials_is_fine_when_kafka_is_off() -> None:
    s = load({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    assert not s.kafka_enabled


def test_sasl_with_credentials_loads() -> None:
    s = load({"KAFKA_BOOTSTRAP_SERVER": "b:9092", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
              "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": PASSWORD})
    assert s.kafka_enabled and s.kafka_sasl_password == PASSWORD


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, "S3_ACCESS_KEY"),
        ({"S3_ACCESS_KEY": "AKIA"}, "S3_SECRET_KEY"),
        ({"S3_SECRET_KEY": SECRET_KEY}, "S3_ACCESS_KEY"),
    ],
)
def test_s3_endpoint_needs_both_keys(given: dict[str, str], missing: str) -> None:
    with pytest.raises(SettingsError) as info:
        load({"S3_ENDPOINT": "minio:9000", **given})
    assert missing in str(info.value)
    assert SECRET_KEY not in str(info.value)


def _with_secrets(**extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVER": "b:9092", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": PASSWORD,
        "S3_ENDPOINT": "minio:9000", "S3_ACCESS_KEY": "AKIA", "S3_SECRET_KEY": SECRET_KEY, **extra,
    }


def test_secrets_never_appear_in_redacted() -> None:
    s = load(_with_secrets())
    shown = s.redacted()
    assert set(shown) == known_variables()
    assert shown["KAFKA_SASL_PASSWORD"] == "***"
    assert shown["S3_SECRET_KEY"] == "***"
    assert shown["KAFKA_SASL_USERNAME"] == "svc"  # non-secrets are shown as they are
    text = repr(shown)
    assert PASSWORD not in text and SECRET_KEY not in text


def test_unset_secrets_are_shown_empty_not_masked() -> None:
    shown = load({}).redacted()
    assert shown["KAFKA_SASL_PASSWORD"] == "" and shown["S3_SECRET_KEY"] == ""


def test_secrets_never_appear_in_repr_or_str() -> None:
    s = load(_with_secrets())
    assert PASSWORD not in repr(s) and SECRET_KEY not in repr(s)
    assert PASSWORD not in str(s) and SECRET_KEY not in str(s)
    assert "kafka_sasl_username='svc'" in repr(s)


def test_secrets_never_appear_in_settings_errors() -> None:
    with pytest.raises(SettingsError) as info:
        load(_with_secrets(COMFY_PORT="abc", MAX_ATTEMPTS="-1", GPU_SOFT_MARK="7"))
    message = str(info.value)
    assert "COMFY_PORT" in message
    assert PASSWORD not in message and SECRET_KEY not in message


def test_secret_specs_are_the_password_and_the_secret_key() -> None:
    assert {spec.env for spec in SPECS if spec.secret} >= {"KAFKA_SASL_PASSWORD", "S3_SECRET_KEY"}


def test_settings_are_frozen() -> None:
    s = load({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.comfy_port = 1  # type: ignore[misc]
    changed = s.replace(comfy_port=1234)
    assert changed.comfy_port == 1234 and s.comfy_port == 8188


def test_derived_values() -> None:
    s = load({"SPOOL_DIR": "/srv/spool", "USER_PREFIX": "u/{userId}"})
    assert s.run_dir == Path("/srv/spool/run")
    assert s.supervisor_rpc_url == "unix:///srv/spool/run/supervisor.sock"
    assert s.user_prefix_for("alice") == "u/alice/"
    assert load({"SUPERVISOR_URL": "http://127.0.0.1:9001"}).supervisor_rpc_url == "http://127.0.0.1:9001"
