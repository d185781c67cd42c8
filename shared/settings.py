"""One typed, frozen settings object, built from the environment in this module only."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

Environment = Literal["development", "production"]

# Embedded defaults make `make run` work with no configuration; production refuses them.
DEV_PAYOS_CLIENT_ID = "dev-client-id"
DEV_PAYOS_API_KEY = "dev-api-key"
DEV_PAYOS_CHECKSUM_KEY = "dev-checksum-key"
DEV_CRON_SECRET = "dev-cron-secret"
DEV_ADMIN_TOKEN = "dev-admin-token"
_DEV_SECRETS = {
    "payos_client_id": DEV_PAYOS_CLIENT_ID,
    "payos_api_key": DEV_PAYOS_API_KEY,
    "payos_checksum_key": DEV_PAYOS_CHECKSUM_KEY,
    "cron_secret": DEV_CRON_SECRET,
    "admin_token": DEV_ADMIN_TOKEN,
}

SECRETS = tuple(_DEV_SECRETS)
# Secrets a process may use but need not have: empty turns their feature off. With
# SHOP_WEBHOOK_URL unset no event is signed (issue 17), with SHOP_API_TOKEN unset the pull API
# is off; ACCOUNT_LINK_KEY: the shop signs the account it links a shopper to
# (session_api.accounts); without it anyone may claim any account, so production refuses to
# run without it unless told so on purpose. Blank for every process that does not name them.
OPTIONAL_SECRETS = ("shop_webhook_secret", "shop_api_token", "account_link_key")
# An HMAC key shorter than this is a password, not a key (generate 32 random bytes).
MIN_ACCOUNT_LINK_KEY_LENGTH = 16
# The secrets each process uses (issue 15): a process is given only these, requires only
# these, and holds the others blank. The manifests give each workload exactly these keys.
SERVICE_SECRETS: dict[str, tuple[str, ...]] = {
    "webhook-ingest": ("payos_checksum_key",),
    "stream-gateway": (),
    "session-api": SECRETS,
    "session-cleanup": (),
}
# The optional secrets each process may hold (given to it beside SERVICE_SECRETS).
SERVICE_OPTIONAL_SECRETS: dict[str, tuple[str, ...]] = {"session-api": OPTIONAL_SECRETS}
# What a process that names none must have (every caller before issue 15): not empty.
_ALWAYS_REQUIRED = ("payos_checksum_key", "cron_secret", "admin_token")


# A Standard Webhooks secret: `whsec_` and the base64 of the key (24 to 64 bytes, as the
# specification asks).
WEBHOOK_SECRET_PREFIX = "whsec_"
# During a rotation both the new and the old secret sign every delivery; never more.
MAX_WEBHOOK_SECRETS = 2


class SettingsError(ValueError):
    """The environment describes a configuration that cannot run."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of every service; each field maps to the upper-cased environment variable."""

    app_env: Environment = "development"
    log_level: str = "INFO"
    host: str = "127.0.0.1"

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    mongodb_url: str = "mongodb://127.0.0.1:27017/paypush"
    # Short, so a dead MongoDB turns into a 503 (and a PayOS redelivery) quickly.
    mongodb_timeout_ms: int = 2000

    payos_client_id: str = DEV_PAYOS_CLIENT_ID
    payos_api_key: str = DEV_PAYOS_API_KEY
    payos_checksum_key: str = DEV_PAYOS_CHECKSUM_KEY
    payos_base_url: str = "http://127.0.0.1:8089"
    payos_timeout_seconds: float = 10.0
    # Where the simulator delivers webhooks (the real PayOS is told with confirm-webhook).
    payos_webhook_url: str = "http://127.0.0.1:8081/api/webhooks"

    cron_secret: str = DEV_CRON_SECRET
    admin_token: str = DEV_ADMIN_TOKEN
    # The shop's key for signed account links (`/?account=…&token=…`); empty: the page asks
    # for the account and nothing proves it (development).
    account_link_key: str = ""
    # Production without ACCOUNT_LINK_KEY, on purpose (a shop that has no accounts to prove).
    allow_unsigned_accounts: bool = False
    cors_origins: tuple[str, ...] = ("http://127.0.0.1:8083", "http://localhost:8083")

    webhook_ingest_port: int = 8081
    stream_gateway_port: int = 8082
    session_api_port: int = 8083
    payos_simulator_port: int = 8089
    # Health, readiness and metrics on an internal port of their own (0: on the service's
    # port, as in development). The Kubernetes manifests set 9090: no Ingress routes it.
    ops_port: int = 0
    # Where `python -m session_api.cleanup` (a CronJob: nothing scrapes it) pushes its counts
    # (a Prometheus Pushgateway); empty: the counts are only logged.
    pushgateway_url: str = ""
    # The gateway's address as the browser sees it (the deposit page opens its stream there).
    stream_public_url: str = "http://127.0.0.1:8082"
    # The session-api's address as the browser sees it (return/cancel URLs of payment links).
    site_public_url: str = "http://127.0.0.1:8083"

    # The ingest's body limit (PayOS's deliveries), and session-api's: every body there is
    # a few fields of JSON.
    max_body_bytes: int = 64 * 1024
    session_max_body_bytes: int = 16 * 1024
    sse_keepalive_seconds: float = 15.0
    sse_max_wait_seconds: float = 600.0
    sse_retry_ms: int = 3000
    # The gateway holds back CPython's automatic full garbage collection (a pause of every
    # stream that grows with the streams open) and runs one on this schedule instead.
    gc_full_collection_seconds: float = 300.0
    shutdown_timeout_seconds: float = 10.0
    # The listen queue of each service's socket (the kernel caps it at net.core.somaxconn):
    # when a gateway pod goes, thousands of browsers reconnect to the others within seconds.
    listen_backlog: int = 4096
    # Streams one gateway process holds at most (also kept below its open file limit); over
    # it, 503 with Retry-After before any stream starts, so the Ingress tries another pod.
    max_streams: int = 10_000
    max_pending_per_account: int = 5
    # A paid webhook for a session past its expiry counts when the payment was made at most
    # this long after `expiresAt` (PayOS refuses payment after the link's expiry; the grace
    # absorbs clock skew between the bank, PayOS and us). Outside it: a `late` ledger item.
    late_payment_grace_seconds: int = 900
    # A session still pending this long after its creation is asked about at PayOS
    # (`payment_requests.get`), in case its webhook never came.
    reconcile_after_seconds: float = 120.0
    # PayOS calls the reconciler makes per second at most, across the deployment.
    reconcile_max_per_second: float = 5.0
    # How often the reconciler looks for sessions due a check.
    reconcile_interval_seconds: float = 5.0
    # The reconciler's Redis lease: a replica that dies holding it is replaced within this.
    reconcile_lease_seconds: float = 15.0
    # Session creations per client address and minute (0: no limit): a client cannot burn
    # orderCodes and PayOS links in a loop. Behind NAT many users share an address.
    session_rate_limit_per_minute: int = 30
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For is believed: the client is the
    # nearest hop not in this list. Empty: the peer address is the client, the header ignored.
    trusted_proxies: tuple[str, ...] = ()

    # The shop's receivers of signed payment events (issue 17), comma separated; empty:
    # events still accumulate for the pull API. Never one of our own services.
    shop_webhook_url: tuple[str, ...] = ()
    # `whsec_…` secrets, comma separated: the first signs, a second one too during a rotation.
    shop_webhook_secret: tuple[str, ...] = ()
    # Bearer token of `GET /api/events` (the pull API); empty: the pull API answers 404.
    shop_api_token: str = ""
    # One delivery attempt waits this long for a 2xx, then counts as failed and is retried.
    shop_webhook_timeout_seconds: float = 10.0
    # Retries: exponential from the first delay, capped, with jitter, until give-up (3 days).
    shop_webhook_retry_first_seconds: float = 5.0
    shop_webhook_retry_max_seconds: float = 6 * 3600.0
    shop_webhook_give_up_seconds: float = 3 * 86400.0
    # Deliveries in flight at once per receiver URL (each session's events stay in order).
    shop_webhook_concurrency: int = 32
    # How often the dispatcher looks for new events when the last look found none.
    outbox_poll_seconds: float = 0.1
    # The dispatcher's lease (one per deployment): a dead holder is replaced after this long.
    outbox_lease_seconds: float = 10.0
    # Events stay readable by the pull API (and replayable) this long.
    outbox_retention_seconds: int = 7 * 86400

    # The operator console (/admin, issue 13): where session-api scrapes each stream-gateway's
    # Prometheus text for its live counters (open streams, push latency), comma separated;
    # the default is the gateway of `make run`. A gateway that does not answer shows "—".
    gateway_metrics_urls: tuple[str, ...] = ("http://127.0.0.1:8082/metrics",)
    # How long an operator's sign-in lasts (the cookie's signed expiry).
    admin_session_seconds: int = 8 * 3600

    def __post_init__(self) -> None:
        if self.app_env not in ("development", "production"):
            raise SettingsError(f"APP_ENV must be development or production, not {self.app_env!r}")
        for name in ("redis_url", "mongodb_url", "payos_base_url", "payos_webhook_url"):
            url = urlsplit(getattr(self, name))
            if not url.scheme or not url.netloc:
                raise SettingsError(f"{name.upper()} is not a URL: {getattr(self, name)!r}")
        if self.app_env == "production":
            reused = [k.upper() for k, v in _DEV_SECRETS.items() if getattr(self, k) == v]
            if reused:
                raise SettingsError(f"production needs real secrets, set: {', '.join(reused)}")
        if self.account_link_key and len(self.account_link_key) < MIN_ACCOUNT_LINK_KEY_LENGTH:
            raise SettingsError(
                f"ACCOUNT_LINK_KEY must be at least {MIN_ACCOUNT_LINK_KEY_LENGTH} characters "
                "(openssl rand -hex 32)"
            )
        if self.listen_backlog < 1:
            raise SettingsError("LISTEN_BACKLOG must be positive")
        if self.max_streams < 1:
            raise SettingsError("MAX_STREAMS must be positive")
        if self.late_payment_grace_seconds < 0:
            raise SettingsError("LATE_PAYMENT_GRACE_SECONDS must not be negative")
        if self.reconcile_after_seconds < 0:
            raise SettingsError("RECONCILE_AFTER_SECONDS must not be negative")
        if not self.reconcile_max_per_second > 0:
            raise SettingsError("RECONCILE_MAX_PER_SECOND must be positive")
        if not self.reconcile_interval_seconds > 0 or not self.reconcile_lease_seconds > 0:
            raise SettingsError(
                "RECONCILE_INTERVAL_SECONDS and RECONCILE_LEASE_SECONDS must be positive"
            )
        if self.session_rate_limit_per_minute < 0:
            raise SettingsError("SESSION_RATE_LIMIT_PER_MINUTE must not be negative")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(
                    f"TRUSTED_PROXIES: {proxy!r} is not an address or network"
                ) from None
            try:
                ipaddress.ip_network(proxy)
            except ValueError:
                # "10.1.2.3/8": one address mistyped, or a network written loosely? Trusting
                # the whole network without asking would widen who may set the client address.
                raise SettingsError(
                    f"TRUSTED_PROXIES: {proxy!r} has host bits set; write the network "
                    f"({ipaddress.ip_network(proxy, strict=False)}) or one address"
                ) from None

        for url in self.gateway_metrics_urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError(f"GATEWAY_METRICS_URLS: {url!r} is not an http(s) URL")
        if self.admin_session_seconds < 60:
            raise SettingsError("ADMIN_SESSION_SECONDS must be at least 60")

        self._check_shop_webhooks()

    def _check_shop_webhooks(self) -> None:
        if len(self.shop_webhook_secret) > MAX_WEBHOOK_SECRETS:
            raise SettingsError(
                f"SHOP_WEBHOOK_SECRET: at most {MAX_WEBHOOK_SECRETS} secrets (new, old)"
            )
        for secret in self.shop_webhook_secret:
            webhook_secret_bytes(secret)  # raises SettingsError, never echoing the secret
        if self.shop_webhook_url and not self.shop_webhook_secret:
            raise SettingsError("SHOP_WEBHOOK_URL needs SHOP_WEBHOOK_SECRET (whsec_…)")
        ours = self._own_addresses()
        for url in self.shop_webhook_url:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise SettingsError(f"SHOP_WEBHOOK_URL: {url!r} is not an http(s) URL")
            if self.is_production and parts.scheme != "https":
                raise SettingsError(f"SHOP_WEBHOOK_URL: {url!r} must be https in production")
            if _address(url) in ours:
                # Our own services as the "shop": events would loop back into us (a webhook
                # storm against the ingest) or land on an endpoint that means something else.
                raise SettingsError(f"SHOP_WEBHOOK_URL: {url!r} points at one of our services")
        for name in ("shop_webhook_timeout_seconds", "shop_webhook_retry_first_seconds"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()} must be positive")
        if self.shop_webhook_retry_max_seconds < self.shop_webhook_retry_first_seconds:
            raise SettingsError("SHOP_WEBHOOK_RETRY_MAX_SECONDS is below the first delay")
        if self.shop_webhook_concurrency < 1:
            raise SettingsError("SHOP_WEBHOOK_CONCURRENCY must be positive")
        if self.outbox_poll_seconds <= 0 or self.outbox_lease_seconds <= 0:
            raise SettingsError("OUTBOX_POLL_SECONDS and OUTBOX_LEASE_SECONDS must be positive")
        if self.outbox_retention_seconds < 1:
            raise SettingsError("OUTBOX_RETENTION_SECONDS must be positive")

    def _own_addresses(self) -> set[tuple[str, int]]:
        """(host, port) of every address our services answer on, as configured."""
        local = {self.host, "127.0.0.1", "localhost", "0.0.0.0", "::1"}
        ports = [
            self.webhook_ingest_port,
            self.stream_gateway_port,
            self.session_api_port,
            self.payos_simulator_port,
        ]
        if self.ops_port:
            ports.append(self.ops_port)
        ours = {(host, port) for host in local for port in ports}
        for url in (self.site_public_url, self.stream_public_url, self.payos_webhook_url):
            ours.add(_address(url))
        return ours

    @property
    def is_production(self) -> bool:
        return self.app_env == "production"

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        secrets: Iterable[str] | None = None,
        **overrides: object,
    ) -> Settings:
        """Build settings from `environ` (default: the process environment), then `overrides`.

        `secrets`: the secrets this process uses (SERVICE_SECRETS). Those must be set (in
        production: not the development defaults) and not empty; every other secret is held
        blank, whatever the environment says, so a process never holds a key it has no use
        for. None: every secret, as before.
        """
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = env.get(field.name.upper())
            if raw is None:
                continue
            values[field.name] = _parse(field.name, hints[field.name], raw)
        values.update(overrides)
        required: tuple[str, ...] = _ALWAYS_REQUIRED
        given: tuple[str, ...] = ()  # None: every secret, none of them required
        if secrets is not None:
            given = tuple(secrets)
            unknown = set(given) - set(SECRETS) - set(OPTIONAL_SECRETS)
            if unknown:
                raise ValueError(f"not secrets: {sorted(unknown)}")
            required = tuple(name for name in given if name not in OPTIONAL_SECRETS)
            for name in SECRETS:
                if name not in given:
                    values[name] = ""
            for name in OPTIONAL_SECRETS:
                if name not in given:
                    values[name] = () if name == "shop_webhook_secret" else ""
            if "shop_webhook_secret" not in given:
                # A process that cannot sign never delivers: the URL is not its business.
                values["shop_webhook_url"] = ()
        settings = cls(**values)  # type: ignore[arg-type]
        for name in required:
            if not getattr(settings, name):
                raise SettingsError(f"{name.upper()} must not be empty")
        if (
            "account_link_key" in given
            and settings.is_production
            and not settings.account_link_key
            and not settings.allow_unsigned_accounts
        ):
            raise SettingsError(
                "production needs ACCOUNT_LINK_KEY: without it anyone can start deposits for "
                "any account and fill its pending slots; set ALLOW_UNSIGNED_ACCOUNTS=true to "
                "run without it on purpose"
            )
        return settings

    def env(self) -> dict[str, str]:
        """These settings as environment variables, for starting a child process."""
        return {field.name.upper(): _format(getattr(self, field.name)) for field in fields(self)}


# Field types read by calling the type on the text.
_SCALARS: dict[object, Callable[[str], object]] = {int: int, float: float, Path: Path}


def _parse(name: str, hint: object, raw: str) -> object:
    """`raw` as a value of the field's type (its real type, not its annotation's text).

    A type this does not know is a TypeError at the first parse, not a value silently left
    a string; `X | None` takes an empty value as None.
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if raw == "":
            return None
        (hint,) = [arg for arg in args if arg is not type(None)]
    try:
        if hint is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if hint in _SCALARS:
            return _SCALARS[hint](raw)
        if hint is str or typing.get_origin(hint) is Literal:
            # A Literal's values are checked by __post_init__, with a message of its own.
            return raw
        if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        type_name = getattr(hint, "__name__", str(hint))
        raise SettingsError(f"{name.upper()}={raw!r} is not a valid {type_name}") from None
    raise TypeError(f"Settings.{name}: no parser for {hint!r}")


def _format(value: object) -> str:
    """A field's value as `_parse` reads it back."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def webhook_secret_bytes(secret: str) -> bytes:
    """The key of a `whsec_` secret; SettingsError (without the secret) when malformed."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise SettingsError("SHOP_WEBHOOK_SECRET: each secret must start with whsec_")
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise SettingsError("SHOP_WEBHOOK_SECRET: not base64 after whsec_") from None
    if not 24 <= len(key) <= 64:
        raise SettingsError("SHOP_WEBHOOK_SECRET: the key must be 24 to 64 bytes")
    return key


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return (parts.hostname or "", port)


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names `name` itself (rather than leaving it to a default)."""
    return name in (os.environ if environ is None else environ)
