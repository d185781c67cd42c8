"""OPS_PORT (issue 15): health, readiness and metrics on an internal port that no Ingress
routes, as the Kubernetes manifests run each service; the public port answers 404 for them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from devstack.servers import free_port, python_service
from devstack.system import wait_ready
from shared.settings import Settings

SERVICES = (
    ("webhook_ingest", "webhook_ingest_port"),
    ("stream_gateway", "stream_gateway_port"),
    ("session_api", "session_api_port"),
)


@pytest.mark.parametrize(("module", "port_field"), SERVICES)
async def test_ops_endpoints_live_on_the_ops_port_only(
    settings: Settings, tmp_path: Path, module: str, port_field: str
) -> None:
    port, ops = free_port(), free_port()
    env = {**settings.env(), port_field.upper(): str(port), "OPS_PORT": str(ops)}
    proc = python_service(module, module, port, env, tmp_path)
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
