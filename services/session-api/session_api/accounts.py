"""Accounts proven by the shop: signed account links.

The shop's backend knows who its user is; the deposit page does not. With ACCOUNT_LINK_KEY
set, the shop links its user to `/?account=<account>&token=<expires>.<signature>`, where
`signature` is the hex HMAC-SHA256, keyed with ACCOUNT_LINK_KEY, of `<account>:<expires>`
(`expires`: Unix seconds, at most an hour ahead). The page sends the token with the account
(`accountToken`), and session-api accepts an account only with a genuine token that has not
expired. The `:` cannot occur in an account, so no two (account, expires) pairs sign the same
text. Without the key (development) any account is taken as given.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from .errors import AccountLinkRejected

# `<expires>.<64 lowercase hex digits>`: what hexdigest() and Node's digest("hex") print.
TOKEN_RE = re.compile(r"^([0-9]{1,12})\.([0-9a-f]{64})$")
# A link is a moment's permission, not a credential: the shop signs a fresh one per visit.
MAX_LINK_SECONDS = 3600
# The shop's clock and ours may disagree by this much.
CLOCK_SKEW_SECONDS = 60

Reason = Literal["missing", "malformed", "bad_signature", "expired", "too_far"]


def link_signature(key: str, account: str, expires: int) -> str:
    """The hex HMAC-SHA256 the shop signs an account link with."""
    message = f"{account}:{expires}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sign_account_link(key: str, account: str, expires: int) -> str:
    """The `token` of an account link (what the shop's backend computes; tests, devstack)."""
    return f"{expires}.{link_signature(key, account, expires)}"


@dataclass(frozen=True, slots=True)
class AccountLinks:
    """Checks the shop's signature on an account, when the shop has a key."""

    key: str
    clock: Callable[[], float] = field(default=time.time)

    @property
    def required(self) -> bool:
        return bool(self.key)

    def verify(self, account: str, token: str | None) -> None:
        """Accept `account` with `token`, or raise AccountLinkRejected (401)."""
        if not self.key:
            return
        if token is None or token == "":
            raise AccountLinkRejected(
                "missing",
                "`accountToken` is required: accounts come from the shop's signed link "
                "(/?account=…&token=…)",
            )
        match = TOKEN_RE.fullmatch(token)
        if match is None:
            raise AccountLinkRejected(
                "malformed", "`accountToken` must be `<expires>.<64 hex digits>`"
            )
        expires = int(match.group(1))
        expected = link_signature(self.key, account, expires)
        if not hmac.compare_digest(expected, match.group(2)):
            raise AccountLinkRejected(
                "bad_signature", "the account link's signature does not match this account"
            )
        now = self.clock()
        if expires <= now:
            when = datetime.fromtimestamp(expires, UTC).isoformat().replace("+00:00", "Z")
            raise AccountLinkRejected(
                "expired", f"the account link expired at {when}; the shop must sign a new one"
            )
        if expires > now + MAX_LINK_SECONDS + CLOCK_SKEW_SECONDS:
            raise AccountLinkRejected(
                "too_far", "the account link expires more than 1 h ahead; links last 1 h at most"
            )
