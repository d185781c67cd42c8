"""The deposit page's document in each language, rendered once at start-up.

Its words come from `locales/<language>.json` (`shared.i18n`), the script's words too (carried
in its config), so the page has no words of its own in code.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from shared.i18n import LANGUAGES, Catalogues, Language, language_switch
from shared.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
LOCALES_DIR = Path(__file__).parent / "locales"
# `{{key}}` in index.html: a message of the catalogue, escaped for text and attributes.
MESSAGE_RE = re.compile(r"\{\{([a-z_.]+)\}\}")
# The wait before the page gives up, and the fallback polling period (the original's).
MAX_WAIT_MS = 10 * 60 * 1000
POLL_INTERVAL_MS = 5000
# Polling starts only after this many stream failures in a row without an event in between
# (a rollout's dropped stream reconnects in one) and once the stream has been down this long:
# a gateway restart on a loaded machine takes longer than a few `retry:` intervals, and every
# page it drops must wait for it rather than poll session-api. While polling, the stream is
# tried again about every STREAM_PROBE_MS. A refused stream (503) is opened again after about
# RECONNECT_MS.
STREAM_FAILURES_BEFORE_POLLING = 4
STREAM_DOWN_BEFORE_POLLING_MS = 20_000
STREAM_PROBE_MS = 30_000
RECONNECT_MS = 3000


def _script_json(value: object) -> str:
    """JSON for a `<script type="application/json">`: `<` escaped so no value can close it."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def _words(template: str, catalogues: Catalogues, language: Language, **params: object) -> str:
    """`template` with every `{{key}}` replaced by its message (KeyError: not in the catalogue)."""

    def message(match: re.Match[str]) -> str:
        return html.escape(catalogues.text(language, match.group(1), **params))

    return MESSAGE_RE.sub(message, template)


@dataclass(frozen=True, slots=True)
class DepositPage:
    """The document in each language, rendered once at start-up but for what depends on the
    request (the switch's links, which keep the address's other parameters)."""

    catalogues: Catalogues
    documents: dict[Language, str]

    @classmethod
    def load(cls, settings: Settings) -> DepositPage:
        catalogues = Catalogues.load(LOCALES_DIR)
        template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        # What the document shows before the script runs (the countdown's start).
        wait = f"{MAX_WAIT_MS // 60_000}:00"
        documents: dict[Language, str] = {}
        for language in LANGUAGES:
            config: dict[str, Any] = {
                "streamUrl": settings.stream_public_url.rstrip("/"),
                "pollIntervalMs": POLL_INTERVAL_MS,
                "streamFailuresBeforePolling": STREAM_FAILURES_BEFORE_POLLING,
                "streamDownBeforePollingMs": STREAM_DOWN_BEFORE_POLLING_MS,
                "streamProbeMs": STREAM_PROBE_MS,
                "reconnectMs": RECONNECT_MS,
                "maxWaitMs": MAX_WAIT_MS,
                # The shop signs account links: the page takes the account from its link only.
                "signedAccounts": bool(settings.account_link_key),
                "language": language,
                "messages": dict(catalogues.messages[language]),
            }
            documents[language] = (
                _words(template, catalogues, language, time=wait)
                .replace("__LANG__", language)
                .replace("__CONFIG__", _script_json(config))
            )
        return cls(catalogues, documents)

    def render(self, request: web.Request, language: Language) -> str:
        switch = language_switch(request, language, self.catalogues)
        return self.documents[language].replace("__SWITCH__", switch)
