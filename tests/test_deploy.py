"""deploy/, checked offline: schemas, routes, ports and variables against the one source of truth.

The source of truth is `shared.settings.Settings` (every variable is a field's upper-cased name,
every port a field's default) and each service's own `create_app` (every routed path and probe
is one of its routes). Nothing here needs Docker, a cluster or the network.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import importlib.util
import ipaddress
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import (  # type: ignore[import-untyped]
    SchemaNotFoundError,
    validate,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry

from devstack.balancer import UPSTREAMS, find_nginx, local_nginx_conf, nginx_argv
from devstack.servers import free_port
from shared.openapi import OPENAPI_PATH
from shared.settings import SECRETS, SERVICE_OPTIONAL_SECRETS, SERVICE_SECRETS, Settings
from stream_gateway.metrics import GatewayMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
SECRET_TEMPLATE = "secret.template.yaml"
# The oldest Kubernetes still in common support; its schemas ship with kubernetes-validate.
K8S_VERSION = "1.30.0"
SERVICE_MODULES = ("webhook_ingest", "stream_gateway", "session_api")

SETTING_NAMES = frozenset(f.name.upper() for f in fields(Settings))
DEFAULTS = Settings()

Doc = dict[str, Any]


# --- loading ---------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


CONFIG_ENV = K8S / "config.env"
CONFIG_NAME = "payment-push-config"


def config_env() -> dict[str, str]:
    """config.env as kustomize reads it (`KEY=VALUE` lines; `#` comments)."""
    data = {}
    for line in CONFIG_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            data[key.strip()] = value
    return data


def manifests() -> list[tuple[str, Doc]]:
    """Every manifest, and the ConfigMap that kustomization.yaml generates from config.env."""
    generated = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_NAME, "labels": {"app.kubernetes.io/part-of": "payment-push"}},
        "data": config_env(),
    }
    docs: list[tuple[str, Doc]] = [("config.env", generated)]
    for path in manifest_files():
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                docs.append((f"{path.name}#{index}", doc))
    return docs


def of_kind(kind: str) -> list[Doc]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str, name: str) -> Doc:
    [doc] = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE.read_text())
    return doc


def pod_specs() -> Iterator[tuple[str, Doc]]:
    """Every pod template: the Deployments' and the CronJob's."""
    for dep in of_kind("Deployment"):
        yield dep["metadata"]["name"], dep["spec"]["template"]["spec"]
    for cron in of_kind("CronJob"):
        yield cron["metadata"]["name"], cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def module_of(command: list[str]) -> str:
    """`python -m MODULE` → MODULE."""
    assert command[:2] == ["python", "-m"], command
    return command[2]


def deployment_module(dep: Doc) -> str:
    [container] = dep["spec"]["template"]["spec"]["containers"]
    return module_of(container["args"])


def container_env(container: Doc) -> dict[str, str | None]:
    """What a container's environment holds: ConfigMap values, Secret keys (value unknown: None)
    and literal `env` entries, in Kubernetes' order of precedence."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            secret = one("Secret", source["secretRef"]["name"])
            env.update(dict.fromkeys(secret.get("stringData", {}) | secret.get("data", {})))
    for item in container.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def effective_settings(env: dict[str, str | None]) -> Settings:
    """The settings a container runs with, as far as the manifests tell (secrets left out)."""
    known = {k: v for k, v in env.items() if v is not None and "${" not in v}
    return Settings.from_env(known, app_env="development")


def app_routes(module: str) -> set[tuple[str, str]]:
    """(method, path) of every route of the service's app. A service that cannot be imported
    or has no app factory is a failure here, never a skip: every service is written."""
    package = importlib.import_module(module)
    factory = getattr(package, "create_app", None)
    assert callable(factory), f"{module} has no create_app"
    app = factory(Settings.from_env({}))
    return {(route.method, route.resource.canonical) for route in app.router.routes()}


def nginx_block(text: str, header: str) -> str:
    """The body of the `header { … }` block of an nginx config (balanced braces)."""
    start = text.index(header + " {") + len(header) + 2
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unbalanced block {header!r}")


def nginx_directives(block: str) -> dict[str, str]:
    """Top-level `name value;` directives of a block (nested blocks left out)."""
    flat = re.sub(r"#[^\n]*", "", block)
    while "{" in flat:
        flat = re.sub(r"[^;{}]*\{[^{}]*\}", "", flat)
    pairs = (stmt.strip().split(None, 1) for stmt in flat.split(";") if stmt.strip())
    return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}


def nginx_size(value: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, value
    return int(match[1]) * units.get(match[2].lower(), 1)


def nginx_seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)([smhd]?)", value)
    assert match, value
    return int(match[1]) * units.get(match[2], 1)


# --- Kubernetes: schemas and shape ------------------------------------------------------------


@pytest.mark.parametrize(("where", "doc"), [pytest.param(w, d, id=w) for w, d in manifests()])
def test_k8s_manifest_validates_against_the_kubernetes_schema(where: str, doc: Doc) -> None:
    try:
        validate(doc, K8S_VERSION, strict=True)
    except SchemaNotFoundError as exc:
        pytest.fail(f"{where}: {exc.message}")


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in manifest_files() if p.name != SECRET_TEMPLATE)


def test_config_is_generated_so_that_a_change_rolls_the_pods() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == CONFIG_NAME and generator["envs"] == ["config.env"]
    assert not generator.get("options", {}).get("disableNameSuffixHash")
    docs = rendered()
    [config] = [d for d in docs if d["kind"] == "ConfigMap"]
    hashed = config["metadata"]["name"]
    assert hashed.startswith(CONFIG_NAME + "-") and config["data"] == config_env()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "CronJob"):
            continue
        spec = (
            doc["spec"]["template"]["spec"]
            if doc["kind"] == "Deployment"
            else (doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
        )
        [container] = spec["containers"]
        refs = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
        assert refs == [hashed], doc["metadata"]["name"]


def test_k8s_manifests_name_no_namespace() -> None:
    assert [where for where, doc in manifests() if "namespace" in doc["metadata"]] == []


def test_secret_template_commits_no_secret_values() -> None:
    [secret] = of_kind("Secret")
    assert secret["stringData"] and set(secret["stringData"].values()) == {""}
    assert "data" not in secret


def test_configmap_and_secret_together_make_a_valid_production_configuration() -> None:
    [config] = of_kind("ConfigMap")
    [secret] = of_kind("Secret")
    filled = {
        key: (DEFAULTS.env()[key] if "://" in DEFAULTS.env()[key] else f"filled-{key.lower()}")
        for key in secret["stringData"]
    }
    # A Standard Webhooks secret has a form of its own (`whsec_` + base64 of the key).
    filled["SHOP_WEBHOOK_SECRET"] = "whsec_" + base64.b64encode(b"k" * 32).decode()
    settings = Settings.from_env({**config["data"], **filled})
    assert settings.is_production


def test_every_env_var_in_the_k8s_manifests_is_a_setting() -> None:
    names: set[str] = set()
    for config in of_kind("ConfigMap"):
        names |= set(config["data"])
    for secret in of_kind("Secret"):
        names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for _, spec in pod_specs():
        for container in spec["containers"]:
            names |= {item["name"] for item in container.get("env", [])}
    assert names - SETTING_NAMES == set()


def test_env_sources_named_by_containers_exist() -> None:
    for _, spec in pod_specs():
        for container in spec["containers"]:
            container_env(container)  # raises if a ConfigMap or Secret is missing


def test_every_service_has_a_deployment_running_its_module() -> None:
    modules = sorted(deployment_module(dep) for dep in of_kind("Deployment"))
    assert modules == sorted(SERVICE_MODULES)


def test_container_ports_are_the_settings_ports_of_their_service() -> None:
    for dep in of_kind("Deployment"):
        [container] = dep["spec"]["template"]["spec"]["containers"]
        port_field = f"{deployment_module(dep)}_port"
        port, ops = container["ports"]
        settings = effective_settings(container_env(container))
        assert port["containerPort"] == getattr(settings, port_field), dep
        assert port["containerPort"] == getattr(DEFAULTS, port_field), dep
        assert port["name"] == "http"
        # Health, readiness and metrics on OPS_PORT, an internal port (issue 15).
        assert (ops["name"], ops["containerPort"]) == ("ops", settings.ops_port), dep
        assert settings.ops_port not in (0, port["containerPort"])


def test_services_select_their_deployment_and_target_its_port() -> None:
    for dep in of_kind("Deployment"):
        service = one("Service", dep["metadata"]["name"])
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        [container] = dep["spec"]["template"]["spec"]["containers"]
        port, ops = service["spec"]["ports"]
        assert (port["name"], port["targetPort"]) == ("http", "http")
        assert port["port"] == container["ports"][0]["containerPort"]
        assert (ops["name"], ops["targetPort"], ops["port"]) == ("ops", "ops", 9090)


def test_probes_are_healthz_for_liveness_and_readyz_for_readiness() -> None:
    for dep in of_kind("Deployment"):
        [container] = dep["spec"]["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}


@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_probe_and_metrics_paths_are_routes_of_the_service(module: str) -> None:
    routes = app_routes(module)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert ("GET", path) in routes


def test_termination_grace_outlasts_prestop_sleep_and_shutdown_timeout() -> None:
    for dep in of_kind("Deployment"):
        spec = dep["spec"]["template"]["spec"]
        [container] = spec["containers"]
        sleep_cmd = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep_cmd[0] == "sleep"
        shutdown = effective_settings(container_env(container)).shutdown_timeout_seconds
        assert spec["terminationGracePeriodSeconds"] > int(sleep_cmd[1]) + shutdown, dep


def test_containers_run_unprivileged_on_a_read_only_root() -> None:
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name


def test_containers_have_resource_requests_and_limits() -> None:
    for name, spec in pod_specs():
        for container in spec["containers"]:
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, name


def test_each_deployment_has_a_pdb_and_an_hpa_of_at_least_two_replicas() -> None:
    for dep in of_kind("Deployment"):
        name = dep["metadata"]["name"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pdb = one("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = one("HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        assert "replicas" not in dep["spec"], "the HPA owns the replica count"


def test_pdbs_let_unready_pods_be_evicted() -> None:
    """A pod stuck NotReady must never block a node drain (issue 15)."""
    for pdb in of_kind("PodDisruptionBudget"):
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", pdb["metadata"]


# What each service's readiness (the probes' /readyz) may depend on, and nothing more
# (issue 15): a Redis outage must not take any pod out of its Service.
READINESS_REQUIRES = {
    "webhook_ingest": ["mongodb"],
    "session_api": ["mongodb"],
    "stream_gateway": ["accepting"],
}


@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_readiness_depends_only_on_what_the_service_needs(module: str) -> None:
    doc = importlib.import_module(f"{module}.openapi").document(DEFAULTS)
    readyz = doc["paths"]["/readyz"]["get"]["responses"]["200"]["content"]["application/json"]
    required = readyz["schema"]["properties"]["required"]["items"]["enum"]
    assert required == READINESS_REQUIRES[module]
    assert "redis" not in required


# A replica's own paths, never routed: health, metrics, and its OpenAPI document.
OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics", OPENAPI_PATH})
DEPOSIT_PAGE_PATHS = frozenset({("Exact", "/"), ("Prefix", "/static")})


def ingress_paths() -> dict[str, list[tuple[str, str]]]:
    """module → [(pathType, path)] that the Ingresses send to it."""
    modules = {dep["metadata"]["name"]: deployment_module(dep) for dep in of_kind("Deployment")}
    routed: dict[str, list[tuple[str, str]]] = {}
    for ingress in of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                module = modules[path["backend"]["service"]["name"]]
                routed.setdefault(module, []).append((path["pathType"], path["path"]))
    return routed


def ingress_matches(path_type: str, path: str, route: str) -> bool:
    """Kubernetes' Exact and Prefix (element-wise) matching; `{param}` segments are literal."""
    if path_type == "Exact":
        return route == path
    assert path_type == "Prefix", path_type
    return route == path or route.startswith(path.rstrip("/") + "/")


def test_ingress_routes_every_service() -> None:
    assert set(ingress_paths()) == set(SERVICE_MODULES)


def test_ingress_paths_are_routes_of_their_backend_service() -> None:
    missing: dict[str, list[tuple[str, str]]] = {}
    for module, paths in ingress_paths().items():
        routes = {p for _, p in app_routes(module)}
        missing[module] = [
            (kind, path)
            for kind, path in paths
            if not any(ingress_matches(kind, path, route) for route in routes)
        ]
    assert set(missing) == set(SERVICE_MODULES)
    assert not any(missing.values()), missing
    # The deposit page is in the contract like every API path: routed, and served (above).
    assert set(ingress_paths()["session_api"]) >= DEPOSIT_PAGE_PATHS


# Routed by no Ingress: the CronJob runs cleanup in the cluster (issue 15).
IN_CLUSTER_ONLY = frozenset({"/api/webhooks/cleanup"})
# Routed on the admin host only, which admits an allow-list of source addresses.
ADMIN_ONLY = frozenset(
    {
        "/api/stats",
        "/api/admin/payment-issues",
        "/api/admin/payment-issues/{id}/resolve",
        # The operator console (issue 13).
        "/admin",
        "/admin/signin",
        "/admin/sessions",
        "/admin/issues/{id}/resolve",
    }
)
ADMIN_INGRESS = "payment-push-admin"


@pytest.mark.parametrize("module", SERVICE_MODULES)
def test_ingress_routes_every_public_route_of_the_service(module: str) -> None:
    """Each route reaches its service, unless it is a replica's own (the ops paths), runs in
    the cluster only (cleanup), or the Ingress gives the path to another service (the
    gateway's per-process /api/stats)."""
    routed = ingress_paths()
    public = {p for _, p in app_routes(module)} - OPS_PATHS - IN_CLUSTER_ONLY
    unrouted = {
        route
        for route in public
        if not any(
            ingress_matches(kind, path, route) for paths in routed.values() for kind, path in paths
        )
    }
    assert unrouted == set()


def test_cleanup_is_routed_nowhere_and_admin_paths_only_on_the_allow_listed_host() -> None:
    for ingress in of_kind("Ingress"):
        admin = ingress["metadata"]["name"] == ADMIN_INGRESS
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                for route in IN_CLUSTER_ONLY:
                    assert not ingress_matches(path["pathType"], path["path"], route), path
                if not admin:
                    for route in ADMIN_ONLY:
                        assert not ingress_matches(path["pathType"], path["path"], route), path
    admin = one("Ingress", ADMIN_INGRESS)
    allow = admin["metadata"]["annotations"]["nginx.ingress.kubernetes.io/whitelist-source-range"]
    assert allow and "0.0.0.0/0" not in allow
    assert {h for r in admin["spec"]["rules"] for h in [r["host"]]} == {"admin.pay.example.com"}


def test_stream_ingress_is_configured_for_sse() -> None:
    [stream] = [
        ing
        for ing in of_kind("Ingress")
        if any(
            p["backend"]["service"]["name"] == "stream-gateway"
            for r in ing["spec"]["rules"]
            for p in r["http"]["paths"]
        )
    ]
    notes = stream["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) > DEFAULTS.sse_max_wait_seconds
    assert int(notes[prefix + "proxy-send-timeout"]) > DEFAULTS.sse_max_wait_seconds
    assert [p["path"] for r in stream["spec"]["rules"] for p in r["http"]["paths"]] == [
        "/api/webhooks/stream"
    ]


def test_ingress_body_limit_admits_the_services_max_body() -> None:
    for ingress in of_kind("Ingress"):
        limit = ingress["metadata"]["annotations"].get(
            "nginx.ingress.kubernetes.io/proxy-body-size"
        )
        if limit is not None:
            assert nginx_size(limit) >= DEFAULTS.max_body_bytes


def test_cleanup_cronjob_runs_every_six_hours_without_overlap() -> None:
    [cron] = of_kind("CronJob")
    spec = cron["spec"]
    assert spec["schedule"] == "0 */6 * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    job = spec["jobTemplate"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] < 6 * 3600
    [container] = job["template"]["spec"]["containers"]
    assert module_of(container["args"]) == "session_api.cleanup"


# Workload (Deployment or CronJob name) → the process it runs (shared.settings.SERVICE_SECRETS).
WORKLOAD_PROCESS = {
    "webhook-ingest": "webhook-ingest",
    "stream-gateway": "stream-gateway",
    "session-api": "session-api",
    "session-cleanup": "session-cleanup",
}
# Connection URLs may carry passwords: every workload takes them from the Secret.
SECRET_URLS = {"REDIS_URL", "MONGODB_URL"}


def secret_keys(container: Doc) -> set[str]:
    keys = set()
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == "payment-push-secrets" and ref["key"] == item["name"], item
            keys.add(ref["key"])
    return keys


def test_each_workload_gets_exactly_the_secret_keys_it_uses() -> None:
    """Issue 15: no `envFrom` of the whole Secret; single keys, exactly the process's own,
    and with those (and the ConfigMap) the process starts in production."""
    [config] = of_kind("ConfigMap")
    for name, spec in pod_specs():
        [container] = spec["containers"]
        assert not any("secretRef" in src for src in container.get("envFrom", [])), name
        process = WORKLOAD_PROCESS[name]
        used = {secret.upper() for secret in SERVICE_SECRETS[process]}
        optional = {secret.upper() for secret in SERVICE_OPTIONAL_SECRETS.get(process, ())}
        assert secret_keys(container) == SECRET_URLS | used | optional, name
        filled = {key: f"filled-{key.lower()}" for key in used}
        urls = {key: DEFAULTS.env()[key] for key in SECRET_URLS}
        settings = Settings.from_env(
            {**config["data"], **urls, **filled}, secrets=SERVICE_SECRETS[process]
        )
        assert settings.is_production, name
        for secret in SECRETS:
            assert bool(getattr(settings, secret)) == (secret in SERVICE_SECRETS[process]), name


def test_cleanup_module_exists() -> None:
    # What the CronJob runs (`python -m session_api.cleanup`): importable, with its entry point.
    module = importlib.import_module("session_api.cleanup")
    assert module.__file__ is not None and module.__file__.endswith("cleanup.py")
    assert callable(getattr(module, "main", None))


# --- docker compose ---------------------------------------------------------------------------


def compose_app_services() -> dict[str, Doc]:
    """Compose services that run the project's image."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("image", "").startswith("payment-push")
    }


def test_compose_runs_two_replicas_of_each_service() -> None:
    apps = compose_app_services()
    replicated = {
        module_of(svc["command"]): svc["deploy"]["replicas"]
        for svc in apps.values()
        if "profiles" not in svc
    }
    assert replicated == dict.fromkeys(SERVICE_MODULES, 2)


def test_compose_has_redis_mongo_nginx_and_an_optional_cleanup_job() -> None:
    services = compose()["services"]
    assert {"redis", "mongo", "mongo-init", "nginx"} <= set(services)
    [cleanup] = [s for s in compose_app_services().values() if "profiles" in s]
    assert module_of(cleanup["command"]) == "session_api.cleanup"


def test_compose_mongo_is_an_initiated_replica_set() -> None:
    services = compose()["services"]
    command = services["mongo"]["command"]
    assert command[command.index("--replSet") + 1] == "rs0"
    assert "rs.initiate" in services["mongo-init"]["command"][-1]
    for svc in compose_app_services().values():
        assert "replicaSet=rs0" in svc["environment"]["MONGODB_URL"]
        assert svc["depends_on"]["mongo-init"]["condition"] == "service_completed_successfully"


def test_every_env_var_in_compose_is_a_setting() -> None:
    for svc in compose_app_services().values():
        assert set(svc["environment"]) - SETTING_NAMES == set()


def test_compose_stop_grace_outlasts_shutdown_timeout() -> None:
    for name, svc in compose_app_services().items():
        shutdown = effective_settings(svc["environment"]).shutdown_timeout_seconds
        assert nginx_seconds(svc["stop_grace_period"]) > shutdown, name


def test_compose_services_have_the_file_limit_and_backlog_for_their_streams() -> None:
    for name in ("webhook-ingest", "stream-gateway", "session-api", "cleanup"):
        service = compose()["services"][name]
        nofile = service["ulimits"]["nofile"]
        assert nofile["hard"] >= 65535, name
        assert int(service["sysctls"]["net.core.somaxconn"]) >= DEFAULTS.listen_backlog, name


def test_compose_healthchecks_probe_readyz_on_the_settings_port() -> None:
    for svc in compose_app_services().values():
        if "profiles" in svc:
            continue
        port = getattr(DEFAULTS, f"{module_of(svc['command'])}_port")
        assert f"http://127.0.0.1:{port}/readyz" in " ".join(svc["healthcheck"]["test"])


# --- nginx ------------------------------------------------------------------------------------


def test_compose_services_get_exactly_the_secrets_they_use() -> None:
    processes = {
        "webhook-ingest": "webhook-ingest",
        "stream-gateway": "stream-gateway",
        "session-api": "session-api",
        "cleanup": "session-cleanup",
    }
    for name, svc in compose_app_services().items():
        given = {key.lower() for key in svc["environment"]} & set(SECRETS)
        assert given == set(SERVICE_SECRETS[processes[name]]), name


def test_compose_runs_services_as_kubernetes_does() -> None:
    """Issue 15: compose matches the pods where it claims to: security, limits, shutdown."""
    for name, svc in compose_app_services().items():
        assert svc["user"] == "10001:10001" and svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        if name == "cleanup":
            continue
        dep = one("Deployment", name)
        spec = dep["spec"]["template"]["spec"]
        [container] = spec["containers"]
        # The same shutdown timeout and grace period.
        k8s_shutdown = effective_settings(container_env(container)).shutdown_timeout_seconds
        assert effective_settings(svc["environment"]).shutdown_timeout_seconds == k8s_shutdown
        assert nginx_seconds(svc["stop_grace_period"]) == spec["terminationGracePeriodSeconds"]
        # The same CPU and memory limits.
        limits = svc["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) == float(container["resources"]["limits"]["cpu"]), name
        k8s_memory = container["resources"]["limits"]["memory"]
        assert limits["memory"].removesuffix("M") == k8s_memory.removesuffix("Mi"), name


def test_compose_exposes_nginx_only_and_nginx_routes_no_more_than_the_public_ingress() -> None:
    services = compose()["services"]
    assert [name for name, svc in services.items() if svc.get("ports")] == ["nginx"]
    text = NGINX_CONF.read_text()
    for path in (*IN_CLUSTER_ONLY, *ADMIN_ONLY):
        if "{" in path:
            # A path with a parameter: refused by the prefix location of the admin paths.
            assert path.startswith(("/api/admin/", "/admin/"))
            path = "/api/admin/" if path.startswith("/api/") else "/admin/"
            assert nginx_directives(nginx_block(text, f"location {path}")) == {"return": "404"}
            continue
        assert nginx_directives(nginx_block(text, f"location = {path}")) == {"return": "404"}


def test_nginx_retries_a_refused_stream_on_the_next_gateway() -> None:
    stream = nginx_directives(
        nginx_block(NGINX_CONF.read_text(), "location = /api/webhooks/stream")
    )
    assert set(stream["proxy_next_upstream"].split()) >= {"error", "timeout", "http_503"}


def test_nginx_stream_location_is_configured_for_sse() -> None:
    text = NGINX_CONF.read_text()
    stream = nginx_directives(nginx_block(text, "location = /api/webhooks/stream"))
    http = nginx_directives(nginx_block(text, "http"))
    assert stream["proxy_pass"] == "http://stream_gateway"
    assert stream["proxy_buffering"] == "off"
    assert nginx_seconds(stream["proxy_read_timeout"]) > DEFAULTS.sse_max_wait_seconds
    assert stream["proxy_pass_header"] == "X-Accel-Buffering"
    assert "proxy_set_header" not in stream, "it would drop the http-level headers"
    assert http["proxy_http_version"] == "1.1"
    assert re.search(r'proxy_set_header\s+Connection\s+""\s*;', nginx_block(text, "http"))


def test_nginx_routes_webhook_posts_to_ingest_and_other_methods_to_session_api() -> None:
    text = NGINX_CONF.read_text()
    location = nginx_directives(nginx_block(text, "location = /api/webhooks"))
    variable = location["proxy_pass"].removeprefix("http://")
    by_method = nginx_directives(nginx_block(text, f"map $request_method {variable}"))
    assert by_method == {"POST": "webhook_ingest", "default": "session_api"}


def test_nginx_upstreams_are_compose_services_on_their_settings_ports() -> None:
    text = NGINX_CONF.read_text()
    services = compose_app_services()
    for module in SERVICE_MODULES:
        server = nginx_directives(nginx_block(text, f"upstream {module}"))["server"]
        host, port = server.split()[0].split(":")
        assert module_of(services[host]["command"]) == module
        assert int(port) == getattr(DEFAULTS, f"{module}_port")


def nginx_exact_routes(text: str) -> set[tuple[str, str, str]]:
    """(module, method, path) for every exact location; method "*" when any method goes there."""
    routes: set[tuple[str, str, str]] = set()
    for path in re.findall(r"location = (\S+) \{", text):
        target = nginx_directives(nginx_block(text, f"location = {path}")).get("proxy_pass")
        if target is None:
            continue
        upstream = target.removeprefix("http://")
        if not upstream.startswith("$"):
            routes.add((upstream, "*", path))
            continue
        for method, module in nginx_directives(
            nginx_block(text, f"map $request_method {upstream}")
        ).items():
            routes.add((module, "GET" if method == "default" else method, path))
    return routes


def test_nginx_exact_locations_are_routes_of_their_upstream_service() -> None:
    routed = nginx_exact_routes(NGINX_CONF.read_text())
    assert {module for module, _, _ in routed} == set(SERVICE_MODULES)
    for module in SERVICE_MODULES:
        routes = app_routes(module)
        for _, method, path in (r for r in routed if r[0] == module):
            assert path in {p for m, p in routes if method in ("*", m)}, (module, method, path)


def test_nginx_body_limit_admits_the_services_max_body() -> None:
    http = nginx_directives(nginx_block(NGINX_CONF.read_text(), "http"))
    assert nginx_size(http["client_max_body_size"]) >= DEFAULTS.max_body_bytes


def test_nginx_hides_the_replicas_ops_endpoints() -> None:
    text = NGINX_CONF.read_text()
    hidden = nginx_directives(nginx_block(text, "location ~ ^/(healthz|readyz|metrics)$"))
    assert hidden == {"return": "404"}


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = find_nginx()
    if nginx is None:
        pytest.skip("nginx is not installed")
    # As local runs use it (devstack.balancer): compose service names resolve only inside
    # Docker, so each upstream points at its service's default port on this machine.
    upstreams = {name: [getattr(DEFAULTS, f"{name}_port")] for name in UPSTREAMS}
    conf = tmp_path / "nginx.conf"
    conf.write_text(local_nginx_conf(upstreams, free_port(), tmp_path))
    result = subprocess.run(
        nginx_argv(nginx, tmp_path, conf, test=True), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_nginx_upstreams_are_the_compose_services() -> None:
    hosts = {
        name: re.findall(
            r"server\s+([\w-]+):(\d+)", nginx_block(NGINX_CONF.read_text(), f"upstream {name}")
        )
        for name in UPSTREAMS
    }
    assert hosts == {
        name: [(name.replace("_", "-"), str(getattr(DEFAULTS, f"{name}_port")))]
        for name in UPSTREAMS
    }
    assert {name.replace("_", "-") for name in UPSTREAMS} <= set(compose_app_services())


def test_local_nginx_conf_changes_addresses_and_log_files_only(tmp_path: Path) -> None:
    """Local replicas run the deploy configuration itself: only where it listens, where its
    upstreams are and where it logs differ."""
    local = local_nginx_conf({name: [1001, 1002] for name in UPSTREAMS}, 1000, tmp_path)
    address = re.compile(r"^\s*(server\s+\S+:\d+|listen\s+\S+|error_log\s+\S+|access_log\s+\S+)")

    def rest(text: str) -> list[str]:
        return [line for line in text.splitlines() if not address.match(line)]

    assert rest(local) == rest(NGINX_CONF.read_text())
    assert local.count("server 127.0.0.1:1001;") == local.count("server 127.0.0.1:1002;") == 3
    assert "listen 127.0.0.1:1000;" in local
    assert f"error_log {tmp_path / 'error.log'}" in local


# --- image ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in lines
        if line and not line.startswith("#")
        for parts in [line.split(None, 1)]
    ]


def test_dockerfile_is_multi_stage_on_python_3_11_slim() -> None:
    instructions = dockerfile_instructions()
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG" and "=" in v)
    froms = [v for k, v in instructions if k == "FROM"]
    assert len(froms) == 2
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert any(v.startswith("--from=builder /opt/venv") for k, v in instructions if k == "COPY")


def test_dockerfile_runs_unprivileged_in_production_on_all_interfaces() -> None:
    instructions = dockerfile_instructions()
    users = [v for k, v in instructions if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    env = dict(pair.split("=", 1) for k, v in instructions if k == "ENV" for pair in v.split())
    assert (env["HOST"], env["APP_ENV"], env["PYTHONUNBUFFERED"]) == ("0.0.0.0", "production", "1")
    assert {"HOST", "APP_ENV"} <= SETTING_NAMES


def test_image_contains_every_package_the_project_installs() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {package.split(".")[0] for package in setuptools["packages"]}
    dirs = {setuptools["package-dir"].get(d, d).split("/")[0] for d in dirs}
    copied = {
        v.split()[0] for k, v in dockerfile_instructions() if k == "COPY" and "--from" not in v
    }
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert dirs | {"pyproject.toml"} <= copied
    assert not (dirs | {"pyproject.toml"}) & ignored


# --- NetworkPolicies: the flows the rendered objects allow, and no other ----------------------

NAMESPACE = "payments"  # any: the manifests name none


@dataclass(frozen=True)
class Peer:
    """A pod (namespace, labels, named ports) or an address outside the cluster."""

    name: str
    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int], ...] = ()
    ip: str = ""

    @property
    def is_pod(self) -> bool:
        return self.namespace is not None


def rendered() -> list[Doc]:
    """`kubectl kustomize deploy/k8s` (kustomize built into kubectl), offline."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def peer_matches(rule_peer: Doc, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        if peer.is_pod:
            return False
        block = rule_peer["ipBlock"]
        addr = ipaddress.ip_address(peer.ip)
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if not peer.is_pod:
        return False
    if "namespaceSelector" in rule_peer:
        ns_labels = {"kubernetes.io/metadata.name": peer.namespace or ""}
        if not selects(rule_peer["namespaceSelector"], ns_labels):
            return False
    elif peer.namespace != NAMESPACE:
        return False
    return selects(rule_peer.get("podSelector", {}), dict(peer.labels))


def port_matches(rule_ports: list[Doc] | None, dst: Peer, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for item in rule_ports:
        if item.get("protocol", "TCP") != protocol:
            continue
        wanted = item.get("port")
        if wanted is None or wanted == port or dict(dst.ports).get(str(wanted)) == port:
            return True
    return False


def allowed(policies: list[Doc], src: Peer, dst: Peer, port: int, protocol: str) -> bool:
    """Kubernetes' semantics: a pod selected by a policy of a direction is isolated in that
    direction and admits only what some rule of such a policy allows."""

    def side(pod: Peer, direction: str, other: Peer, key: str) -> bool:
        if not pod.is_pod or pod.namespace != NAMESPACE:
            return True  # not ours: its own policies decide
        mine = [
            p
            for p in policies
            if direction in p["spec"].get("policyTypes", ["Ingress"])
            and selects(p["spec"]["podSelector"], dict(pod.labels))
        ]
        if not mine:
            return True
        rules = [r for p in mine for r in p["spec"].get(direction.lower(), [])]
        return any(
            (not r.get(key) or any(peer_matches(x, other) for x in r[key]))
            and port_matches(r.get("ports"), dst, port, protocol)
            for r in rules
        )

    return side(src, "Egress", dst, "to") and side(dst, "Ingress", src, "from")


def workload_peers() -> list[Peer]:
    peers = []
    for name, spec in pod_specs():
        template_labels = next(
            d["spec"]["template"]["metadata"]["labels"]
            if d["kind"] == "Deployment"
            else d["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
            for d in [*of_kind("Deployment"), *of_kind("CronJob")]
            if d["metadata"]["name"] == name
        )
        ports = tuple(
            (p["name"], p["containerPort"]) for c in spec["containers"] for p in c.get("ports", [])
        )
        peers.append(Peer(name, NAMESPACE, tuple(template_labels.items()), ports))
    return peers


EXTERNAL = [
    Peer(
        "ingress-nginx",
        "ingress-nginx",
        (("app.kubernetes.io/name", "ingress-nginx"),),
    ),
    Peer("prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),)),
    Peer("pushgateway", "monitoring", (("app.kubernetes.io/name", "prometheus-pushgateway"),)),
    Peer("kube-dns", "kube-system", (("k8s-app", "kube-dns"),)),
    Peer("redis", NAMESPACE, (("app.kubernetes.io/name", "redis"),)),
    Peer("mongodb", NAMESPACE, (("app.kubernetes.io/name", "mongodb"),)),
    Peer("other-pod-here", NAMESPACE, (("app", "something-else"),)),
    Peer("other-namespace", "default", (("app.kubernetes.io/name", "ingress-nginx"),)),
    Peer("payos", ip="203.0.113.10"),
    Peer("cluster-internal-address", ip="10.1.2.3"),
]
PROBE_PORTS = [
    *((p, "TCP") for p in (80, 443, 6379, 8080, 8081, 8082, 8083, 9090, 9091, 27017)),
    (53, "UDP"),
    (53, "TCP"),
]
SERVICE_NAMES = ("webhook-ingest", "stream-gateway", "session-api")


def expected_flows() -> set[tuple[str, str, int, str]]:
    ports = {"webhook-ingest": 8081, "stream-gateway": 8082, "session-api": 8083}
    flows = set()
    for service in SERVICE_NAMES:
        flows.add(("ingress-nginx", service, ports[service], "TCP"))
        flows.add(("prometheus", service, 9090, "TCP"))
    for workload in (*SERVICE_NAMES, "session-cleanup"):
        flows |= {
            (workload, "kube-dns", 53, "UDP"),
            (workload, "kube-dns", 53, "TCP"),
            (workload, "redis", 6379, "TCP"),
            (workload, "mongodb", 27017, "TCP"),
        }
    flows.add(("session-api", "payos", 443, "TCP"))
    flows.add(("session-cleanup", "pushgateway", 9091, "TCP"))
    return flows


def test_network_policies_allow_exactly_the_flows_payment_push_needs() -> None:
    docs = rendered()
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policies, "no NetworkPolicy rendered"
    ours = workload_peers()
    assert {p.name for p in ours} == {*SERVICE_NAMES, "session-cleanup"}
    everyone = [*ours, *EXTERNAL]
    # Every flow with one of our pods at either end (the others are not ours to decide).
    flows = {
        (src.name, dst.name, port, protocol)
        for src in everyone
        for dst in everyone
        if src is not dst and (src in ours or dst in ours)
        for port, protocol in PROBE_PORTS
        if allowed(policies, src, dst, port, protocol)
    }
    assert flows == expected_flows(), {
        "unexpected": sorted(flows - expected_flows()),
        "missing": sorted(expected_flows() - flows),
    }


def test_kustomize_renders_every_manifest() -> None:
    docs = rendered()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name, doc in manifests():
        if name.startswith(SECRET_TEMPLATE) or name == "config.env":
            continue  # the generated ConfigMap's name is hashed (checked above)
        assert (doc["kind"], doc["metadata"]["name"]) in kinds, name


# --- monitoring and scaling (Prometheus Operator, prometheus-adapter) --------------------------

MONITORING = K8S / "monitoring"


def monitoring_docs() -> list[Doc]:
    docs: list[Doc] = []
    for path in sorted(MONITORING.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_monitoring_kustomization_lists_its_manifests() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    assert listed == sorted(
        p.name for p in MONITORING.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_a_service_monitor_scrapes_metrics_of_each_service() -> None:
    monitors = [d for d in monitoring_docs() if d["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == set(SERVICE_NAMES)
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        service = one("Service", monitor["metadata"]["name"])
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] == "ops"
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_gateway_scales_on_open_streams_per_pod_served_by_the_adapter() -> None:
    hpa = one("HorizontalPodAutoscaler", "stream-gateway")
    [pods] = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    name = pods["metric"]["name"]
    # A gauge the gateway exports ...
    registry = CollectorRegistry()
    GatewayMetrics.create(registry)
    assert name in {m.name for m in registry.collect()}
    # ... that the adapter serves, under that name, per pod ...
    [adapter] = [d for d in monitoring_docs() if d["kind"] == "ConfigMap"]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert any(rule["name"]["as"] == name and name in rule["seriesQuery"] for rule in rules)
    # ... with a target below what one process admits.
    assert 0 < int(pods["target"]["averageValue"]) < DEFAULTS.max_streams


def test_cleanup_cronjob_pushes_its_counts() -> None:
    [cron] = of_kind("CronJob")
    [container] = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    url = effective_settings(container_env(container)).pushgateway_url
    assert url.startswith("http") and url.endswith(":9091")


def test_cpu_requests_are_realistic_for_a_python_process() -> None:
    for dep in of_kind("Deployment"):
        [container] = dep["spec"]["template"]["spec"]["containers"]
        cpu = container["resources"]["requests"]["cpu"]
        millicores = int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)
        assert 250 <= millicores <= 1000, (dep["metadata"]["name"], cpu)


# --- supply chain: the image installs exactly the locked, hashed dependencies ----------------

LOCK = DEPLOY / "requirements.lock"


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    """name → (version, [sha256 hashes]) of deploy/requirements.lock."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        hashes = [o.removeprefix("--hash=sha256:") for o in options if o.startswith("--hash=")]
        pins[str(canonicalize_name(name))] = (version, hashes)
    return pins


def test_lock_pins_every_runtime_dependency_within_pyprojects_ranges_with_hashes() -> None:
    pins = lock_pins()
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        version, _ = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(version, prereleases=True), (dep, version)
    for name, (version, hashes) in pins.items():
        assert version and hashes, name
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
        # What the suite ran against is what the image gets.
        assert importlib.metadata.version(name) == version, name
    # No development tooling among the image's dependencies.
    assert not {"pytest", "playwright", "nx-27017", "mypy", "ruff"} & set(pins)


def test_dockerfile_installs_the_lock_with_hashes_and_no_dev_tooling() -> None:
    instructions = dockerfile_instructions()
    runs = [v for k, v in instructions if k == "RUN"]
    assert any(
        "--require-hashes" in r and "-r requirements.lock" in r and "--only-binary=:all:" in r
        for r in runs
    )
    # The project itself adds nothing unlocked.
    assert any("pip install --no-deps ." in r for r in runs)
    copied = {v.split()[0] for k, v in instructions if k == "COPY" and "--from" not in v}
    assert "deploy/requirements.lock" in copied
    assert not {"devstack", "bench", "tests"} & {c.split("/")[0] for c in copied}
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "!deploy/requirements.lock" in ignored and "devstack" in ignored
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any(p.split(".")[0] in ("devstack", "bench", "tests") for p in packages["packages"])
