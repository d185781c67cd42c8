"""Languages: the catalogues are complete in both languages, and each reader gets theirs."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from devstack.payos_simulator import checkout
from session_api import create_app
from session_api import document as deposit_document
from session_api.admin import render as console_render
from shared.i18n import (
    LANGUAGES,
    CatalogueError,
    Catalogues,
    Language,
    from_accept_language,
)
from shared.mongo import Store
from shared.settings import Settings
from tests.test_session_api import _ready

Client = TestClient[Any, Any]

CATALOGUE_DIRS = {
    "deposit page": deposit_document.LOCALES_DIR,
    "simulator checkout": checkout.LOCALES_DIR,
    "operator console": console_render.LOCALES_DIR,
}


def raw(directory: Path, language: str) -> dict[str, str]:
    loaded: dict[str, str] = json.loads((directory / f"{language}.json").read_text("utf-8"))
    return loaded


@pytest.mark.parametrize("name", CATALOGUE_DIRS)
def test_every_key_is_in_every_language(name: str) -> None:
    directory = CATALOGUE_DIRS[name]
    keys = {language: set(raw(directory, language)) for language in LANGUAGES}
    assert keys["vi"] == keys["en"], {
        "missing in en": sorted(keys["vi"] - keys["en"]),
        "missing in vi": sorted(keys["en"] - keys["vi"]),
    }
    Catalogues.load(directory)  # placeholders agree too, or this raises


def test_every_word_the_deposit_page_uses_is_in_its_catalogue() -> None:
    keys = set(raw(deposit_document.LOCALES_DIR, "vi"))
    html = (deposit_document.STATIC_DIR / "index.html").read_text("utf-8")
    script = (deposit_document.STATIC_DIR / "deposit.js").read_text("utf-8")
    used = set(deposit_document.MESSAGE_RE.findall(html))
    # Every key the script names, whether passed to t() at once or chosen from a table.
    used |= set(re.findall(r'"([a-z]+\.[a-z_]+)"', script)) - {"paypush.session"}
    # What the script reads directly, and the switch's names (shared.i18n.language_switch).
    used |= {"locale", "lang.name"}
    assert used - keys == set()
    assert keys - used == set(), "catalogue entries nothing shows"


def test_a_catalogue_missing_a_key_is_refused() -> None:
    with pytest.raises(CatalogueError, match="'en' lacks keys \\['b'\\]"):
        Catalogues.checked({"vi": {"a": "A", "b": "B"}, "en": {"a": "A"}})
    with pytest.raises(CatalogueError, match="'vi' lacks keys \\['c'\\]"):
        Catalogues.checked({"vi": {"a": "A"}, "en": {"a": "A", "c": "C"}})


def test_a_translation_with_other_placeholders_is_refused() -> None:
    with pytest.raises(CatalogueError, match="'paid'"):
        Catalogues.checked({"vi": {"paid": "Đã nhận {amount}"}, "en": {"paid": "Got {amont}"}})


def test_a_catalogue_file_missing_or_not_strings_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vi.json").write_text('{"a": "A"}', "utf-8")
    with pytest.raises(CatalogueError, match=r"en\.json"):
        Catalogues.load(tmp_path)
    (tmp_path / "en.json").write_text('{"a": 1}', "utf-8")
    with pytest.raises(CatalogueError, match="non-empty strings"):
        Catalogues.load(tmp_path)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("vi-VN,vi;q=0.9,en;q=0.8", "vi"),
        ("en-US,en;q=0.9", "en"),
        ("en-US;q=0.8,en;q=0.7,vi;q=0.95", "vi"),
        ("fr-FR, en;q=0.5", "en"),
        ("EN", "en"),
        ("en;q=0, vi;q=0.1", "vi"),
        ("fr, de", None),
        ("*", None),
        ("", None),
        ("en;q=abc", None),
        ("%%%, en-US", "en"),
    ],
)
def test_accept_language_picks_the_readers_best_language_we_speak(
    header: str, expected: Language | None
) -> None:
    assert from_accept_language(header) == expected


@pytest.fixture
async def site(
    aiohttp_client: Callable[..., Awaitable[Client]], settings: Settings, store: Store
) -> Client:
    # Ready first: an app stopped while its indexes are being created is not what is tested.
    return await _ready(await aiohttp_client(create_app(settings)))


async def title(resp: Any) -> str:
    match = re.search(r"<title>(.*?)</title>", await resp.text())
    assert match is not None
    return match.group(1)


async def test_page_is_vietnamese_by_default(site: Client) -> None:
    resp = await site.get("/")
    assert resp.status == 200 and resp.headers["Content-Language"] == "vi"
    assert await title(resp) == "Nạp tiền qua chuyển khoản"
    assert "Accept-Language" in resp.headers["Vary"] and "Cookie" in resp.headers["Vary"]


async def test_page_is_english_when_the_browser_prefers_it(site: Client) -> None:
    resp = await site.get("/", headers={"Accept-Language": "en-US,en;q=0.9"})
    assert await title(resp) == "Deposit by bank transfer"
    assert '<html lang="en">' in await resp.text()


async def test_page_is_vietnamese_for_a_language_it_does_not_speak(site: Client) -> None:
    resp = await site.get("/", headers={"Accept-Language": "fr-FR,de;q=0.8"})
    assert await title(resp) == "Nạp tiền qua chuyển khoản"


async def test_the_switchs_cookie_wins_over_accept_language(site: Client) -> None:
    resp = await site.get("/", headers={"Accept-Language": "vi-VN", "Cookie": "paypush_lang=en"})
    assert await title(resp) == "Deposit by bank transfer"


async def test_a_cookie_naming_another_language_is_ignored(site: Client) -> None:
    resp = await site.get("/", headers={"Accept-Language": "en", "Cookie": "paypush_lang=xx"})
    assert await title(resp) == "Deposit by bank transfer"


async def test_switch_link_remembers_the_choice_and_keeps_the_other_parameters(
    site: Client,
) -> None:
    resp = await site.get("/?account=shop.user-1&lang=en&token=abc", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/?account=shop.user-1&token=abc"
    cookie = resp.cookies["paypush_lang"]
    assert cookie.value == "en" and cookie["path"] == "/" and cookie["httponly"]
    assert cookie["samesite"] == "Lax" and int(cookie["max-age"]) > 30 * 24 * 3600


async def test_switch_link_to_a_language_we_do_not_speak_is_ignored(site: Client) -> None:
    resp = await site.get("/?lang=fr", allow_redirects=False)
    assert resp.status == 200 and "Set-Cookie" not in resp.headers
    assert await title(resp) == "Nạp tiền qua chuyển khoản"


async def test_switch_links_carry_the_addresss_parameters_escaped(site: Client) -> None:
    resp = await site.get("/", params={"account": 'a"><b>', "token": "t"})
    html = await resp.text()
    assert "<b>" not in html.split("<main", 1)[1].split("</nav>", 1)[0]
    assert 'id="lang-en" href="/?account=a%22%3E%3Cb%3E&amp;token=t&amp;lang=en"' in html
    assert 'id="lang-vi" href="/?account=a%22%3E%3Cb%3E&amp;token=t&amp;lang=vi"' in html
    assert 'aria-current="true">Tiếng Việt</a>' in html


async def test_page_keeps_its_csp_in_both_languages(site: Client) -> None:
    for language in LANGUAGES:
        resp = await site.get("/", headers={"Cookie": f"paypush_lang={language}"})
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self';" in csp and "unsafe" not in csp
        html = await resp.text()
        # One external script, the config as data: nothing inline to execute.
        assert re.findall(r"<script[^>]*>", html) == [
            '<script id="config" type="application/json">',
            '<script src="/static/deposit.js" defer>',
        ]


def test_every_word_the_operator_console_uses_is_in_its_catalogue() -> None:
    keys = set(raw(console_render.LOCALES_DIR, "vi"))
    used: set[str] = set()
    for template in console_render.TEMPLATES_DIR.glob("*.html"):
        used |= set(console_render.MESSAGE_RE.findall(template.read_text("utf-8")))
    code = Path(console_render.__file__).parent
    for module in code.glob("*.py"):
        # Keys named in the code: "prefix.name" strings given to text() and the templates.
        used |= set(re.findall(r'"((?:[a-z]+)\.[a-z_0-9]+)"', module.read_text("utf-8")))
    used -= {"admin.css", "admin.js", "chart.svg"}
    assert used - keys == set()
