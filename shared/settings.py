"""One typed, frozen settings object, built from the environment in this module only."""

from __future__ import annotations

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

# Secrets without a development value: empty turns their feature off. ACCOUNT_LINK_KEY: the
# shop signs the account it links a shopper to (session_api.accounts); without it, anyone may
# claim any account, so production refuses to run without it unless told so on purpose.
_OPTIONAL_SECRETS = ("account_link_key",)
SECRETS = (*_DEV_SECRETS, *_OPTIONAL_SECRETS)
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
# What a process that names none must have (every caller before issue 15): not empty.
_ALWAYS_REQUIRED = ("payos_checksum_key", "cron_secret", "admin_token")


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
    shutdown_timeout_seconds: float = 10.0
    # The listen queue of each service's socket (the kernel caps it at net.core.somaxconn):
    # when a gateway pod goes, thousands of browsers reconnect to the others within seconds.
    listen_backlog: int = 4096
    # Streams one gateway process holds at most (also kept below its open file limit); over
    # it, 503 with Retry-After before any stream starts, so the Ingress tries another pod.
    max_streams: int = 10_000
    max_pending_per_account: int = 5
    # Session creations per client address and minute (0: no limit): a client cannot burn
    # orderCodes and PayOS links in a loop. Behind NAT many users share an address.
    session_rate_limit_per_minute: int = 30
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For is believed: the client is the
    # nearest hop not in this list. Empty: the peer address is the client, the header ignored.
    trusted_proxies: tuple[str, ...] = ()

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
        if secrets is not None:
            required = tuple(secrets)
            unknown = set(required) - set(SECRETS)
            if unknown:
                raise ValueError(f"not secrets: {sorted(unknown)}")
            for name in SECRETS:
                if name not in required:
                    values[name] = ""
        settings = cls(**values)  # type: ignore[arg-type]
        for name in required:
            if name not in _OPTIONAL_SECRETS and not getattr(settings, name):
                raise SettingsError(f"{name.upper()} must not be empty")
        if (
            "account_link_key" in required
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


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names `name` itself (rather than leaving it to a default)."""
    return name in (os.environ if environ is None else environ)
