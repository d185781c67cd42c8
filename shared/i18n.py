"""Languages of the pages people read (the deposit page, the simulator's checkout).

Vietnamese first: a page speaks Vietnamese unless the reader asked for English, by the page's
vi/en switch (a `?lang=` link, remembered in a cookie) or by the browser's Accept-Language.
Each page keeps its words in one JSON catalogue per language beside its code; `Catalogues`
refuses to load a set in which one language lacks a key, or a message's `{placeholders}`
differ, so a missing translation stops the service at start-up rather than showing a key.
"""

from __future__ import annotations

import html
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from aiohttp import web

Language = Literal["vi", "en"]
LANGUAGES: tuple[Language, ...] = get_args(Language)
DEFAULT_LANGUAGE: Language = "vi"
# The reader's choice from the switch. Not a secret and not tied to a session; a cookie (not
# localStorage) so the server renders the chosen language from the first byte, without a
# flash of the other one. Cookies ignore ports: locally the simulator shares the choice.
LANGUAGE_COOKIE = "paypush_lang"
LANGUAGE_COOKIE_MAX_AGE = 365 * 24 * 3600
_TAG_RE = re.compile(r"^[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*$|^\*$")


class CatalogueError(ValueError):
    """A language's catalogue is missing, malformed, or out of step with the others."""


def placeholders(message: str) -> frozenset[str]:
    """The `{names}` a message expects."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(message) if name)


@dataclass(frozen=True, slots=True)
class Catalogues:
    """Every language's messages for one page: `{language: {key: message}}`."""

    messages: Mapping[Language, Mapping[str, str]]

    @classmethod
    def load(cls, directory: Path) -> Catalogues:
        """`<directory>/<language>.json` for every language, checked against each other."""
        loaded: dict[Language, dict[str, str]] = {}
        for language in LANGUAGES:
            path = directory / f"{language}.json"
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CatalogueError(f"{path}: {exc}") from None
            if not isinstance(raw, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in raw.items()
            ):
                raise CatalogueError(f"{path}: must map keys to non-empty strings")
            loaded[language] = raw
        return cls.checked(loaded)

    @classmethod
    def checked(cls, messages: Mapping[Language, Mapping[str, str]]) -> Catalogues:
        """These catalogues, after checking that every language has every key, with the same
        placeholders in each message."""
        first = DEFAULT_LANGUAGE
        for language in LANGUAGES:
            if language not in messages:
                raise CatalogueError(f"no catalogue for {language!r}")
        for language in LANGUAGES[1:]:
            missing = sorted(set(messages[first]) - set(messages[language]))
            extra = sorted(set(messages[language]) - set(messages[first]))
            if missing:
                raise CatalogueError(f"{language!r} lacks keys {missing}")
            if extra:
                raise CatalogueError(f"{first!r} lacks keys {extra}")
            for key, message in messages[first].items():
                ours, theirs = placeholders(message), placeholders(messages[language][key])
                if ours != theirs:
                    raise CatalogueError(
                        f"{key!r}: {first!r} expects {sorted(ours)}, "
                        f"{language!r} expects {sorted(theirs)}"
                    )
        return cls(messages)

    def text(self, language: Language, key: str, **params: object) -> str:
        """One message in `language` with its placeholders filled (KeyError: no such key)."""
        message = self.messages[language][key]
        return message.format(**params) if params else message


def parse_language(value: str | None) -> Language | None:
    """`value` when it names a language we speak (`vi`, `en`, case-insensitive), else None."""
    if value is None:
        return None
    lowered = value.strip().lower()
    for language in LANGUAGES:
        if lowered == language:
            return language
    return None


def from_accept_language(header: str) -> Language | None:
    """The reader's most preferred language we speak, by Accept-Language's q-values (RFC 9110
    §12.5.4; on a tie the earlier range wins); None when it names none of ours."""
    best: tuple[float, int, Language] | None = None
    for position, item in enumerate(header.split(",")[:32]):
        tag, _, params = item.strip().partition(";")
        tag = tag.strip()
        if not _TAG_RE.fullmatch(tag):
            continue
        quality = 1.0
        for param in params.split(";"):
            name, _, raw = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(raw)
                except ValueError:
                    quality = 0.0
        if not 0 < quality <= 1:
            continue
        language = parse_language(tag.split("-", 1)[0])
        if language is None:
            continue
        if best is None or (quality, -position) > (best[0], -best[1]):
            best = (quality, position, language)
    return None if best is None else best[2]


def request_language(request: web.Request) -> Language:
    """The language to answer `request` in: `?lang=`, then the switch's cookie, then
    Accept-Language, then Vietnamese."""
    return (
        parse_language(request.query.get("lang"))
        or parse_language(request.cookies.get(LANGUAGE_COOKIE))
        or from_accept_language(request.headers.get("Accept-Language", ""))
        or DEFAULT_LANGUAGE
    )


def remember_language(response: web.StreamResponse, language: Language, *, secure: bool) -> None:
    """Keep the switch's choice for the next visits (and reloads)."""
    response.set_cookie(
        LANGUAGE_COOKIE,
        language,
        max_age=LANGUAGE_COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=secure,
    )


def switch_redirect(request: web.Request, *, secure: bool) -> web.Response | None:
    """For `?lang=xx` (the switch's links): remember the choice, and send the reader back to
    the same address without `lang`, so a reload or a bookmark follows the cookie. None when
    the request names no language we speak."""
    language = parse_language(request.query.get("lang"))
    if language is None:
        return None
    kept = [(k, v) for k, v in request.rel_url.query.items() if k != "lang"]
    response = web.Response(status=303, headers={"Location": str(request.rel_url.with_query(kept))})
    remember_language(response, language, secure=secure)
    return response


def language_switch(request: web.Request, current: Language, catalogues: Catalogues) -> str:
    """The switch's links (`<a id="lang-xx" href="?…&lang=xx">`, each language named in
    itself), keeping the address's other parameters (a signed account link's, say)."""
    kept = [(k, v) for k, v in request.rel_url.query.items() if k != "lang"]
    links = []
    for language in LANGUAGES:
        href = html.escape(str(request.rel_url.with_query([*kept, ("lang", language)])))
        mark = ' aria-current="true"' if language == current else ""
        name = html.escape(catalogues.text(language, "lang.name"))
        links.append(
            f'<a id="lang-{language}" href="{href}" hreflang="{language}" lang="{language}"'
            f"{mark}>{name}</a>"
        )
    return "".join(links)
