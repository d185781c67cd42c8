"""Accounts proven by the shop: signed account links, from the token to the page."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from session_api.accounts import AccountLinks, link_signature, sign_account_link
from session_api.errors import AccountLinkRejected
from shared.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
KEY = "shop-link-key-0123456789abcdef"
NOW = 1_800_000_000.0


def links(now: float = NOW) -> AccountLinks:
    return AccountLinks(KEY, clock=lambda: now)


def reason_of(account: str, token: object, now: float = NOW) -> str:
    with pytest.raises(AccountLinkRejected) as info:
        links(now).verify(account, token)
    return info.value.reason


# --- the token ---------------------------------------------------------------------------------


def test_a_genuine_link_is_accepted() -> None:
    links().verify("shop.user-42", sign_account_link(KEY, "shop.user-42", int(NOW) + 900))


def test_the_signature_is_hmac_sha256_of_account_and_expiry() -> None:
    # Independently computed: printf 'user-1:1800000900' | openssl dgst -sha256 -hmac KEY
    assert link_signature(KEY, "user-1", 1_800_000_900) == (
        subprocess.run(
            ["openssl", "dgst", "-sha256", "-hmac", KEY, "-r"],
            input=b"user-1:1800000900",
            capture_output=True,
            check=True,
        )
        .stdout.split()[0]
        .decode()
    )


def test_no_token_is_refused_as_missing() -> None:
    assert reason_of("user-1", None) == "missing"
    assert reason_of("user-1", "") == "missing"


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "1800000900",
        "1800000900." + "a" * 63,
        "1800000900." + "A" * 64,
        "1800000900." + "g" * 64,
        "-1." + "a" * 64,
        "1800000900.." + "a" * 64,
        "1" * 13 + "." + "a" * 64,
        1800000900,
        ["1800000900." + "a" * 64],
    ],
)
def test_a_token_of_the_wrong_shape_is_refused_as_malformed(token: object) -> None:
    assert reason_of("user-1", token) == "malformed"


def test_a_token_for_another_account_is_refused() -> None:
    token = sign_account_link(KEY, "user-1", int(NOW) + 900)
    assert reason_of("user-2", token) == "bad_signature"


def test_a_token_with_a_changed_expiry_is_refused() -> None:
    expires = int(NOW) + 900
    signature = sign_account_link(KEY, "user-1", expires).split(".")[1]
    assert reason_of("user-1", f"{expires + 3600}.{signature}") == "bad_signature"


def test_a_token_signed_with_another_key_is_refused() -> None:
    token = sign_account_link("another-key-0123456789", "user-1", int(NOW) + 900)
    assert reason_of("user-1", token) == "bad_signature"


def test_an_expired_token_is_refused_as_expired() -> None:
    token = sign_account_link(KEY, "user-1", int(NOW) - 1)
    assert reason_of("user-1", token) == "expired"
    assert reason_of("user-1", sign_account_link(KEY, "user-1", int(NOW))) == "expired"


def test_a_token_valid_for_more_than_an_hour_is_refused() -> None:
    # A minute of clock skew is allowed, no more.
    links().verify("user-1", sign_account_link(KEY, "user-1", int(NOW) + 3600 + 60))
    token = sign_account_link(KEY, "user-1", int(NOW) + 3600 + 61)
    assert reason_of("user-1", token) == "too_far"


def test_without_a_key_every_account_is_taken_as_given() -> None:
    AccountLinks("").verify("user-1", None)
    AccountLinks("").verify("user-1", "not a token")


# --- settings ------------------------------------------------------------------------------------

REAL = {
    "APP_ENV": "production",
    "PAYOS_CLIENT_ID": "real-id",
    "PAYOS_API_KEY": "real-api-key",
    "PAYOS_CHECKSUM_KEY": "real-checksum",
    "CRON_SECRET": "real-cron",
    "ADMIN_TOKEN": "real-admin",
}
SESSION_API_SECRETS = (
    "payos_client_id",
    "payos_api_key",
    "payos_checksum_key",
    "cron_secret",
    "admin_token",
    "account_link_key",
)


def test_production_session_api_without_a_link_key_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="production needs ACCOUNT_LINK_KEY"):
        Settings.from_env(REAL, secrets=SESSION_API_SECRETS)


def test_production_session_api_without_a_link_key_starts_when_told_so() -> None:
    settings = Settings.from_env(
        {**REAL, "ALLOW_UNSIGNED_ACCOUNTS": "true"}, secrets=SESSION_API_SECRETS
    )
    assert settings.is_production and settings.account_link_key == ""


def test_production_session_api_with_a_link_key_starts() -> None:
    settings = Settings.from_env({**REAL, "ACCOUNT_LINK_KEY": KEY}, secrets=SESSION_API_SECRETS)
    assert settings.account_link_key == KEY


def test_other_processes_in_production_need_no_link_key_and_hold_none() -> None:
    ingest = Settings.from_env({**REAL, "ACCOUNT_LINK_KEY": KEY}, secrets=("payos_checksum_key",))
    assert ingest.account_link_key == ""


def test_a_short_link_key_is_refused() -> None:
    with pytest.raises(SettingsError, match="at least 16 characters"):
        Settings.from_env({"ACCOUNT_LINK_KEY": "short"})


def test_development_runs_without_a_link_key() -> None:
    assert Settings.from_env({}, secrets=SESSION_API_SECRETS).account_link_key == ""


# --- the README's examples for the shop's backend ----------------------------------------------


def readme_block(language: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Accounts proven by the shop", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(rf"```{language}\n(.*?)```", section, re.S)
    return str(block)


def token_from(url: str) -> tuple[str, str]:
    query = parse_qs(urlsplit(url).query)
    return query["account"][0], query["token"][0]


def test_the_readmes_python_example_makes_a_link_we_accept() -> None:
    block = readme_block("python")
    assert len(block.strip().splitlines()) == 5
    scope: dict[str, object] = {"ACCOUNT_LINK_KEY": KEY, "account": "shop.user-42"}
    exec(block, scope)
    account, token = token_from(str(scope["deposit_url"]))
    assert account == "shop.user-42"
    AccountLinks(KEY).verify(account, token)


def test_the_readmes_node_example_makes_a_link_we_accept(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    block = readme_block("js")
    assert len(block.strip().splitlines()) == 5
    script = tmp_path / "link.js"
    script.write_text(f'const account = "shop.user-42";\n{block}\nconsole.log(depositUrl);\n')
    result = subprocess.run(
        [node, str(script)],
        capture_output=True,
        text=True,
        check=True,
        env={"ACCOUNT_LINK_KEY": KEY, "PATH": "/usr/bin:/bin"},
    )
    account, token = token_from(result.stdout.strip())
    assert account == "shop.user-42"
    expires = int(token.split(".")[0])
    assert time.time() + 800 < expires <= time.time() + 900
    AccountLinks(KEY).verify(account, token)
