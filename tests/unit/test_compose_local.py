"""The native stack runs what docker-compose.yml describes, placed on this machine."""

import pytest

from infra.compose import (
    MAX_LOCAL_REPLICAS,
    check_scale,
    listen_ports,
    load_compose,
    local_services,
)
from maas.config import Settings
from maas.errors import InvalidArgument

COMPOSE = {
    "services": {
        "kafka": {"image": "apache/kafka:4.1.1"},
        "model-registry": {
            "command": ["python", "-m", "services.model_registry"],
            "environment": {
                "MAAS_KAFKA_BOOTSTRAP": "kafka:9092",
                "MAAS_REGISTRY_LISTEN": "0.0.0.0:50051",
                "MAAS_LOG_LEVEL": "${MAAS_LOG_LEVEL:-INFO}",
            },
        },
        "compressor": {
            "command": ["python", "-m", "services.compressor"],
            "environment": {
                "MAAS_METRICS_PORT": "9102",
                "MAAS_REGISTRY_ADDR": "model-registry:50051",
            },
            "depends_on": {"model-registry": {"condition": "service_healthy"}, "kafka": {}},
            "deploy": {"replicas": 2},
        },
        "aggregator": {
            "command": ["python", "-m", "services.aggregator"],
            "environment": {"MAAS_AGGREGATOR_LISTEN": "0.0.0.0:7070", "MAAS_METRICS_PORT": "9111"},
            "deploy": {"replicas": 2},
        },
    }
}


def settings() -> Settings:
    return Settings.from_env({}).replace(
        kafka_bootstrap="127.0.0.1:19092", registry_addr="127.0.0.1:50051"
    )


def by_name(environ=None):
    return {s.name: s for s in local_services(settings(), compose=COMPOSE, environ=environ or {})}


def test_only_python_services_run_locally_in_dependency_order():
    specs = local_services(settings(), compose=COMPOSE, environ={})
    assert [s.name for s in specs] == [
        "model-registry",
        "compressor",
        "compressor-1",
        "aggregator",
        "aggregator-1",
    ]
    assert specs[0].module == "services.model_registry"


def test_container_hostnames_are_replaced_by_local_settings():
    specs = by_name()
    assert specs["model-registry"].env["MAAS_KAFKA_BOOTSTRAP"] == "127.0.0.1:19092"
    assert specs["compressor"].env["MAAS_REGISTRY_ADDR"] == "127.0.0.1:50051"


def test_a_listen_address_belongs_only_to_the_service_that_declares_it():
    specs = by_name()
    assert specs["model-registry"].env["MAAS_REGISTRY_LISTEN"] == "127.0.0.1:50051"
    assert "MAAS_REGISTRY_LISTEN" not in specs["compressor"].env
    assert (specs["model-registry"].health, specs["model-registry"].port) == ("grpc", 50051)


def test_replicas_get_distinct_metrics_ports():
    specs = by_name()
    first, second = specs["compressor"], specs["compressor-1"]
    assert (first.port, second.port) == (9102, 9103)
    assert first.health == "http"


def test_compose_interpolation_and_user_exports_apply():
    specs = by_name({"MAAS_LOG_LEVEL": "DEBUG", "MAAS_METRICS_PORT": "9200"})
    assert specs["model-registry"].env["MAAS_LOG_LEVEL"] == "DEBUG"
    assert specs["compressor"].port == 9200


def test_a_service_without_a_health_endpoint_is_refused():
    compose = {"services": {"x": {"command": ["python", "-m", "services.x"]}}}
    with pytest.raises(InvalidArgument, match="_LISTEN"):
        local_services(settings(), compose=compose, environ={})


def test_scale_overrides_a_services_replica_count():
    specs = local_services(settings(), compose=COMPOSE, environ={}, scale={"compressor": 4})
    assert [s.name for s in specs if s.compose_name == "compressor"] == [
        "compressor",
        "compressor-1",
        "compressor-2",
        "compressor-3",
    ]


def test_scale_names_only_python_services():
    with pytest.raises(InvalidArgument, match="--scale kafka: no such service; scalable: "):
        check_scale({"kafka": 2}, COMPOSE)


@pytest.mark.parametrize("count", [-1, MAX_LOCAL_REPLICAS + 1, 10**6])
def test_a_replica_count_beyond_what_one_machine_runs_is_refused(count):
    with pytest.raises(InvalidArgument, match=f"runs 0 to {MAX_LOCAL_REPLICAS} replicas"):
        check_scale({"compressor": count}, COMPOSE)


def test_a_shards_data_plane_listens_where_settings_say_and_readiness_uses_metrics():
    # Compose's 0.0.0.0:7070 would collide between replicas on one host: locally port 0 (free).
    shard = by_name()["aggregator-1"]
    assert shard.env["MAAS_AGGREGATOR_LISTEN"] == "127.0.0.1:0"
    assert (shard.health, shard.port) == ("http", 9112)


def test_the_real_compose_file_yields_every_service():
    names = {s.compose_name for s in local_services(settings(), compose=load_compose(), environ={})}
    assert {"model-registry", "inference", "compressor"} <= names


def test_a_listener_compose_opens_to_its_network_stays_on_this_machine():
    (spec,) = local_services(settings(), compose=INFERENCE, environ={})
    assert spec.env["MAAS_INFERENCE_HTTP_LISTEN"] == "127.0.0.1:8000"
    private = settings().replace(inference_http_listen="127.0.0.1:18000")
    (spec,) = local_services(private, compose=INFERENCE, environ={})
    assert spec.env["MAAS_INFERENCE_HTTP_LISTEN"] == "127.0.0.1:18000"


INFERENCE = {
    "services": {
        "inference": {
            "command": ["python", "-m", "services.inference"],
            "environment": {
                "MAAS_INFERENCE_LISTEN": "0.0.0.0:8001",
                "MAAS_INFERENCE_HTTP_LISTEN": "0.0.0.0:8000",
                "MAAS_INFERENCE_METRICS_PORT": "8002",
            },
        }
    }
}


def test_inference_scaled_on_one_host_gives_each_replica_its_own_ports():
    chosen = iter(range(30000, 30010))
    asked = []

    def choose(name: str, var: str, port: int) -> int:
        asked.append((name, var, port))
        return port or next(chosen)

    first, second = local_services(
        settings(), compose=INFERENCE, environ={}, scale={"inference": 2}, choose_port=choose
    )
    assert first.env["MAAS_INFERENCE_LISTEN"] == "127.0.0.1:8001"
    assert first.env["MAAS_INFERENCE_HTTP_LISTEN"] == "127.0.0.1:8000"
    assert second.env["MAAS_INFERENCE_LISTEN"] == "127.0.0.1:30000"
    assert second.env["MAAS_INFERENCE_HTTP_LISTEN"] == "127.0.0.1:30001"
    assert (second.env["MAAS_INFERENCE_METRICS_PORT"], second.health, second.port) == (
        "8003",
        "grpc",
        30000,
    )
    # A replica after the first asks for free listeners (0); its metrics port is compose's + 1.
    assert ("inference-1", "MAAS_INFERENCE_LISTEN", 0) in asked
    assert ("inference-1", "MAAS_INFERENCE_METRICS_PORT", 8003) in asked


def test_without_a_chooser_replica_listeners_still_get_free_ports():
    first, second = local_services(
        settings(), compose=INFERENCE, environ={}, scale={"inference": 2}
    )
    ports = {s.env["MAAS_INFERENCE_LISTEN"] for s in (first, second)}
    assert len(ports) == 2
    assert second.env["MAAS_INFERENCE_HTTP_LISTEN"] != first.env["MAAS_INFERENCE_HTTP_LISTEN"]


def test_a_listener_on_port_zero_stays_zero_for_every_replica():
    # A shard binds a free port itself and advertises the one it got.
    assert by_name()["aggregator-1"].env["MAAS_AGGREGATOR_LISTEN"].endswith(":0")


def test_listen_ports_names_every_port_a_replica_serves():
    (spec,) = local_services(settings(), compose=INFERENCE, environ={})
    assert listen_ports(spec) == {
        "MAAS_INFERENCE_LISTEN": 8001,
        "MAAS_INFERENCE_HTTP_LISTEN": 8000,
        "MAAS_INFERENCE_METRICS_PORT": 8002,
    }


def test_a_listener_on_a_free_port_shows_no_port_zero():
    shard = by_name()["aggregator-1"]
    assert "MAAS_AGGREGATOR_LISTEN" not in listen_ports(shard)
    assert listen_ports(shard)["MAAS_METRICS_PORT"] > 0


def test_no_replica_index_is_handed_to_services():
    # Pool members name themselves; no service reads an index, so none is set.
    assert all("MAAS_REPLICA_INDEX" not in s.env for s in by_name().values())
