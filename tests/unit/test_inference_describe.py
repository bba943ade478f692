"""What the protocol says about a served model: Triton's model config, and JSON as Triton's HTTP
API prints messages."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from maas import zoo
from maas.oip import grpc_predict_v2_pb2 as pb
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.describe import message_json, model_config
from services.inference.sources import MemorySource

MLP = {"in_features": 64, "hidden": [32], "num_classes": 10}


@pytest.fixture
async def served():
    source = MemorySource()
    source.add("digits", zoo.build("mlp", MLP, seed=1).eval(), "mlp", MLP)
    with ThreadPoolExecutor(max_workers=1) as pool:
        plane = DataPlane(source, pool, batching=BatchingConfig(1, 0), cache_bytes=1 << 30)
        yield await plane.model("digits")


def test_without_batching_max_batch_size_is_0_and_dims_keep_the_batch_dimension(served):
    config = model_config(served, BatchingConfig(1, 0), instances=2)
    assert config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 64]
    assert config.WhichOneof("scheduling_choice") is None
    assert config.instance_group[0].count == 2


def test_with_batching_the_queue_delay_is_the_dynamic_batchers(served):
    config = model_config(served, BatchingConfig(32, 500), instances=1)
    assert (config.max_batch_size, list(config.input[0].dims)) == (32, [64])
    assert config.dynamic_batching.max_queue_delay_microseconds == 500


def test_json_has_numbers_for_64_bit_fields_enum_names_and_zero_values():
    stats = pb.ModelStatistics(name="m", version="1", inference_count=3)
    stats.inference_stats.success.ns = 2**40
    doc = message_json(stats)
    assert doc["inference_count"] == 3 and doc["execution_count"] == 0
    assert doc["inference_stats"]["success"] == {"count": 0, "ns": 2**40}
    assert doc["batch_stats"] == []
    config = message_json(pb.ModelConfig(input=[pb.ModelInput(data_type=pb.TYPE_FP32)]))
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" not in config  # an unset oneof member is left out
