"""The console's HTML: templates (files beside this module) in each language, and the few
ways values are written (amounts, times, counts) in the reader's language.

A template's `{{key}}` is a message of the console's catalogue (locales/), filled in once at
start-up; its `$name` is filled per request (string.Template) with HTML this module builds,
every value escaped on the way in.
"""

from __future__ import annotations

import html
import re
import string
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from shared.i18n import LANGUAGES, Catalogues, Language

from .filters import VIETNAM

TEMPLATES_DIR = Path(__file__).parent / "templates"
LOCALES_DIR = Path(__file__).parent / "locales"
STATIC_DIR = Path(__file__).parent / "static"
MESSAGE_RE = re.compile(r"\{\{([a-z0-9_.]+)\}\}")
# Thousands and decimal separators of each language (vi-VN: 50.000 and 4,2).
_SEPARATORS: dict[Language, tuple[str, str]] = {"vi": (".", ","), "en": (",", ".")}
# Times in Vietnam's zone, as each language writes them.
_TIME_FORMATS: dict[Language, str] = {"vi": "%H:%M:%S %d/%m/%Y", "en": "%Y-%m-%d %H:%M:%S"}
NONE = "—"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


@dataclass(frozen=True, slots=True)
class Console:
    """The catalogues and every template in every language."""

    catalogues: Catalogues
    templates: dict[tuple[str, Language], string.Template]

    @classmethod
    def load(cls) -> Console:
        catalogues = Catalogues.load(LOCALES_DIR)
        templates: dict[tuple[str, Language], string.Template] = {}
        for path in sorted(TEMPLATES_DIR.glob("*.html")):
            text = path.read_text(encoding="utf-8")
            for language in LANGUAGES:

                def message(match: re.Match[str], language: Language = language) -> str:
                    # `$` doubled: a message is text, never a placeholder of the template.
                    return esc(catalogues.text(language, match.group(1))).replace("$", "$$")

                templates[(path.stem, language)] = string.Template(MESSAGE_RE.sub(message, text))
        return cls(catalogues, templates)

    def fill(self, name: str, language: Language, **values: object) -> str:
        """Template `name` with `values` (HTML, already escaped by the caller)."""
        return self.templates[(name, language)].substitute(values)

    def text(self, language: Language, key: str, **params: object) -> str:
        """A message as text (to be escaped where it goes into HTML)."""
        return self.catalogues.text(language, key, **params)

    def label(self, language: Language, prefix: str, value: object) -> str:
        """`prefix.value`'s message, or the value itself when the catalogue has none (a
        status or kind added after this console was written)."""
        key = f"{prefix}.{value}"
        if key in self.catalogues.messages[language]:
            return self.text(language, key)
        return str(value)


def number(language: Language, value: int | float) -> str:
    thousands, _ = _SEPARATORS[language]
    return f"{round(value):,}".replace(",", thousands)


def decimal(language: Language, value: float, digits: int = 1) -> str:
    thousands, point = _SEPARATORS[language]
    text = f"{value:,.{digits}f}"
    return text.replace(",", "\0").replace(".", point).replace("\0", thousands)


def money(language: Language, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NONE
    return f"{number(language, value)}\xa0₫"


def when(language: Language, value: object) -> str:
    if not isinstance(value, datetime):
        return NONE
    return value.astimezone(VIETNAM).strftime(_TIME_FORMATS[language])


def milliseconds(console: Console, language: Language, seconds: float | None) -> str:
    if seconds is None:
        return console.text(language, "counter.none")
    ms = seconds * 1000
    value = decimal(language, ms, 1 if ms < 10 else 0)
    return console.text(language, "counter.ms", value=value)


def count(console: Console, language: Language, value: int | None) -> str:
    return console.text(language, "counter.none") if value is None else number(language, value)


def options(choices: list[tuple[str, str]], selected: str) -> str:
    """`<option>`s of (value, label), `selected` marked."""
    return "".join(
        f'<option value="{esc(value)}"{" selected" if value == selected else ""}>{esc(label)}'
        "</option>"
        for value, label in choices
    )
