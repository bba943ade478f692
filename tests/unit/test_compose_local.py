"""The native stack runs what docker-compose.yml describes, placed on this machine."""

import pytest

from infra.compose import check_scale, load_compose, local_services
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


def test_replicas_get_their_index_and_distinct_metrics_ports():
    specs = by_name()
    first, second = specs["compressor"], specs["compressor-1"]
    assert (first.env["MAAS_REPLICA_INDEX"], second.env["MAAS_REPLICA_INDEX"]) == ("0", "1")
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


def test_a_shards_data_plane_listens_where_settings_say_and_readiness_uses_metrics():
    # Compose's 0.0.0.0:7070 would collide between replicas on one host: locally port 0 (free).
    shard = by_name()["aggregator-1"]
    assert shard.env["MAAS_AGGREGATOR_LISTEN"] == "127.0.0.1:0"
    assert (shard.health, shard.port) == ("http", 9112)


def test_the_real_compose_file_yields_every_service():
    names = {s.compose_name for s in local_services(settings(), compose=load_compose(), environ={})}
    assert {"model-registry", "inference", "compressor"} <= names


def test_a_listener_compose_opens_to_its_network_stays_on_this_machine():
    compose = {
        "services": {
            "inference": {
                "command": ["python", "-m", "services.inference"],
                "environment": {
                    "MAAS_INFERENCE_LISTEN": "0.0.0.0:8001",
                    "MAAS_INFERENCE_HTTP_LISTEN": "0.0.0.0:8000",
                },
            }
        }
    }
    (spec,) = local_services(settings(), compose=compose, environ={})
    assert spec.env["MAAS_INFERENCE_HTTP_LISTEN"] == "127.0.0.1:8000"
    private = settings().replace(inference_http_listen="127.0.0.1:18000")
    (spec,) = local_services(private, compose=compose, environ={})
    assert spec.env["MAAS_INFERENCE_HTTP_LISTEN"] == "127.0.0.1:18000"
