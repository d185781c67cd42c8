"""devstack: `make run` and `make replicas` stop on SIGTERM (a container's or a supervisor's
stop), stopping every process they started."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

# What `python -m devstack` does around its processes, with nothing to start.
PROGRAM = """
from devstack.servers import serve_until_stopped, stop_on_sigterm
stop = stop_on_sigterm()
code = serve_until_stopped(
    stop, lambda: None, lambda: [], lambda: [], lambda: print("stopped all", flush=True)
)
raise SystemExit(code)
"""


@pytest.mark.parametrize("after", [0.05, 0.3, 0.55])
def test_sigterm_stops_the_system_and_every_process_in_it(after: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert proc.stdout is not None
        while "Ctrl-C stops everything." not in proc.stdout.readline():
            pass
        # At different moments of the loop's half-second wait.
        time.sleep(after)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert (proc.returncode, "stopped all" in out) == (0, True)
