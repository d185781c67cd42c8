"""The stream-gateways' own figures for the console: open streams and push latency, read
from each gateway's Prometheus `/metrics` (GATEWAY_METRICS_URLS).

Latency quantiles come from the histogram's buckets as Prometheus's `histogram_quantile`
computes them (linear within the bucket the rank falls in). Over a window, not since each
gateway started: every scrape is kept for WINDOW_SECONDS and the quantile is taken over the
growth of the buckets since the oldest one kept (a gateway that restarted starts over); the
first scrape of a gateway is only a starting point, and a window without pushes has no
quantile.
A gateway that does not answer counts for nothing; none answering is None ("—"), never an
error of the console.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

log = structlog.get_logger(__name__)

OPEN_STREAMS = "paypush_stream_open"
DELIVERY = "paypush_stream_delivery_seconds"
WINDOW_SECONDS = 300.0
SCRAPE_TIMEOUT_SECONDS = 1.0
# A bucket: (upper bound `le`, cumulative count), ascending, ending with +Inf.
Buckets = tuple[tuple[float, float], ...]


@dataclass(frozen=True, slots=True)
class Scrape:
    """One gateway's figures at one moment."""

    open_streams: float
    buckets: Buckets


def parse_metrics(text: str) -> Scrape:
    """The figures the console shows, from one gateway's Prometheus text (ValueError if the
    text is not Prometheus's)."""
    streams = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == OPEN_STREAMS:
                streams += sample.value
            elif sample.name == DELIVERY + "_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return Scrape(streams, tuple(sorted(buckets.items())))


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of a cumulative histogram (Prometheus's histogram_quantile); None
    when it holds no observation."""
    if not buckets or not math.isinf(buckets[-1][0]):
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in buckets:
        if cumulative >= rank and cumulative > below:
            if math.isinf(le):
                # Beyond the highest finite bound: that bound is all a histogram can say.
                return lower
            return lower + (le - lower) * (rank - below) / (cumulative - below)
        lower, below = le, cumulative
    return lower


def growth(new: Buckets, old: Buckets) -> Buckets:
    """What the buckets gained from `old` to `new`; `new` itself when the gateway restarted
    in between (a count went down) or its buckets changed."""
    if [le for le, _ in new] != [le for le, _ in old] or any(
        n < o for (_, n), (_, o) in zip(new, old, strict=True)
    ):
        return new
    return tuple((le, n - o) for (le, n), (_, o) in zip(new, old, strict=True))


def merge(parts: Sequence[Buckets]) -> Buckets:
    """Several gateways' buckets as one histogram (the same bounds summed)."""
    summed: dict[float, float] = {}
    for buckets in parts:
        for le, n in buckets:
            summed[le] = summed.get(le, 0.0) + n
    return tuple(sorted(summed.items()))


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """What the console shows of the gateways; None where no gateway answered."""

    open_streams: int | None
    p50_seconds: float | None
    p99_seconds: float | None
    answered: int
    asked: int


class GatewayScraper:
    """Scrapes every gateway and keeps each one's scrapes of the last WINDOW_SECONDS."""

    def __init__(self, http: aiohttp.ClientSession, urls: Sequence[str]) -> None:
        self._http = http
        self._urls = tuple(urls)
        self._history: dict[str, deque[tuple[float, Scrape]]] = {url: deque() for url in urls}

    async def _scrape(self, url: str) -> Scrape | None:
        try:
            timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_SECONDS)
            async with self._http.get(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"status {resp.status}")
                return parse_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.info("gateway_metrics_unavailable", url=url, error=str(exc) or type(exc).__name__)
            return None

    async def figures(self) -> GatewayFigures:
        now = time.monotonic()
        scrapes = await asyncio.gather(*(self._scrape(url) for url in self._urls))
        streams: list[float] = []
        windows: list[Buckets] = []
        for url, scrape in zip(self._urls, scrapes, strict=True):
            history = self._history[url]
            while history and now - history[0][0] > WINDOW_SECONDS:
                history.popleft()
            if scrape is None:
                continue
            history.append((now, scrape))
            streams.append(scrape.open_streams)
            if len(history) > 1:
                windows.append(growth(scrape.buckets, history[0][1].buckets))
        merged = merge(windows)
        return GatewayFigures(
            open_streams=round(sum(streams)) if streams else None,
            p50_seconds=quantile(0.5, merged),
            p99_seconds=quantile(0.99, merged),
            answered=len(streams),
            asked=len(self._urls),
        )
