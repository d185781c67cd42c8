"""How many streams one gateway process admits: MAX_STREAMS, and never past its file limit."""

from __future__ import annotations

import resource

# File descriptors kept for everything but the streams: Redis and MongoDB connections, the
# listening socket, logs, the Python runtime, probes and scrapes.
FD_RESERVE = 256


def stream_limit(max_streams: int) -> int:
    """MAX_STREAMS, lowered so the process never runs out of file descriptors: past the open
    file limit, `accept` fails with EMFILE and a browser gets no answer at all, where a 503
    with Retry-After sends it (and the Ingress) to another pod."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_streams
    return max(1, min(max_streams, soft - FD_RESERVE))


class Admission:
    """Streams admitted and not yet finished, counted from admission (before the subscribe
    and the status read), so a burst of concurrent connects cannot overshoot the limit."""

    __slots__ = ("active", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_enter(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
