"""deploy/k8s stays a working deployment of what docker-compose.yml runs.

Rendered offline without kustomize: the kustomization has no transformers, so its `resources`
loaded in order are exactly what `kubectl apply -k` (or `kubectl apply -f` file by file) creates.
Every object is validated against the Kubernetes OpenAPI schemas shipped by kubernetes-validate
(strict: an unknown field fails), and the env names, commands and wiring are checked against
maas.config and the compose file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from maas.config import known_env_names

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.31"  # the oldest minor still supported upstream when this was written
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job"}
CLUSTER_SCOPED = {"Namespace"}
# kustomization keys that only list things; any other (images, patches, labels…) would transform
# the objects and make the in-order render below differ from kustomize's.
PLAIN_KEYS = {"apiVersion", "kind", "namespace", "resources"}

Obj = dict[str, Any]


def _kustomization() -> Obj:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _render() -> list[Obj]:
    objects: list[Obj] = []
    for name in _kustomization()["resources"]:
        objects += [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    return objects


OBJECTS = _render()


def _id(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _workloads() -> dict[str, Obj]:
    return {obj["metadata"]["name"]: obj for obj in OBJECTS if obj["kind"] in WORKLOAD_KINDS}


def _containers(workload: Obj) -> list[Obj]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def _by_kind(kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in OBJECTS if o["kind"] == kind}


def _env_sources(container: Obj) -> dict[str, Obj]:
    """What the container's envFrom loads: object name -> the ConfigMap or Secret."""
    sources: dict[str, Obj] = {}
    for ref in container.get("envFrom", []):
        key = "configMapRef" if "configMapRef" in ref else "secretRef"
        kind = "ConfigMap" if key == "configMapRef" else "Secret"
        name = ref[key]["name"]
        sources[name] = _by_kind(kind)[name]
    return sources


def _env(container: Obj) -> dict[str, str]:
    """The container's environment by name: envFrom first, then env (which wins, as in k8s)."""
    env: dict[str, str] = {}
    for source in _env_sources(container).values():
        env |= source.get("data", {}) | source.get("stringData", {})
    return env | {e["name"]: str(e.get("value", "")) for e in container.get("env", [])}


@pytest.fixture(scope="module")
def compose() -> Obj:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_kustomization_lists_every_manifest_and_transforms_nothing() -> None:
    kustomization = _kustomization()
    assert set(kustomization) <= PLAIN_KEYS, set(kustomization) - PLAIN_KEYS
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert len(OBJECTS) >= len(listed)


@pytest.mark.parametrize("obj", OBJECTS, ids=_id)
def test_every_object_validates_against_the_kubernetes_schemas(obj: Obj) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{_id(obj)}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")


def test_every_object_is_in_the_kustomization_namespace_and_part_of_maas() -> None:
    namespace = _kustomization()["namespace"]
    assert _by_kind("Namespace") == {namespace: _by_kind("Namespace")[namespace]}
    for obj in OBJECTS:
        meta = obj["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "maas", _id(obj)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace") == namespace, _id(obj)


def test_every_maas_env_name_a_pod_gets_is_known_to_config() -> None:
    names = {
        name
        for workload in _workloads().values()
        for container in _containers(workload)
        for name in _env(container)
        if name.startswith("MAAS_")
    }
    assert {"MAAS_KAFKA_BOOTSTRAP", "MAAS_S3_ENDPOINT", "MAAS_S3_SECRET_KEY"} <= names
    assert sorted(names - known_env_names()) == []


def test_config_and_secrets_hold_only_maas_settings() -> None:
    # envFrom loads every key into every pod: a key that is not a setting is a typo.
    for source in [*_by_kind("ConfigMap").values(), _by_kind("Secret")["maas-secrets"]]:
        keys = set(source.get("data", {})) | set(source.get("stringData", {}))
        assert keys and sorted(keys - known_env_names()) == [], _id(source)


def test_secrets_are_not_in_the_config_map() -> None:
    config = _by_kind("ConfigMap")["maas-config"]["data"]
    secret_names = {"MAAS_S3_ACCESS_KEY", "MAAS_S3_SECRET_KEY", "MAAS_KAFKA_SASL_PASSWORD"}
    assert not secret_names & set(config)
    assert {"MAAS_S3_ACCESS_KEY", "MAAS_S3_SECRET_KEY"} <= set(
        _by_kind("Secret")["maas-secrets"]["stringData"]
    )


def _compose_services(compose: Obj) -> dict[str, Obj]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("command"), list) and "services." in " ".join(svc["command"])
    }


def test_the_same_services_run_as_in_compose_with_the_same_image_and_command(
    compose: Obj,
) -> None:
    workloads = _workloads()
    for name, svc in _compose_services(compose).items():
        assert name in workloads, f"compose runs {name}; deploy/k8s does not"
        (container,) = _containers(workloads[name])
        assert container["image"] == svc["image"], name
        assert container["command"] == svc["command"], name
    bootstrap = _containers(workloads["maas-bootstrap"])[0]["command"]
    assert bootstrap[:3] == compose["services"]["init"]["command"]


def test_every_setting_compose_gives_a_service_its_pod_gets_too(compose: Obj) -> None:
    # Values differ where places differ (addresses, metrics ports); the names may not.
    workloads = _workloads()
    for name, svc in _compose_services(compose).items():
        (container,) = _containers(workloads[name])
        missing = set(svc["environment"]) - set(_env(container))
        assert not missing, f"{name}: compose sets {sorted(missing)}, its pod does not"


def test_every_env_source_and_mounted_secret_exists() -> None:
    secrets = _by_kind("Secret")
    for workload in _workloads().values():
        for container in _containers(workload):
            assert _env_sources(container), _id(workload)  # raises KeyError if one is missing
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, _id(workload)


def test_services_and_probes_target_ports_their_pods_declare() -> None:
    workloads = _workloads()
    for service in _by_kind("Service").values():
        selector = service["spec"]["selector"]
        (pod,) = [
            w
            for w in workloads.values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        declared = {p["name"] for c in _containers(pod) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, f"{_id(service)} -> {port['targetPort']}"
    for workload in workloads.values():
        for container in _containers(workload):
            numbers = {p["containerPort"] for p in container.get("ports", [])}
            names = {p["name"] for p in container.get("ports", [])}
            probe = container.get("readinessProbe")
            if probe is None:
                continue
            port = (probe.get("httpGet") or probe.get("grpc"))["port"]
            assert port in numbers | names, f"{_id(workload)} probes {port}"


def test_metrics_ports_are_the_ones_the_pods_open() -> None:
    for workload in _workloads().values():
        for container in _containers(workload):
            env = _env(container)
            for var in ("MAAS_METRICS_PORT", "MAAS_INFERENCE_METRICS_PORT"):
                if var in env:
                    declared = {p["containerPort"] for p in container["ports"]}
                    assert int(env[var]) in declared, f"{_id(workload)}: {var}"


def test_shards_serve_the_data_plane_and_advertise_their_pod_ip() -> None:
    (container,) = _containers(_workloads()["aggregator"])
    env_list = container["env"]
    names = [e["name"] for e in env_list]
    pod_ip = env_list[names.index("POD_IP")]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    # $(VAR) expands only variables defined earlier in the list.
    assert names.index("POD_IP") < names.index("MAAS_AGGREGATOR_ADVERTISE")
    env = _env(container)
    host, port = env["MAAS_AGGREGATOR_LISTEN"].rsplit(":", 1)
    assert host == "0.0.0.0"
    assert env["MAAS_AGGREGATOR_ADVERTISE"] == f"$(POD_IP):{port}"
    assert int(port) in {p["containerPort"] for p in container["ports"]}


def test_pool_members_and_servers_scale_by_replicas() -> None:
    workloads = _workloads()
    for name in ("gradient-worker", "aggregator", "inference", "compressor"):
        assert workloads[name]["kind"] == "Deployment", name
        assert workloads[name]["spec"]["replicas"] >= 1, name
    assert workloads["inference"]["spec"]["replicas"] >= 2


def test_registry_and_coordinator_are_single_replica_stateful_sets() -> None:
    workloads = _workloads()
    for name in ("model-registry", "training-coordinator"):
        assert workloads[name]["kind"] == "StatefulSet", name
        assert workloads[name]["spec"]["replicas"] == 1, name


def test_the_registry_database_lives_on_its_persistent_volume() -> None:
    registry = _workloads()["model-registry"]
    (container,) = _containers(registry)
    (claim,) = registry["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # services/model_registry keeps registry.db under MAAS_STATE_DIR.
    assert mounts[claim["metadata"]["name"]] == _env(container)["MAAS_STATE_DIR"]
    # The image runs as uid 10001: the volume must be writable by its group.
    assert registry["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
