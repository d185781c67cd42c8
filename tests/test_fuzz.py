"""Fuzzing: schemathesis against each service's own OpenAPI document over real processes, and
hypothesis on the webhook parser and the signature code.

Every generated request (schema-valid and schema-violating, authorised or not, signed or not)
must get no 5xx and a response the document describes; a request that is refused (4xx) must
leave every MongoDB collection and every Redis key as it found them (the negative-cache and
rate-limit counters excepted: they exist to remember refusals, and expire).

`make test` runs a bounded budget; `make fuzz` (`pytest --fuzz-scale N`) multiplies it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import MongoClient
from schemathesis import APIOperation, GenerationMode
from schemathesis import Case as GenericCase
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devstack.system import Backends, System, plan, running, wait_ready
from session_api.event_log import SEQ_COUNTER
from shared import keys
from shared.mongo import COUNTERS, EVENTS, ISSUES, SESSIONS
from shared.outbox import OUTBOX, OUTBOX_PENDING
from shared.settings import Settings
from shared.signing import sign_data, verify_data
from tests.helpers import TEST_CHECKSUM_KEY, signed_webhook
from webhook_ingest.errors import BadSignature, InvalidWebhook
from webhook_ingest.payload import parse_webhook

ADMIN_TOKEN = "fuzz-admin-" + secrets.token_hex(8)
CRON_SECRET = "fuzz-cron-" + secrets.token_hex(8)
# Bookkeeping keys that a refused request may create by design, each with a TTL.
REFUSAL_KEYS = (f"{keys.PREFIX}:unknown:", f"{keys.PREFIX}:ratelimit:")
# Examples per operation and generation mode, for `--fuzz-scale 1`.
API_EXAMPLES = 50
OPS_EXAMPLES = 3
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# --- the system under test --------------------------------------------------------------------


@dataclass
class Target:
    """The running system (`devstack.system`) and what the fuzz checks in its stores."""

    system: System
    mongo: MongoClient[dict[str, Any]]
    redis: redis.Redis
    last_records: tuple[dict[str, int], int] = ({}, 0)

    def url(self, port_field: str) -> str:
        return f"http://127.0.0.1:{getattr(self.system.settings, port_field)}"

    def records(self) -> tuple[dict[str, int], int]:
        """Documents per collection, and Redis keys that are records (not refusal counters)."""
        db = self.mongo.get_default_database()
        # session-api's dispatcher moves outbox entries into the event log in the background,
        # whenever it likes: an event counts once, whether in a document's outbox or in the
        # log. The outboxes are read first: the relay appends to the log before it empties an
        # outbox, so an event gone from the outboxes by now is in the log read after.
        queued = {
            json.loads(raw)["id"]
            for name in (SESSIONS, ISSUES)
            for doc in db[name].find({OUTBOX_PENDING: {"$gt": 0}}, {OUTBOX: 1})
            for raw in doc.get(OUTBOX, ())
        }
        docs = {
            name: db[name].count_documents({})
            for name in db.list_collection_names()
            if name not in (EVENTS, COUNTERS)
        }
        docs[EVENTS] = len(queued | {e["_id"] for e in db[EVENTS].find({}, {"_id": 1})})
        # The log's sequence counter is the relay's too (made by its first round).
        docs[COUNTERS] = db[COUNTERS].count_documents({"_id": {"$ne": SEQ_COUNTER}})
        redis_keys = [k.decode() if isinstance(k, bytes) else k for k in self.redis.keys("*")]
        return docs, sum(1 for k in redis_keys if not k.startswith(REFUSAL_KEYS))

    def refusal_keys_expire(self) -> bool:
        """No refusal key is kept for ever. PTTL, not TTL (which says 0 for a key with under
        half a second left); -2 is a key that expired between the scan and the question."""
        return all(
            self.redis.pttl(k) != -1
            for prefix in REFUSAL_KEYS
            for k in self.redis.scan_iter(match=prefix + "*")
        )


@pytest.fixture(scope="module")
def target(servers: Backends) -> Iterator[Target]:
    servers.ensure_running()
    redis.Redis.from_url(servers.redis_url).flushall()
    db = f"fuzz_{secrets.token_hex(6)}"
    base = Settings.from_env(
        {},
        payos_checksum_key=TEST_CHECKSUM_KEY,
        admin_token=ADMIN_TOKEN,
        cron_secret=CRON_SECRET,
        # Valid creations reach PayOS; the per-client limit is test_security's business.
        session_rate_limit_per_minute=0,
        max_pending_per_account=1000,
        sse_max_wait_seconds=1.0,
        log_level="WARNING",
    )
    system = plan(base, servers, database=db, owns_backends=False)
    mongo: MongoClient[dict[str, Any]] = MongoClient(system.settings.mongodb_url)
    r = redis.Redis.from_url(servers.redis_url)
    try:
        with running(system):
            yield Target(system, mongo, r)
    finally:
        mongo.drop_database(db)
        mongo.close()
        r.close()


# --- the fuzzing loop -----------------------------------------------------------------------


@dataclass
class Tally:
    """Requests sent per operation and their outcomes, printed at the end of each test."""

    statuses: dict[str, collections.Counter[int]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    def add(self, label: str, status: int) -> None:
        self.statuses[label][status] += 1

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def report(self, service: str) -> str:
        by_status: collections.Counter[int] = collections.Counter()
        for counter in self.statuses.values():
            by_status.update(counter)
        lines = [
            f"fuzz {service}: {self.total} requests, by status {dict(sorted(by_status.items()))}"
        ]
        for label, counter in sorted(self.statuses.items()):
            lines.append(f"  {label}: {dict(sorted(counter.items()))}")
        return "\n".join(lines)


Case = GenericCase[Any]
Operation = APIOperation[Any, Any, Any, Any]
# (case, salt, negative) -> extra headers; may also edit the case.
Prepare = Callable[[Case, int, bool], dict[str, str]]


def fuzz_service(
    target: Target,
    base_url: str,
    *,
    scale: int,
    prepare: Prepare | None = None,
    weight: int = 1,
) -> Tally:
    """Every operation of the service's served document, in both generation modes."""
    asyncio.run(wait_ready(base_url, 10))
    doc = requests.get(f"{base_url}/openapi.json", timeout=5).json()
    schema = schemathesis.openapi.from_dict(doc)
    tally = Tally()
    http = requests.Session()
    target.last_records = target.records()
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise AssertionError(f"the served document does not load: {result.err()}")
        operation = result.ok()
        has_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
        examples = (OPS_EXAMPLES if operation.path in OPS_PATHS else API_EXAMPLES * weight) * scale
        modes = [GenerationMode.POSITIVE]
        if has_input:
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:
            fuzz_operation(target, base_url, operation, mode, examples, prepare, http, tally)
    assert target.refusal_keys_expire()
    return tally


def fuzz_operation(
    target: Target,
    base_url: str,
    operation: Operation,
    mode: GenerationMode,
    examples: int,
    prepare: Prepare | None,
    http: requests.Session,
    tally: Tally,
) -> None:
    label = f"{operation.label} [{mode.value}]"
    negative = mode is GenerationMode.NEGATIVE
    checks = [*CHECKS, negative_data_rejection] if negative else CHECKS

    @given(case=operation.as_strategy(generation_mode=mode), salt=st.integers(0, 3))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case, salt: int) -> None:
        headers = prepare(case, salt, negative) if prepare is not None else {}
        # Requests run one at a time and nothing else writes: the records after the previous
        # request are the records before this one.
        before = target.last_records
        response = case.call(base_url=base_url, session=http, headers=headers, timeout=10)
        tally.add(label, response.status_code)
        after = target.last_records = target.records()
        # 413 (a negative body grown past the size limit) refuses the data too; schemathesis's
        # list of rejections leaves it out.
        rejected = negative and response.status_code == 413
        case.validate_response(response, checks=CHECKS if rejected else checks, headers=headers)
        if 400 <= response.status_code < 500:
            assert after == before, (
                f"{label} answered {response.status_code} yet changed records: "
                f"{before} -> {after}\n{case.as_curl_command()}"
            )

    run()


def sign_half(case: Case, salt: int, negative: bool) -> dict[str, str]:
    """Sign half of the schema-valid webhooks: the fuzzer then reaches past the signature
    check into storage, with whatever `data` holds. Schema-violating ones stay as generated."""
    body = case.body
    if not negative and salt % 2 == 0 and isinstance(body, dict) and isinstance(body["data"], dict):
        with contextlib.suppress(UnicodeEncodeError):
            body["signature"] = sign_data(body["data"], TEST_CHECKSUM_KEY)
    return {}


def authorise_some(case: Case, salt: int, negative: bool) -> dict[str, str]:
    """Send the right bearer token with a quarter of the admin and cleanup requests, and the
    other service's token with another quarter."""
    path = case.operation.path
    if path in ("/api/webhooks", "/api/stats"):
        token = {0: ADMIN_TOKEN, 1: CRON_SECRET}.get(salt)
    elif path == "/api/webhooks/cleanup":
        token = {0: CRON_SECRET, 1: ADMIN_TOKEN}.get(salt)
    else:
        token = None
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.mark.timeout(3600)
def test_fuzz_webhook_ingest(
    target: Target, fuzz_scale: int, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = fuzz_service(
        # One operation, and the one that moves money: a larger share of the budget.
        target,
        target.url("webhook_ingest_port"),
        scale=fuzz_scale,
        prepare=sign_half,
        weight=4,
    )
    with capsys.disabled():
        print("\n" + tally.report("webhook-ingest"))
    # Half the bodies were signed: the fuzzer got past the signature into storage.
    assert tally.statuses["POST /api/webhooks [positive]"][200] > 0


@pytest.mark.timeout(3600)
def test_fuzz_session_api(
    target: Target, fuzz_scale: int, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = fuzz_service(
        target, target.url("session_api_port"), scale=fuzz_scale, prepare=authorise_some
    )
    with capsys.disabled():
        print("\n" + tally.report("session-api"))
    assert tally.statuses["POST /api/sessions [positive]"][201] > 0
    assert tally.statuses["GET /api/webhooks/cleanup [positive]"][200] > 0


@pytest.mark.timeout(3600)
def test_fuzz_stream_gateway(
    target: Target, fuzz_scale: int, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = fuzz_service(target, target.url("stream_gateway_port"), scale=fuzz_scale)
    with capsys.disabled():
        print("\n" + tally.report("stream-gateway"))


# --- hypothesis on the parser and the signature -----------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
DATA_KEYS = ("orderCode", "amount", "reference", "description", "accountNumber", "code")


def _parse(payload: Any) -> None:
    parse_webhook(json.dumps(payload).encode(), TEST_CHECKSUM_KEY)


@given(payload=JSON)
@settings(database=None, deadline=None)
def test_any_json_value_is_refused_only_with_invalid_or_bad_signature(payload: Any) -> None:
    with pytest.raises((InvalidWebhook, BadSignature)):
        _parse(payload)


@given(
    data=st.dictionaries(st.sampled_from(DATA_KEYS) | st.text(max_size=10), JSON, max_size=8),
    top=st.dictionaries(st.sampled_from(["code", "desc", "success", "signature"]), JSON),
)
@settings(database=None, deadline=None)
def test_webhook_shaped_values_are_refused_only_with_invalid_or_bad_signature(
    data: dict[str, Any], top: dict[str, Any]
) -> None:
    with pytest.raises((InvalidWebhook, BadSignature)):
        _parse({**top, "data": data})


@given(body=st.binary(max_size=256))
@settings(database=None, deadline=None)
def test_any_bytes_are_refused_only_with_invalid_or_bad_signature(body: bytes) -> None:
    with pytest.raises((InvalidWebhook, BadSignature)):
        parse_webhook(body, TEST_CHECKSUM_KEY)


def test_pathological_json_is_invalid_not_a_crash() -> None:
    """Found by fuzzing: these used to escape as ValueError, RecursionError and
    UnicodeEncodeError (a 500)."""
    for body in (
        b'{"data": ' + b"1" * 5000 + b"}",
        b"[" * 100_000 + b"]" * 100_000,
    ):
        with pytest.raises(InvalidWebhook):
            parse_webhook(body, TEST_CHECKSUM_KEY)
    surrogate = b'{"data":{"orderCode":1,"amount":1,"reference":"\\ud800"},"signature":"ab"}'
    with pytest.raises(BadSignature):
        parse_webhook(surrogate, TEST_CHECKSUM_KEY)
    assert not verify_data({"a": "\ud800"}, "00", TEST_CHECKSUM_KEY)


VALID = signed_webhook(123_456, 50_000)


def _signed_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


SCALARS = st.none() | st.booleans() | st.integers() | st.text(max_size=20)


@given(key=st.sampled_from(sorted(VALID["data"])), value=SCALARS)
@settings(database=None, deadline=None)
def test_any_single_changed_field_is_refused(key: str, value: Any) -> None:
    original = VALID["data"][key]
    # Changed as signed: PayOS's scheme renders null as empty and booleans in lower case, so
    # `null` and `""` sign alike (see SECURITY.md).
    if _signed_text(value) == _signed_text(original):
        return
    body = json.loads(json.dumps(VALID))
    body["data"][key] = value
    with pytest.raises((BadSignature, InvalidWebhook)):
        _parse(body)


# What MongoDB can store: 64-bit integers, keys without NUL (anything else is refused 400).
STORABLE = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)


@given(
    extra=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda k: k not in VALID["data"] and "\0" not in k),
        STORABLE,
        min_size=1,
        max_size=5,
    )
)
@settings(database=None, deadline=None)
def test_arbitrary_extra_signed_fields_are_accepted(extra: dict[str, Any]) -> None:
    body = json.loads(json.dumps(VALID))
    body["data"].update(extra)
    try:
        body["signature"] = sign_data(body["data"], TEST_CHECKSUM_KEY)
    except UnicodeEncodeError:
        return  # text PayOS could never sign
    webhook = parse_webhook(json.dumps(body).encode(), TEST_CHECKSUM_KEY)
    assert webhook.data == body["data"]
    assert (webhook.order_code, webhook.amount) == (123_456, 50_000)
