"""Accounts proven by the shop: signed account links, from the token to the page."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from playwright.async_api import Page

from devstack.system import Backends, System
from session_api import create_app
from session_api.accounts import AccountLinks, link_signature, sign_account_link
from session_api.errors import AccountLinkRejected
from shared.appkeys import METRICS
from shared.mongo import Store
from shared.settings import Settings, SettingsError
from tests.helpers import browser_page, simulator_to_ingest, system_over
from tests.test_session_api import _ready

Client = TestClient[Any, Any]

ROOT = Path(__file__).resolve().parents[1]
KEY = "shop-link-key-0123456789abcdef"
NOW = 1_800_000_000.0


def links(now: float = NOW) -> AccountLinks:
    return AccountLinks(KEY, clock=lambda: now)


def reason_of(account: str, token: str | None, now: float = NOW) -> str:
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
    ],
)
def test_a_token_of_the_wrong_shape_is_refused_as_malformed(token: str) -> None:
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
    assert len([line for line in block.splitlines() if line.strip()]) == 5
    scope: dict[str, object] = {"link_key": KEY, "account": "shop.user-42"}
    exec(block, scope)
    account, token = token_from(str(scope["deposit_url"]))
    assert account == "shop.user-42"
    AccountLinks(KEY).verify(account, token)


def test_the_readmes_node_example_makes_a_link_we_accept(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    block = readme_block("js")
    assert len([line for line in block.splitlines() if line.strip()]) == 5
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


# --- session-api over HTTP -------------------------------------------------------------------


@pytest.fixture
async def sim_url(settings: Settings, store: Store) -> AsyncIterator[str]:
    async with simulator_to_ingest(settings) as sim:
        yield sim.url


@pytest.fixture
async def signed(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, sim_url: str
) -> Client:
    """session-api whose shop signs account links."""
    app = create_app(dataclasses.replace(settings, payos_base_url=sim_url, account_link_key=KEY))
    return await _ready(await aiohttp_client(app))


@pytest.fixture
async def unsigned(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, sim_url: str
) -> Client:
    """session-api without ACCOUNT_LINK_KEY (development)."""
    return await _ready(
        await aiohttp_client(create_app(dataclasses.replace(settings, payos_base_url=sim_url)))
    )


def token(account: str, seconds: int = 900) -> str:
    return sign_account_link(KEY, account, int(time.time()) + seconds)


async def post(client: Client, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/api/sessions", json=body)
    return resp.status, await resp.json()


async def check(client: Client, **params: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/api/webhooks/check-session-limit", params=params)
    return resp.status, await resp.json()


def unauthorized_count(client: Client) -> float:
    sample = client.app[METRICS].get_sample_value(
        "paypush_session_requests_total", {"outcome": "unauthorized"}
    )
    return float(sample or 0)


async def test_a_signed_account_creates_a_session(signed: Client, store: Store) -> None:
    status, body = await post(
        signed,
        {"accountNumber": "shop.user-42", "accountToken": token("shop.user-42"), "amount": 20_000},
    )
    assert status == 201, body
    stored = await store.sessions.find_one({"uuid": body["uuid"]})
    assert stored is not None and stored["accountNumber"] == "shop.user-42"


BAD_TOKENS = [
    pytest.param(None, "missing", id="missing"),
    pytest.param("", "missing", id="empty"),
    pytest.param("not-a-token", "malformed", id="malformed"),
    pytest.param("tampered", "bad_signature", id="tampered"),
    pytest.param("other-account", "bad_signature", id="other-account"),
    pytest.param("expired", "expired", id="expired"),
    pytest.param("too-far", "too_far", id="too-far"),
]


def bad_token(kind: object, account: str) -> object:
    if kind == "tampered":
        expires, signature = token(account).split(".")
        return f"{expires}.{signature[:-1]}{'0' if signature[-1] != '0' else '1'}"
    if kind == "other-account":
        return token("someone-else")
    if kind == "expired":
        return token(account, -5)
    if kind == "too-far":
        return token(account, 2 * 3600)
    return kind


@pytest.mark.parametrize(("kind", "reason"), BAD_TOKENS)
async def test_creating_with_a_bad_token_is_401_and_counts_nothing(
    signed: Client, store: Store, kind: object, reason: str
) -> None:
    account = "victim-1"
    body: dict[str, Any] = {"accountNumber": account, "amount": 20_000}
    if kind is not None:
        body["accountToken"] = bad_token(kind, account)
    status, answer = await post(signed, body)
    assert status == 401, answer
    assert answer["success"] is False and answer["reason"] == reason and answer["error"]
    assert await store.sessions.count_documents({}) == 0
    assert unauthorized_count(signed) == 1
    _, limit = await check(signed, accountNumber=account, accountToken=token(account))
    assert limit["pendingCount"] == 0


async def test_a_bad_token_cannot_resume_a_pending_session(signed: Client) -> None:
    account = "shop.user-7"
    _, created = await post(
        signed, {"accountNumber": account, "accountToken": token(account), "amount": 20_000}
    )
    status, body = await post(
        signed,
        {
            "accountNumber": account,
            "accountToken": token(account, -1),
            "amount": 20_000,
            "uuid": created["uuid"],
        },
    )
    assert (status, body["reason"]) == (401, "expired")


async def test_sixth_deposit_of_a_signed_account_is_still_limited(signed: Client) -> None:
    account = "shop.user-9"
    for _ in range(5):
        assert (
            await post(
                signed, {"accountNumber": account, "accountToken": token(account), "amount": 10_000}
            )
        )[0] == 201
    status, body = await post(
        signed, {"accountNumber": account, "accountToken": token(account), "amount": 10_000}
    )
    assert (status, body["pendingCount"]) == (429, 5)


async def test_the_limit_check_of_a_signed_account_answers(signed: Client) -> None:
    status, body = await check(signed, accountNumber="123", accountToken=token("123"))
    assert status == 200 and (body["canCreate"], body["pendingCount"]) == (True, 0)


@pytest.mark.parametrize(("kind", "reason"), BAD_TOKENS)
async def test_the_limit_check_with_a_bad_token_is_401(
    signed: Client, kind: object, reason: str
) -> None:
    params = {"accountNumber": "victim-1"}
    if kind is not None:
        params["accountToken"] = str(bad_token(kind, "victim-1"))
    status, body = await check(signed, **params)
    assert (status, body["success"], body["reason"]) == (401, False, reason)


@pytest.mark.parametrize("value", [12345, True, {"expires": 1}, ["a"], "1." + "a" * 127], ids=str)
async def test_a_token_that_is_not_a_short_string_is_400_signed_or_not(
    signed: Client, unsigned: Client, store: Store, value: object
) -> None:
    for client in (signed, unsigned):
        status, body = await post(
            client, {"accountNumber": "user-1", "accountToken": value, "amount": 10_000}
        )
        assert status == 400 and "accountToken" in body["error"]
    assert await store.sessions.count_documents({}) == 0


async def test_a_limit_check_token_longer_than_128_characters_is_400(signed: Client) -> None:
    too_long = "1." + "a" * 127
    for params in (
        {"accountNumber": "user-1", "accountToken": too_long},
        {"uuid": "6f1c2a55-0e3b-4d7a-9c1e-2b3d4e5f6a7b", "accountToken": too_long},
    ):
        status, body = await check(signed, **params)
        assert status == 400 and "accountToken" in body["error"]


async def test_the_limit_check_by_uuid_needs_no_token(signed: Client) -> None:
    status, body = await check(signed, uuid="6f1c2a55-0e3b-4d7a-9c1e-2b3d4e5f6a7b")
    assert status == 200 and body["exists"] is False


@pytest.mark.parametrize(
    "account", ["123", "1", "shop.user-42", "A_b-C.9", "x" * 64, "0123456789012345678901234"]
)
async def test_an_account_is_1_to_64_letters_digits_dots_underscores_or_dashes(
    unsigned: Client, account: str
) -> None:
    status, body = await check(unsigned, accountNumber=account)
    assert status == 200 and body["canCreate"] is True
    assert (await post(unsigned, {"accountNumber": account, "amount": 10_000}))[0] == 201


@pytest.mark.parametrize(
    "account",
    [
        pytest.param("", id="empty"),
        pytest.param("x" * 65, id="65-chars"),
        pytest.param("a b", id="space"),
        pytest.param("tài-khoản", id="accents"),
        pytest.param("a:b", id="colon"),
        pytest.param("a/b", id="slash"),
        pytest.param("a\nb", id="newline"),
        pytest.param("$where", id="dollar"),
    ],
)
async def test_a_malformed_account_is_400_in_both_endpoints(
    signed: Client, store: Store, account: str
) -> None:
    status, body = await post(
        signed, {"accountNumber": account, "accountToken": token(account), "amount": 10_000}
    )
    assert status == 400 and "accountNumber" in body["error"]
    status, body = await check(signed, accountNumber=account, accountToken=token(account))
    assert status == 400 and "accountNumber" in body["error"]
    assert await store.sessions.count_documents({}) == 0


async def test_without_a_key_the_account_is_taken_as_given(unsigned: Client) -> None:
    status, _ = await post(
        unsigned, {"accountNumber": "123", "accountToken": "anything", "amount": 10_000}
    )
    assert status == 201


# --- the page, in a real browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def system(servers: Backends) -> Iterator[System]:
    with system_over(servers, "links", account_link_key=KEY) as started:
        yield started


@pytest.fixture
async def page(system: System) -> AsyncIterator[Page]:
    async with browser_page() as page:
        yield page


@pytest.fixture
def shots(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return ROOT / "docs" if request.config.getoption("--update-screenshots") else tmp_path


def link_url(system: System, account: str, token_: str) -> str:
    return f"{system.page_url}?account={account}&token={token_}"


async def pay(system: System, order_code: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{system.settings.payos_base_url}/sim/pay/{order_code}", json={}) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def test_a_signed_link_deposits_for_its_account_and_survives_a_reload(
    page: Page, system: System, shots: Path
) -> None:
    await page.goto(link_url(system, "shop.user-42", token("shop.user-42")))
    account = page.get_by_label("Tài khoản")
    assert await account.input_value() == "shop.user-42"
    assert await account.get_attribute("readonly") is not None
    assert "cửa hàng xác nhận" in await page.inner_text("#account-hint")
    await page.get_by_label("Số tiền (VND)").fill("100000")
    await page.screenshot(path=shots / "deposit-signed-link.png", full_page=True)
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=waiting]")
    order_code = await page.inner_text("#pay-order")
    await page.reload()
    await page.wait_for_selector("body[data-state=waiting]")
    assert await page.inner_text("#pay-order") == order_code
    await pay(system, order_code)
    await page.wait_for_selector("body[data-state=paid]", timeout=5_000)
    assert "Đã nhận thanh toán 100.000" in await page.inner_text("#status")


async def test_a_tampered_link_is_refused_on_the_page(
    page: Page, system: System, shots: Path
) -> None:
    forged = token("shop.user-42").replace(".", ".f", 1)[:-1]
    await page.goto(link_url(system, "shop.user-42", forged))
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=link]")
    assert await page.inner_text("#error") == (
        "Liên kết nạp tiền không hợp lệ. Vui lòng quay lại cửa hàng và mở lại trang nạp tiền."
    )
    await page.screenshot(path=shots / "deposit-link-refused.png", full_page=True)


async def test_a_link_for_another_account_is_refused_on_the_page(
    page: Page, system: System
) -> None:
    await page.goto(link_url(system, "victim-1", token("shop.user-42")))
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=link]")
    assert "không hợp lệ" in await page.inner_text("#error")


async def test_an_expired_link_is_refused_on_the_page(page: Page, system: System) -> None:
    await page.goto(link_url(system, "shop.user-42", token("shop.user-42", -60)))
    await page.get_by_role("button", name="Tạo mã QR").click()
    await page.wait_for_selector("body[data-state=link]")
    assert await page.inner_text("#error") == (
        "Liên kết nạp tiền đã hết hạn. Vui lòng quay lại cửa hàng và mở lại trang nạp tiền."
    )


async def test_without_a_link_the_page_sends_the_shopper_back_to_the_shop(
    page: Page, system: System
) -> None:
    await page.goto(system.page_url)
    await page.wait_for_selector("body[data-state=link]")
    assert await page.get_by_role("button", name="Tạo mã QR").is_disabled()
    assert "từ liên kết trên trang của cửa hàng" in await page.inner_text("#error")
