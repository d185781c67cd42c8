"""What the benchmarks share: their own servers, percentiles, and a printed table."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devstack.servers import Process, free_port, mongo_standin, redis_server


@dataclass
class Backends:
    redis: Process
    mongo: Process
    tmp: Path

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def mongodb_url(self, db: str = "bench") -> str:
        return f"mongodb://127.0.0.1:{self.mongo.port}/{db}"


@contextlib.contextmanager
def backends() -> Iterator[Backends]:
    """A redis-server and a MongoDB stand-in of the benchmark's own, on free ports."""
    with tempfile.TemporaryDirectory(prefix="paypush-bench-") as tmp:
        path = Path(tmp)
        redis = redis_server(free_port(), path)
        mongo = mongo_standin(free_port(), path / "mongo", path)
        redis.start()
        mongo.start()
        try:
            yield Backends(redis, mongo, path)
        finally:
            mongo.stop()
            redis.stop()


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(values: Sequence[float]) -> str:
    """p50/p99/max of durations in seconds, printed in milliseconds."""
    if not values:
        return "n/a"
    return (
        f"p50 {percentile(values, 50) * 1000:.2f} ms  p99 {percentile(values, 99) * 1000:.2f} ms"
        f"  max {max(values) * 1000:.2f} ms  mean {statistics.fmean(values) * 1000:.2f} ms"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
