"""OPS_PORT (issue 15): health, readiness and metrics on an internal port that no Ingress
routes, as the Kubernetes manifests run each service; the public port answers 404 for them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from devstack.servers import free_port
from devstack.system import service_process, wait_ready
from shared.settings import Settings


@pytest.mark.parametrize("service", ["webhook-ingest", "stream-gateway", "session-api"])
async def test_ops_endpoints_live_on_the_ops_port_only(
    settings: Settings, tmp_path: Path, service: str
) -> None:
    ops = free_port()
    proc = service_process(settings, service, tmp_path, env={"OPS_PORT": str(ops)})
    port = proc.port
    proc.start()
    await wait_ready(f"http://127.0.0.1:{ops}", 10)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for path in ("/healthz", "/readyz", "/metrics"):
                internal = await http.get(f"http://127.0.0.1:{ops}{path}")
                assert internal.status_code == 200, (path, internal.text)
                public = await http.get(f"http://127.0.0.1:{port}{path}")
                assert public.status_code == 404, path
            metrics = (await http.get(f"http://127.0.0.1:{ops}/metrics")).text
            assert 'paypush_dependency_up{dependency="mongodb"' in metrics or (
                'paypush_dependency_up{dependency="redis"' in metrics
            )
            # The service's own API is on its port, not on the ops port.
            api = await http.get(f"http://127.0.0.1:{port}/openapi.json")
            assert api.status_code == 200
            assert (await http.get(f"http://127.0.0.1:{ops}/openapi.json")).status_code == 404
    finally:
        proc.stop()


def test_a_service_process_of_an_unknown_service_is_refused_by_name(
    settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="no service named 'session_api'"):
        service_process(settings, "session_api", tmp_path)  # the module's name, not the service's
