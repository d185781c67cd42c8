"""`make mutate`: run each module's tests against each of its mutants, print a table per module.

Why an own runner rather than mutmut: mutmut 3 does not follow this package-dir layout, and
mutmut 2.5 rewrites the source files in place (a crash or a Ctrl-C leaves a mutant in the
checkout), knows nothing of Lua inside Python strings (it would only garble the whole script),
and numbers its mutants by position, so a list of equivalent mutants would go stale with every
edit. Here each mutant is imported from memory in a forked child (a meta-path finder serves
the mutated source under the module's import name): the checkout is never written to, the
parent has imported pytest and the heavy libraries once (a child starts in ~1 s instead of
~5 s). Each child starts the suite's own servers, as `make test` does.

Per mutant: `pytest -x` on the module's test selection, killed when it fails or errors, killed
by timeout when it runs 5 times longer than the unmutated run (at least 20 s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from pytest import hookimpl as pytest_hookimpl

from tests.mutation.mutants import ROOT, Config, ModuleConfig, Mutant, load_config, module_mutants

# Imported once by the parent so that each forked child starts warm. No project module may be
# among them (nor import one): the child must import the mutated module itself.
_WARM = (
    "pytest",
    "_pytest.pytester",
    "aiohttp",
    "aiohttp.test_utils",
    "aiohttp.web",
    "redis",
    "redis.asyncio",
    "pymongo",
    "bson",
    "payos",
    "payos._crypto.provider",
    "structlog",
    "hypothesis",
    "hypothesis.stateful",
    "hypothesis.strategies",
    "schemathesis",
    # pytest's plugins (entry points): imported here, not in every child.
    "pytest_asyncio.plugin",
    "pytest_aiohttp.plugin",
    "pytest_timeout",
    "anyio.pytest_plugin",
    "anyio._backends._asyncio",
    "_hypothesis_pytestplugin",
    "schemathesis.pytest.plugin",
    "httpx",
    "httpx_sse",
    "prometheus_client",
    "segno",
)
_PROJECT = ("shared", "webhook_ingest", "stream_gateway", "session_api", "devstack", "bench")


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `name` from `source` (the mutant) instead of the file on disk."""

    def __init__(self, name: str, path: Path, source: bytes) -> None:
        self.name, self.path, self.source = name, path, source

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(compile(self.source, str(self.path), "exec"), module.__dict__)


class _Plugin:
    """A pytest plugin for one child: runs only the tests that reach the mutant (`only`; None:
    all), first those that killed most mutants so far (with `-x`, a mutant most tests kill
    costs one test instead of the whole selection), and notes the first test that failed."""

    def __init__(self, out: Path, kills: Counter[str], only: frozenset[str] | None) -> None:
        self.out = out
        self.kills = kills
        self.only = only

    def pytest_collection_modifyitems(self, config: Any, items: list[Any]) -> None:
        if self.only is not None:
            dropped = [item for item in items if item.nodeid not in self.only]
            items[:] = [item for item in items if item.nodeid in self.only]
            config.hook.pytest_deselected(items=dropped)
        items.sort(key=lambda item: -self.kills[item.nodeid])

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed and not self.out.exists():
            self.out.write_text(report.nodeid)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed and not self.out.exists():
            self.out.write_text(f"collection of {report.nodeid}")


class _LineTracer:
    """The unmutated run's coverage of the module, per test: which lines each test runs
    (`""`: run at import). A mutant then runs only the tests that reach it."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.current = ""
        self.lines: dict[str, set[int]] = {}

    def start(self) -> None:
        sys.settrace(self._call)
        threading.settrace(self._call)

    def _call(self, frame: FrameType, event: str, arg: object) -> Any:
        if frame.f_code.co_filename != self.filename:
            return None
        self.lines.setdefault(self.current, set()).add(frame.f_lineno)
        return self._line

    def _line(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            self.lines.setdefault(self.current, set()).add(frame.f_lineno)
        return self._line

    @pytest_hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: Any) -> Generator[None]:
        self.current = item.nodeid
        yield
        self.current = ""

    def pytest_unconfigure(self) -> None:
        sys.settrace(None)
        threading.settrace(None)


@dataclass
class Outcome:
    status: str  # "killed", "timeout", "survived"
    seconds: float
    by: str  # the test that killed it


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (servers are started in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_tests(
    cfg: ModuleConfig,
    mutant: Mutant | None,
    source: bytes,
    timeout: float,
    log: Path,
    kills: Counter[str] | None = None,
    only: frozenset[str] | None = None,
    trace_to: Path | None = None,
) -> Outcome:
    """Fork; the child imports `mutant` applied to `source` (or the original: then with
    `trace_to`, where it writes which lines each test ran) and runs pytest."""
    by_file = log.with_suffix(".by")
    by_file.unlink(missing_ok=True)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            os.setpgid(0, 0)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            text = mutant.apply(source) if mutant is not None else source
            sys.meta_path.insert(0, _MutantFinder(cfg.module, cfg.path, text))
            plugins: list[object] = [_Plugin(by_file, kills or Counter(), only)]
            tracer = _LineTracer(str(cfg.path)) if trace_to is not None else None
            if tracer is not None:
                plugins.append(tracer)
                tracer.start()
            import hypothesis
            import pytest

            # Deterministic runs, and no example database written from mutants.
            hypothesis.settings.register_profile(
                "mutate", database=None, derandomize=True, deadline=None
            )
            hypothesis.settings.load_profile("mutate")
            # The parent imported pytest's plugins before pytest could mark them for rewriting.
            warm = "ignore::pytest.PytestAssertRewriteWarning"
            args = [*cfg.tests, *cfg.args, "-x", "-q", "-p", "no:cacheprovider", "-W", warm]
            code = int(pytest.main(args, plugins=plugins))
            if tracer is not None and trace_to is not None:
                lines = {test: sorted(seen) for test, seen in tracer.lines.items()}
                trace_to.write_text(json.dumps(lines))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    deadline = start + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                _kill_all(pid)
                return Outcome("timeout", time.monotonic() - start, "timeout")
            time.sleep(0.02)
    except BaseException:
        _kill_all(pid)  # stopped: the child and the servers it started go too
        raise
    # Servers a killed or crashed test left behind.
    for proc in _descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(proc, signal.SIGKILL)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    by = by_file.read_text() if by_file.exists() else f"exit {code}"
    return Outcome("survived" if code == 0 else "killed", seconds, by)


def _kill_all(pid: int) -> None:
    for proc in [*_descendants(pid), pid]:
        with contextlib.suppress(OSError):
            os.kill(proc, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@dataclass
class Row:
    name: str
    generated: int = 0
    killed: int = 0
    survived: int = 0
    equivalent: int = 0
    seconds: float = 0.0

    @property
    def percent(self) -> float:
        live = self.killed + self.survived
        return 100.0 * self.killed / live if live else 100.0


def _forget_project_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _PROJECT:
            del sys.modules[name]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make mutate", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="module names from modules.toml (all if none)")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument(
        "--only",
        action="append",
        help="run only the mutants whose key contains this text (repeatable)",
    )
    parser.add_argument("--show", help="print the mutated source lines of a mutant key")
    args = parser.parse_args(argv)

    config = load_config()
    chosen = [m for m in config.modules if not args.modules or m.name in args.modules]
    unknown = set(args.modules) - {m.name for m in config.modules}
    if unknown:
        parser.error(f"unknown module(s): {', '.join(sorted(unknown))}")
    equivalents = {(e.module, e.mutant): e for e in config.equivalents}
    plans = []
    stale = []
    for cfg in chosen:
        source, mutants = module_mutants(cfg, config)
        keys = {m.key for m in mutants}
        stale += [k for (mod, k) in equivalents if mod == cfg.name and k not in keys]
        plans.append((cfg, source, mutants))
    if stale:
        print("equivalent.toml names mutants that no longer exist (update it):")
        for key in stale:
            print(f"  {key}")
        return 2
    if args.list or args.show:
        for cfg, source, mutants in plans:
            for m in mutants:
                if args.show and args.show != m.key:
                    continue
                tag = " [equivalent]" if (cfg.name, m.key) in equivalents else ""
                print(f"{cfg.name} L{m.line} {m.key}{tag}")
                if args.show:
                    print(_diff(source, m))
        return 0
    return _run(plans, equivalents, config, args.only)


def _diff(source: bytes, mutant: Mutant) -> str:
    before = source.decode().splitlines()
    after = mutant.apply(source).decode().splitlines()
    first = source[: mutant.start].count(b"\n")
    span = source[mutant.start : mutant.end].count(b"\n") + 1
    new_span = span + len(after) - len(before)
    minus = [f"- {line}" for line in before[first : first + span]]
    plus = [f"+ {line}" for line in after[first : first + new_span]]
    return "\n".join(minus + plus)


def _run(
    plans: list[tuple[ModuleConfig, bytes, list[Mutant]]],
    equivalents: dict[tuple[str, str], Any],
    config: Config,
    only: list[str] | None,
) -> int:
    os.chdir(ROOT)
    total_start = time.monotonic()
    for name in _WARM:
        __import__(name)
    tmp = Path(tempfile.mkdtemp(prefix="mutate-"))
    _forget_project_modules()
    # What the parent holds stays out of each child's collections (pytest collects ~3 times).
    gc.collect()
    gc.freeze()
    os.environ.pop("MONGODB_URL", None)
    rows: list[Row] = []
    survivors: list[tuple[ModuleConfig, bytes, Mutant]] = []
    # Stopped early (Ctrl-C, SIGTERM): the table of what ran so far is still printed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        _run_modules(plans, equivalents, only, tmp, rows, survivors)
    except KeyboardInterrupt:
        print("\nstopped early: the last row counts only the mutants run so far")
    total = time.monotonic() - total_start
    _table(rows, total)
    if survivors:
        print("\nSurvivors (a test should kill each, or equivalent.toml says why it cannot):")
        for cfg, source, m in survivors:
            print(f"\n[{cfg.name}] {m.key}\n{_diff(source, m)}")
    return 0 if rows and all(r.percent >= 90.0 for r in rows) else 1


def _run_modules(
    plans: list[tuple[ModuleConfig, bytes, list[Mutant]]],
    equivalents: dict[tuple[str, str], Any],
    only: list[str] | None,
    tmp: Path,
    rows: list[Row],
    survivors: list[tuple[ModuleConfig, bytes, Mutant]],
) -> None:
    for cfg, source, mutants in plans:
        row = Row(cfg.name, generated=len(mutants))
        rows.append(row)
        module_start = time.monotonic()
        log = tmp / f"{cfg.name}.log"
        trace = tmp / f"{cfg.name}-lines.json"
        base = run_tests(cfg, None, source, 900, log, trace_to=trace)
        if base.status != "survived":
            raise SystemExit(
                f"{cfg.name}: the tests fail without any mutant ({base.by}); see {log}"
            )
        coverage = {test: set(lines) for test, lines in json.loads(trace.read_text()).items()}
        timeout = max(20.0, 5 * base.seconds)
        print(f"== {cfg.name}: {len(mutants)} mutants, tests {base.seconds:.1f} s unmutated")
        kills: Counter[str] = Counter()
        for i, m in enumerate(mutants, 1):
            if (cfg.name, m.key) in equivalents:
                row.equivalent += 1
                continue
            if only and not any(text in m.key for text in only):
                continue
            reach = _tests_reaching(m, coverage)
            if reach is not None and not reach:
                row.survived += 1
                survivors.append((cfg, source, m))
                print(f"  SURVIVED L{m.line} {m.key} (no test runs this line)", flush=True)
                continue
            out = run_tests(cfg, m, source, timeout, tmp / f"{cfg.name}-{i}.log", kills, reach)
            if out.status == "survived":
                row.survived += 1
                survivors.append((cfg, source, m))
                print(f"  SURVIVED L{m.line} {m.key}", flush=True)
            else:
                row.killed += 1
                kills[out.by] += 1
                (tmp / f"{cfg.name}-{i}.log").unlink(missing_ok=True)
            row.seconds = time.monotonic() - module_start
            if i % 25 == 0:
                elapsed = row.seconds
                print(f"  ... {i}/{len(mutants)} in {elapsed:.0f} s", flush=True)
        row.seconds = time.monotonic() - module_start
        print(f"   {row.name}: {row.percent:.1f} % killed in {row.seconds:.0f} s", flush=True)


def _tests_reaching(mutant: Mutant, coverage: dict[str, set[int]]) -> frozenset[str] | None:
    """The tests whose unmutated run ran the mutated lines; None (every test) for what runs
    at import (module constants, signatures, the Lua scripts): it shapes what every test runs."""
    first, last = mutant.lines
    span = set(range(first, last + 1))
    if first <= 0 or span & coverage.get("", set()):
        return None
    return frozenset(test for test, lines in coverage.items() if test and lines & span)


def _table(rows: list[Row], total: float) -> None:
    head = f"{'module':<10} {'generated':>9} {'killed':>7} {'survived':>8} {'equivalent':>10}"
    head += f" {'% killed':>8} {'time':>7}"
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.name:<10} {r.generated:>9} {r.killed:>7} {r.survived:>8} {r.equivalent:>10}"
            f" {r.percent:>7.1f}% {r.seconds:>6.0f}s"
        )
    all_ = Row(
        "total",
        sum(r.generated for r in rows),
        sum(r.killed for r in rows),
        sum(r.survived for r in rows),
        sum(r.equivalent for r in rows),
    )
    print("-" * len(head))
    print(
        f"{'total':<10} {all_.generated:>9} {all_.killed:>7} {all_.survived:>8}"
        f" {all_.equivalent:>10} {all_.percent:>7.1f}% {total:>6.0f}s"
    )
    print(f"total time {total / 60:.1f} min (% killed: of the mutants not judged equivalent)")
