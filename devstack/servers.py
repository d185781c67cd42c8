"""Start and stop the pieces of the system as local processes (for `make run` and the tests)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not become ready within {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class Process:
    """A child process with a log file, started and stopped on demand, restartable."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int,
        log_dir: Path,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self._ready = ready or (lambda: port_open(port))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
        )
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}"
                )
            return self._ready()

        wait_until(ready, self.start_timeout, self.name)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # The port is free again only once the process is gone.
        wait_until(lambda: not port_open(self.port), 5, f"{self.name} port release")

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


class StopFlag:
    """Set from a signal handler, waited on by the main thread.

    Not a `threading.Event`: a handler runs in the main thread between two bytecodes, which
    can be inside the interrupted `Event.wait` while it holds the event's lock again, and
    `Event.set` then waits on that lock forever (seen once: SIGTERM hung `make run`).
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def wait(self, timeout: float) -> bool:
        """True once set; otherwise after `timeout` seconds (the sleep resumes after a
        handler, so a stop is seen within `timeout`)."""
        if not self._set:
            time.sleep(timeout)
        return self._set


def stop_on_sigterm() -> StopFlag:
    """A flag SIGTERM sets, for `serve_until_stopped`."""
    stop = StopFlag()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def serve_until_stopped(
    stop: StopFlag,
    start: Callable[[], None],
    all_up: Callable[[], Sequence[str]],
    dead: Callable[[], Sequence[Process]],
    stop_all: Callable[[], None],
) -> int:
    """Start, print the `all up` lines, then run until Ctrl-C, `stop` or a process exits.

    Whatever happens, `stop_all()` runs last. Returns the exit code: 1 if it could not start
    or a process exited, 0 otherwise.
    """
    try:
        start()
        print("\nall up:")
        for line in all_up():
            print(line)
        print("Ctrl-C stops everything.", flush=True)
        while not stop.wait(0.5):
            exited = dead()
            if exited:
                print(f"{exited[0].name} exited; see {exited[0].log_path}. Stopping.")
                return 1
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as exc:
        print(f"could not start: {exc}")
        return 1
    finally:
        print("\nstopping…", flush=True)
        stop_all()
    return 0


def redis_server(
    port: int, log_dir: Path, *, name: str = "redis", extra_args: Sequence[str] = ()
) -> Process:
    """Our own redis-server: nothing persisted, so a restart loses every key (the hard case)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is missing: run `make setup` (installs Debian's redis-server)"
        )
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--dir",
        str(log_dir),
        "--maxclients",
        "20000",
        *extra_args,
    ]
    return Process(name, argv, port=port, log_dir=log_dir)


def mongo_standin(port: int, data_dir: Path, log_dir: Path) -> Process:
    """The MongoDB wire-protocol stand-in (nx-27017), its data in files that survive restarts.

    Given a directory, it keeps one file per database, as MongoDB keeps databases apart;
    given a file, every database name would share one set of collections (a test's
    `drop_database` emptying every other test's, a late write leaking into the next test).
    """
    databases = data_dir / "databases"
    databases.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "nx_27017.nx_27017",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--db",
        str(databases),
        "--pid-file",
        str(data_dir / "nx.pid"),
        "--log-file",
        str(log_dir / "mongo-internal.log"),
    ]
    return Process("mongo", argv, port=port, log_dir=log_dir)


def python_service(
    name: str, module: str, port: int, env: dict[str, str], log_dir: Path
) -> Process:
    """A service (`python -m module`) that is ready once its /healthz answers (on OPS_PORT
    when the environment gives one: the service port then answers 404 for it)."""
    probe_port = int(env.get("OPS_PORT") or 0) or port
    return Process(
        name,
        [sys.executable, "-m", module],
        port=port,
        env=env,
        log_dir=log_dir,
        ready=lambda: http_ok(f"http://127.0.0.1:{probe_port}/healthz"),
    )


def _redis_cli() -> str:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise RuntimeError("redis-cli is missing: run `make setup` (Debian's redis-tools)")
    return cli


class LocalRedisCluster:
    """A Redis Cluster of `primaries` local redis-servers (no replicas), on free ports.

    Each node runs with `cluster-enabled`; `redis-cli --cluster create` spreads the 16384
    slots over them. Nothing is persisted: a new start is a new, empty cluster; `restart`
    (or `kill`, then `revive`) brings the same cluster back (ids, slots), empty.
    """

    def __init__(self, log_dir: Path, *, primaries: int = 3) -> None:
        # Absolute: redis-server reads the cluster config file relative to its --dir.
        self.dir = log_dir.resolve()
        self.nodes = [
            redis_server(
                port,
                self.dir,
                name=f"redis-cluster-{port}",
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(self.dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    # Not port + 10000 (the default), which may be taken or above 65535.
                    "--cluster-port",
                    str(free_port()),
                ],
            )
            for port in (free_port() for _ in range(primaries))
        ]

    @property
    def url(self) -> str:
        """A `REDIS_URL` for the cluster (any node: the client discovers the others)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, timeout: float = 20.0) -> None:
        cli = _redis_cli()
        self.dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.dir / f"nodes-{node.port}.conf").unlink(missing_ok=True)
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every node reports `cluster_state:ok` (every slot served)."""
        cli = _redis_cli()

        def every_node_ok() -> bool:
            for node in self.nodes:
                info = subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
                if "cluster_state:ok" not in info:
                    return False
            return True

        wait_until(every_node_ok, timeout, "redis cluster")

    def kill(self) -> None:
        """kill -9 every node: the whole cluster is gone (its `nodes-*.conf` files stay)."""
        for node in self.nodes:
            node.kill()

    def revive(self, timeout: float = 20.0) -> None:
        """Start every node again and wait until the cluster is `ok`.

        Each node reads its `nodes-*.conf` (its id, its slots, its peers), so the same
        cluster comes back, but empty: nothing is persisted.
        """
        for node in self.nodes:
            node.start()
        self.wait_ok(timeout)

    def restart(self, down_seconds: float = 0.0, timeout: float = 20.0) -> None:
        """kill -9 every node, leave the cluster down `down_seconds`, bring it back empty."""
        self.kill()
        time.sleep(down_seconds)
        self.revive(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
