"""Deployment files agree with the service they deploy (`make validate` checks their schemas).

Each check reads the real file and the real service: a renamed metric, setting, route or port breaks a test.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, get_args

import yaml

from service.config import Settings
from service.features import Source
from service.metrics import Metrics
from service.server import GRACEFUL_SHUTDOWN_S

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SETTING_VARS = {f"RERANK_{name.upper()}" for name in Settings.model_fields}
PORT = Settings.model_fields["port"].default


def exported_samples() -> set[str]:
    """Every sample name the service's registry can expose."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"]}
    return {fam.name + s for fam in Metrics().registry.collect() for s in suffixes[fam.type]}


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def k8s(kind: str, name: str = "dnr-rerank") -> dict[str, Any]:
    docs = [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in load_yaml(p)
            if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(docs) == 1, f"expected one {kind} {name}, found {len(docs)}"
    return docs[0]


def routes() -> set[str]:
    from service.app import create_app

    return {r.path for r in create_app(Settings(_env_file=None)).routes}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------- grafana


def test_dashboard_json_is_the_generator_output() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import dashboard
    finally:
        sys.path.pop(0)
    assert (DEPLOY / "grafana" / "dashboards" / "rerank.json").read_text() == dashboard.render(), \
        "run `python deploy/grafana/dashboard.py`"


def test_dashboard_queries_name_only_exported_metrics_and_labels() -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "rerank.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\brerank_[a-z_]+", e)}
    assert used - exported_samples() == set()
    wanted = {"request", "latency", "queue", "batch", "cache", "fallback", "rejection", "model version"}
    titles = " ".join(p["title"].lower() for p in board["panels"])
    assert {w for w in wanted if w not in titles} == set()
    sources = {v for e in exprs for m in re.findall(r'source=~?"([^"]+)"', e) for v in m.split("|")}
    assert sources and sources <= set(get_args(Source))


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")[0]["services"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["grafana"]["volumes"]}
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "rerank.yml")[0]["providers"][0]
    folder = provider["options"]["path"]
    assert (DEPLOY / mounts[folder] / "rerank.json").is_file()
    source = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"][0]
    assert source["url"] == f"http://prometheus:{compose['prometheus']['ports'][0].split(':')[1]}"


# --------------------------------------------------------------------------------------------- compose


def test_compose_wires_service_redis_and_prometheus() -> None:
    services = load_yaml(DEPLOY / "docker-compose.yml")[0]["services"]
    assert {"rerank", "redis", "prometheus", "grafana"} <= set(services)
    rerank = services["rerank"]
    env = rerank["environment"]
    assert set(env) <= SETTING_VARS
    Settings(_env_file=None, **{k.removeprefix("RERANK_").lower(): v for k, v in env.items() if "${" not in v})
    assert env["RERANK_REDIS_URL"].startswith("redis://redis:")
    assert rerank["ports"] == [f"{env['RERANK_PORT']}:{env['RERANK_PORT']}"]
    assert "../models:/models:ro" in rerank["volumes"] and env["RERANK_MODEL_DIR"] == "/models"
    assert rerank["read_only"] is True
    grace = int(rerank["stop_grace_period"].removesuffix("s"))
    assert grace > Settings.model_fields["drain_delay_s"].default + GRACEFUL_SHUTDOWN_S
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"rerank:{env['RERANK_PORT']}"]
    assert scrape["metrics_path"] in routes()


def test_every_service_waited_on_is_healthchecked_and_waited_on_by_health() -> None:
    services = load_yaml(DEPLOY / "docker-compose.yml")[0]["services"]
    for name, svc in services.items():
        for dep, how in svc.get("depends_on", {}).items():
            assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has no healthcheck"
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
    probe = " ".join(services["rerank"]["healthcheck"]["test"])
    assert "/readyz" in probe and "/readyz" in routes()


def test_the_gpu_variant_reserves_a_gpu_asks_for_cuda_and_does_not_loop() -> None:
    cpu = load_yaml(DEPLOY / "docker-compose.yml")[0]["services"]
    gpu = load_yaml(DEPLOY / "docker-compose.gpu.yml")[0]["services"]
    assert set(gpu) <= set(cpu)  # a layer on the same services, not new ones
    rerank = gpu["rerank"]
    (device,) = rerank["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert rerank["environment"]["RERANK_PROVIDERS"] == "cuda" and rerank["build"]["args"]["RUNTIME"] == "gpu"
    Settings(_env_file=None, providers=rerank["environment"]["RERANK_PROVIDERS"])
    assert rerank["restart"].startswith("on-failure:")  # a refused start stops, it does not loop
    assert cpu["rerank"]["build"]["args"]["RUNTIME"] == "cpu" and "RERANK_PROVIDERS" not in cpu["rerank"]["environment"]
    assert gpu["load-features"]["image"] == rerank["image"]


def test_alert_rules_name_only_exported_metrics_and_the_scraped_job() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")[0]
    assert config["rule_files"] == ["alerts.yml"]
    rules = [r for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"] for r in g["rules"]]
    used = {m for r in rules for m in re.findall(r"\brerank_[a-z_]+", r["expr"])}
    assert used and used - exported_samples() == set()
    jobs = {j for r in rules for j in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs == {config["scrape_configs"][0]["job_name"]}
    reasons = {v for r in rules for m in re.findall(r'reason=~"([^"]+)"', r["expr"]) for v in m.split("|")}
    assert reasons == {"deadline", "in_flight", "queue_full"}  # the 429 reasons (admission.Gate.refuse, the batcher)
    assert {r["alert"] for r in rules} >= {"RerankFallbackRateHigh", "RerankRefusingLoad", "RerankRedisBreakerOpen",
                                           "RerankLatencyOverBudget", "RerankReloadFailed", "RerankWorkerRestarting"}


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_is_non_root_without_torch_and_checks_readiness() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and all(u not in ("root", "0") for u in users)
    instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in instructions and "[train" not in instructions
    assert not re.search(r"^COPY .*\btraining\b", text, re.M)
    health = re.search(r"^HEALTHCHECK .*?CMD (.*?)$", text, re.M | re.S)
    assert health and "/readyz" in health.group(1) and "/readyz" in routes()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"training", "tests", ".venv", ".git"} <= set(ignored)


# ---------------------------------------------------------------------------------------------- k8s


def test_k8s_settings_are_real_settings() -> None:
    values = {**k8s("ConfigMap")["data"], **k8s("Secret")["stringData"]}
    assert set(values) <= SETTING_VARS
    Settings(_env_file=None, **{k.removeprefix("RERANK_").lower(): v for k, v in values.items()})


def test_k8s_workers_match_the_cpu_limit() -> None:
    """One worker per core of limits.cpu, one ONNX Runtime thread each: no idle core, no oversubscription."""
    (container,) = k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    data = k8s("ConfigMap")["data"]
    cpu = container["resources"]["limits"]["cpu"]
    assert container["resources"]["requests"]["cpu"] == cpu
    assert int(data["RERANK_WORKERS"]) == int(cpu) and int(data["RERANK_INTRA_OP_THREADS"]) == 1


def test_k8s_deployment_probes_ports_and_termination() -> None:
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    port = int(k8s("ConfigMap")["data"]["RERANK_PORT"])
    assert container["ports"][0]["containerPort"] == port
    paths = routes()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez" in paths
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(k8s("ConfigMap")["data"].get("RERANK_DRAIN_DELAY_S", Settings.model_fields["drain_delay_s"].default))
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + drain + GRACEFUL_SHUTDOWN_S
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for kind in ("Service", "PodDisruptionBudget"):
        spec = k8s(kind)["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = k8s("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert k8s("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2  # the PDB can then allow one down


def test_k8s_model_comes_from_a_model_image_through_the_init_container() -> None:
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    model_dir = k8s("ConfigMap")["data"]["RERANK_MODEL_DIR"]
    into = next(m for m in init["volumeMounts"])
    served = next(m for m in container["volumeMounts"] if m["name"] == into["name"])
    assert served["mountPath"] == model_dir and served.get("readOnly") is True
    assert init["command"][:2] == ["cp", "-R"] and init["command"][-1].rstrip("/") == into["mountPath"]
    assert init["image"].startswith("dnr-rerank-model:") and not container["image"].endswith(":baked")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == into["name"])
    # The image the init container copies from: the Dockerfile's model stage puts one version under /models.
    stage = re.search(r"^FROM \S+ AS model\n(.*?)(?=^FROM |\Z)", (ROOT / "Dockerfile").read_text(), re.M | re.S)
    assert stage and re.search(r"^COPY .* models/\$\{MODEL_VERSION\}/ /models/\$\{MODEL_VERSION\}/$", stage.group(1),
                               re.M)
    assert init["command"][2] == "/models/."
    # A rollout is readiness-gated and never takes a serving pod away first.
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_k8s_autoscales_on_cpu_and_the_queue_depth_the_service_exports() -> None:
    metrics = k8s("HorizontalPodAutoscaler")["spec"]["metrics"]
    pods = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
    assert pods == ["rerank_queue_depth"] and set(pods) <= exported_samples()
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
    adapter = yaml.safe_load(k8s("ConfigMap", "prometheus-adapter-dnr-rerank")["data"]["config.yaml"])
    assert {r["name"]["as"] for r in adapter["rules"]} == set(pods)
    assert all(re.match(r"rerank_[a-z_]+", r["seriesQuery"]).group(0) in exported_samples()  # type: ignore[union-attr]
               for r in adapter["rules"])


def test_the_docs_name_only_real_settings_and_env_example_lists_every_one() -> None:
    for doc in ("README.md", ".env.example"):
        named = set(re.findall(r"RERANK_[A-Z_]*[A-Z]", (ROOT / doc).read_text())) - {"RERANK_TEST_MODELS"}
        assert named <= SETTING_VARS, (doc, sorted(named - SETTING_VARS))
    listed = set(re.findall(r"^(RERANK_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert listed == SETTING_VARS, sorted(SETTING_VARS ^ listed)


def test_the_readme_and_the_openapi_schema_list_every_fallback_reason() -> None:
    from service.app import create_app
    from service.schemas import FALLBACK_REASONS

    text = (ROOT / "README.md").read_text()
    assert all(f"`{reason}`" in text for reason in FALLBACK_REASONS)
    field = create_app().openapi()["components"]["schemas"]["RerankResponse"]["properties"]["fallback_reason"]
    assert [set(option.get("enum", [])) for option in field["anyOf"]] == [set(FALLBACK_REASONS), set()], field
    assert all(reason in field["description"] for reason in FALLBACK_REASONS)


def test_the_readme_lists_exactly_the_metrics_the_service_declares() -> None:
    declared = {m.name + ("_total" if m.type == "counter" else "") for m in Metrics().registry.collect()}
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `GET /metrics`"))
    listed = set(re.findall(r"`(rerank_[a-z_]+)", row))
    assert listed == declared, sorted(listed ^ declared)


def test_the_readme_names_every_make_target_and_the_compose_drain_time() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = readme.split("## Commands", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"^make (\S+)", commands, re.M))
    phony = set(re.search(r"^\.PHONY: (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split())  # type: ignore[union-attr]
    assert named == phony, sorted(named ^ phony)
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    grace = compose["services"]["rerank"]["stop_grace_period"]
    assert f"gets {grace.removesuffix('s')} s to drain on stop" in readme, grace
