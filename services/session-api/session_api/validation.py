"""What session-api accepts: the bodies and query arguments it validates, and their bounds.

Hand-written rather than a schema library's: stricter (no coercion, bool is not an integer)
and each refusal says what was wrong. The OpenAPI document takes its bounds from here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from shared.model import is_valid_uuid

from .errors import InvalidRequest

# Amounts in VND. PayOS takes positive integers; 1,000 VND is the smallest transfer most
# Vietnamese banks accept, 10 billion VND far above any deposit this site takes.
MIN_AMOUNT = 1_000
MAX_AMOUNT = 10_000_000_000
# PayOS limits a payment link's description to 25 characters; banks copy it into the
# transfer note, where only unaccented letters, digits and spaces survive every bank.
MAX_DESCRIPTION = 25
DEFAULT_DESCRIPTION = "NAPTIEN"
DESCRIPTION_RE = re.compile(r"^[A-Za-z0-9 ]+$")
# The account to credit, as the shop names its user (the seeds' `123`, `shop.user-42`):
# characters safe in a URL, a log line and a MongoDB `_id`, and `:` excluded because it
# separates the account from the expiry in a signed account link (accounts.py).
ACCOUNT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A signed account link's token is `<expires>.<64 hex digits>` (accounts.py judges it); a
# longer string, or not a string, is not one whether or not the shop signs accounts.
MAX_ACCOUNT_TOKEN = 128
# The admins' list.
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_PAGE = 1_000_000


@dataclass(frozen=True, slots=True)
class CreateRequest:
    account_number: str
    amount: int
    description: str
    uuid: str | None
    # The shop's signature of the account (`accountToken`): AccountLinks judges it (401),
    # and only when the shop has a key.
    account_token: str | None = None


@dataclass(frozen=True, slots=True)
class Paging:
    page: int
    limit: int

    @property
    def skip(self) -> int:
        return (self.page - 1) * self.limit


def validate_account_number(value: object) -> str:
    if not isinstance(value, str) or not ACCOUNT_RE.fullmatch(value):
        raise InvalidRequest("`accountNumber` must be 1 to 64 letters, digits, `.`, `_` or `-`")
    return value


def validate_account_token(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_ACCOUNT_TOKEN:
        raise InvalidRequest(
            f"`accountToken` must be a string of at most {MAX_ACCOUNT_TOKEN} characters"
        )
    return value


def validate_uuid(value: object, name: str = "uuid") -> str:
    if not isinstance(value, str) or not is_valid_uuid(value):
        raise InvalidRequest(f"`{name}` must be a lowercase uuid4")
    return value


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        # ValueError: not UTF-8, not JSON, or an integer of more than 4,300 digits;
        # RecursionError: nesting deeper than the parser's stack.
        raise InvalidRequest("body is not valid JSON") from None


def parse_create_request(body: object) -> CreateRequest:
    """The validated body of `POST /api/sessions`, or InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    account = validate_account_number(body.get("accountNumber"))
    amount = body.get("amount")
    # bool is an int in Python, never in JSON.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise InvalidRequest("`amount` must be an integer number of VND")
    if not MIN_AMOUNT <= amount <= MAX_AMOUNT:
        raise InvalidRequest(f"`amount` must be between {MIN_AMOUNT} and {MAX_AMOUNT} VND")
    description = body.get("description")
    if description is None:
        description = DEFAULT_DESCRIPTION
    elif (
        not isinstance(description, str)
        or not 0 < len(description) <= MAX_DESCRIPTION
        or not DESCRIPTION_RE.fullmatch(description)
    ):
        raise InvalidRequest(
            f"`description` must be 1 to {MAX_DESCRIPTION} unaccented letters, digits or spaces"
        )
    raw_uuid = body.get("uuid")
    uuid = None if raw_uuid is None else validate_uuid(raw_uuid)
    token = validate_account_token(body.get("accountToken"))
    return CreateRequest(account, amount, description, uuid, token)


def _page_arg(query: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an integer") from None
    if not 1 <= value <= maximum:
        raise InvalidRequest(f"`{name}` must be between 1 and {maximum}")
    return value


def parse_paging(query: Mapping[str, str]) -> Paging:
    """`?page=&limit=` of the admins' list (empty or absent: the default), or InvalidRequest."""
    return Paging(
        _page_arg(query, "page", 1, MAX_PAGE),
        _page_arg(query, "limit", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
    )
