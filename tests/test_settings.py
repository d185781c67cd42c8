"""Settings read from the environment: every field by its real type, and back again."""

from __future__ import annotations

import base64
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings, SettingsError, _parse

DEFAULTS = Settings()
HINTS = typing.get_type_hints(Settings)


def changed(name: str, value: object) -> object:
    """A valid value of field `name` other than its default, whatever the field's type."""
    hint = HINTS[name]
    if name == "app_env":
        return "production"
    if name == "account_link_key":
        # A key is 16 characters at least.
        return "k" * 32
    if hint is bool:
        return not value
    if hint is int:
        return typing.cast(int, value) + 7
    if hint is float:
        return typing.cast(float, value) + 0.25
    if name == "shop_webhook_secret":
        return ("whsec_" + base64.b64encode(b"s" * 32).decode(),)
    if name == "shop_webhook_url":
        return ("https://shop.example/payment-events",)
    if name == "gateway_metrics_urls":
        return ("http://10.0.0.9:9090/metrics", "http://10.0.0.10:9090/metrics")
    if hint == tuple[str, ...]:
        # Valid as an origin and as a trusted proxy network alike.
        return (*typing.cast(tuple[str, ...], value), "10.0.0.0/8", "192.168.1.1")
    if hint is str:
        text = typing.cast(str, value)
        # Still a URL where one is one, and no development secret any more.
        return f"{text}1" if "://" in text else f"{text}-changed"
    raise AssertionError(f"no example for Settings.{name}: {hint!r}; add one here")


def test_every_field_round_trips_through_env_and_from_env() -> None:
    values: dict[str, Any] = {
        f.name: changed(f.name, getattr(DEFAULTS, f.name)) for f in fields(Settings)
    }
    every = replace(DEFAULTS, **values)
    assert all(getattr(every, f.name) != getattr(DEFAULTS, f.name) for f in fields(Settings))
    assert Settings.from_env(every.env()) == every


def test_the_defaults_round_trip_through_env_and_from_env() -> None:
    assert Settings.from_env(DEFAULTS.env()) == DEFAULTS


def test_values_are_parsed_as_their_fields_real_types() -> None:
    parsed = Settings.from_env(
        {
            "REDIS_CLUSTER": "yes",
            "MAX_STREAMS": "12",
            "SSE_KEEPALIVE_SECONDS": "2.5",
            "CORS_ORIGINS": " http://a.test , ,http://b.test",
        }
    )
    assert parsed.redis_cluster is True
    assert parsed.max_streams == 12
    assert parsed.sse_keepalive_seconds == 2.5
    assert parsed.cors_origins == ("http://a.test", "http://b.test")


def test_a_malformed_number_is_refused_with_its_variable_named() -> None:
    with pytest.raises(SettingsError, match="MAX_STREAMS='many' is not a valid int"):
        Settings.from_env({"MAX_STREAMS": "many"})


def test_optional_and_path_fields_are_parsed_as_such() -> None:
    assert _parse("x", float | None, "") is None
    assert _parse("x", float | None, "1.5") == 1.5
    assert _parse("x", Path, "/tmp/x") == Path("/tmp/x")


def test_a_field_type_without_a_parser_is_an_error_not_a_string() -> None:
    with pytest.raises(TypeError, match="no parser"):
        _parse("x", dict[str, str], "a=b")
