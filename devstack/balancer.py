"""Debian's nginx with the deploy configuration, in front of local replicas.

`deploy/nginx/nginx.conf` is the one source of truth: `local_nginx_conf` only points its
upstreams at local ports, its listener at a free port and its logs into a directory; every
routing and SSE setting is the deployed one.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from .servers import Process, http_ok

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
# The upstream blocks of the deploy configuration, one per service.
UPSTREAMS = ("webhook_ingest", "stream_gateway", "session_api")
HEALTH_PATH = "/nginx-health"


def find_nginx() -> str | None:
    """Debian installs nginx in /usr/sbin, which is not on every PATH."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
    )


def _block_span(text: str, header: str) -> tuple[int, int]:
    """Start and end of the body of `header { … }` (balanced braces)."""
    match = re.search(rf"{re.escape(header)}\s*\{{", text)
    if match is None:
        raise ValueError(f"no block {header!r} in the nginx configuration")
    depth = 1
    for i in range(match.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return match.end(), i
    raise ValueError(f"unbalanced block {header!r}")


def local_nginx_conf(
    upstreams: Mapping[str, Sequence[int]],
    listen_port: int,
    log_dir: Path,
    *,
    text: str | None = None,
) -> str:
    """The deploy configuration for local replicas.

    `upstreams` maps each upstream block (`UPSTREAMS`) to the ports of its replicas on
    127.0.0.1; the `server` lines of that block become those, every other directive of the
    block (keepalive) stays. The listener moves to 127.0.0.1:`listen_port` and the logs to
    `log_dir`. `text` is the configuration to rewrite (default: the deploy file).
    """
    conf = NGINX_CONF.read_text() if text is None else text
    missing = set(UPSTREAMS) - set(upstreams)
    if missing:
        raise ValueError(f"no ports for upstreams {sorted(missing)}")
    for name, ports in upstreams.items():
        if not ports:
            raise ValueError(f"upstream {name} needs at least one port")
        start, end = _block_span(conf, f"upstream {name}")
        body = re.sub(r"^[ \t]*server\s+[^;]+;[ \t]*\n", "", conf[start:end], flags=re.M)
        servers = "".join(f"\n        server 127.0.0.1:{port};" for port in ports)
        conf = conf[:start] + servers + body + conf[end:]
    conf, listens = re.subn(
        r"^(\s*)listen\s+\d+\s*;", rf"\g<1>listen 127.0.0.1:{listen_port};", conf, flags=re.M
    )
    if listens != 1:
        raise ValueError(f"expected one `listen` directive, found {listens}")
    conf = re.sub(r"\berror_log\s+/dev/stderr\b", f"error_log {log_dir / 'error.log'}", conf)
    conf = re.sub(r"\baccess_log\s+/dev/stdout\b", f"access_log {log_dir / 'access.log'}", conf)
    return conf


def nginx_globals(prefix: Path) -> str:
    """The `-g` directives of a local run: in the foreground, its pid file under `prefix`.

    Started as root, nginx's workers would drop to `nobody`, which cannot reach a private
    temporary directory: they keep the current user instead.
    """
    directives = f"daemon off; pid {prefix / 'nginx.pid'};"
    if os.geteuid() == 0:
        directives += f" user {pwd.getpwuid(os.geteuid()).pw_name};"
    return directives


def nginx_argv(nginx: str, prefix: Path, conf: Path, *, test: bool = False) -> list[str]:
    return [
        nginx,
        *(["-t"] if test else []),
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-g",
        nginx_globals(prefix),
    ]


def nginx_process(
    upstreams: Mapping[str, Sequence[int]], listen_port: int, prefix: Path
) -> Process:
    """nginx as a child process (Ctrl-C or `stop` ends it), its files all under `prefix`."""
    nginx = find_nginx()
    if nginx is None:
        raise RuntimeError("nginx is missing: run `make setup` (installs Debian's nginx)")
    prefix = prefix.resolve()  # nginx reads -c and the log paths relative to -p
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(local_nginx_conf(upstreams, listen_port, prefix))
    return Process(
        "nginx",
        nginx_argv(nginx, prefix, conf),
        port=listen_port,
        log_dir=prefix,
        ready=lambda: http_ok(f"http://127.0.0.1:{listen_port}{HEALTH_PATH}"),
    )
