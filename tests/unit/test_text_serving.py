"""Serving text in process: BYTES on the wire, tokenization in the server, length grouping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from maas import artifacts, zoo
from maas.edge import Authorizer
from maas.errors import InvalidArgument
from maas.oip import grpc_predict_v2_pb2 as pb
from maas.text import corpus
from maas.text import wire as bytes_tensors
from maas.text.model import TextModel
from maas.text.pretrained import MINILM_PACKAGE, read_package
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.http_app import HttpServer
from services.inference.metrics import Metrics
from services.inference.rest import OipRestRoutes
from services.inference.sources import MemorySource
from services.inference.tensors import decode_inputs, infer_response
from services.inference.text import MAX_TEXTS

TEXTS = [
    "Hello world",
    "",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "token " * 300,  # over max_seq_length: truncated to 256 tokens
]
SMALL = {"hidden": 64, "heads": 2, "layers": 1, "intermediate": 128, "max_seq_length": 256}


@pytest.fixture(scope="module")
def minilm() -> TextModel:
    return TextModel.from_pretrained(read_package(MINILM_PACKAGE))


@pytest.fixture(scope="module")
def source(minilm: TextModel) -> MemorySource:
    pretrained = read_package(MINILM_PACKAGE)
    src = MemorySource()
    config = zoo.config_to_dict(pretrained.config)
    files, manifest = artifacts.pack(pretrained.state, "bert", config, extra_files=pretrained.files)
    src.add_artifact("minilm", files, manifest, aliases=["production"])
    # A classifier descending from it, without a tokenizer of its own (found up the lineage).
    classifier = zoo.build("bert", {**SMALL, "num_classes": len(corpus.LABELS)}, seed=3)
    files, manifest = artifacts.pack(
        classifier,
        "bert",
        {**SMALL, "num_classes": len(corpus.LABELS)},
        parent={"name": "minilm", "version": 1},
        settings={"dataset": {"uri": f"builtin:{corpus.NAME}"}},
    )
    src.add_artifact("docs-classifier", files, manifest, aliases=["production"])
    return src


def texts_array(texts: list[str | bytes]) -> np.ndarray:
    array = np.empty(len(texts), dtype=object)
    array[:] = [t.encode() if isinstance(t, str) else t for t in texts]
    return array


async def embed(plane: DataPlane, texts: list[str | bytes]) -> np.ndarray:
    result = await plane.infer("minilm", "", {"text": texts_array(texts)})
    return result.outputs["embedding"]


@pytest.fixture
def plane(source: MemorySource):
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield DataPlane(source, pool, batching=BatchingConfig(64, 20_000), cache_bytes=1 << 30)


def test_raw_bytes_tensors_read_what_tritonclient_writes_and_back() -> None:
    items = np.array([b"a", b"", "ünï".encode(), b"\x00\xff"], dtype=object)
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[4])
    decoded = bytes_tensors.decode_raw(tensor, serialize_byte_tensor(items).item())
    assert decoded.tolist() == items.tolist()
    labels = np.array(["files", "text"], dtype=object)
    response = pb.ModelInferResponse.FromString(infer_response("m", "1", "r", [("label", labels)]))
    assert response.outputs[0].datatype == "BYTES"
    back = deserialize_bytes_tensor(response.raw_output_contents[0])
    assert back.tolist() == [b"files", b"text"]


def test_bytes_contents_are_read_too() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2, 1])
    tensor.contents.bytes_contents.extend([b"one", b"two"])
    assert decode_inputs(request)["text"].tolist() == [[b"one"], [b"two"]]


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"\x05\x00\x00\x00abc", "says 5 bytes"), (b"\x01\x00", "length prefix")],
)
def test_a_cut_bytes_tensor_is_refused(raw: bytes, message: str) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    with pytest.raises(InvalidArgument, match=message):
        bytes_tensors.decode_raw(tensor, raw)


def test_a_bytes_shape_over_the_element_limit_is_refused_before_any_element_is_read() -> None:
    too_many = bytes_tensors.MAX_REQUEST_ELEMENTS + 1
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[too_many])
    with pytest.raises(InvalidArgument, match=rf"{too_many} BYTES elements; .* at most 4096"):
        bytes_tensors.decode_raw(tensor, b"\x01\x00")  # cut: reading it would say so instead


def test_bytes_contents_over_the_element_limit_are_refused() -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[5000])
    tensor.contents.bytes_contents.extend([b"x"] * 5000)
    with pytest.raises(InvalidArgument, match="5000 BYTES elements; .* at most 4096"):
        decode_inputs(request)


def test_raw_bytes_past_the_elements_the_shape_holds_are_not_read() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    raw = b"\x01\x00\x00\x00a" + b"\x01\x00"  # then a cut element: never reached
    with pytest.raises(InvalidArgument, match=r"more BYTES elements than shape \[1\] holds"):
        bytes_tensors.decode_raw(tensor, raw)


def test_an_empty_bytes_tensor_with_dimensions_numpy_cannot_index_is_refused() -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[2**40, 2**40, 0]
    )
    with pytest.raises(InvalidArgument, match="'text' has shape .* too big"):
        bytes_tensors.decode_raw(tensor, b"")


async def test_served_embeddings_equal_the_in_process_model(
    plane: DataPlane, minilm: TextModel
) -> None:
    np.testing.assert_allclose(await embed(plane, TEXTS), minilm(TEXTS), atol=1e-5, rtol=0)


async def test_concurrent_requests_batched_together_equal_each_alone(
    plane: DataPlane, minilm: TextModel
) -> None:
    together = await asyncio.gather(*(embed(plane, [t]) for t in TEXTS))
    stats = (await plane.model("minilm")).stats
    assert max(stats.batches) > 1  # the batcher did join requests of different lengths
    for text, served in zip(TEXTS, together, strict=True):
        np.testing.assert_allclose(served, minilm([text]), atol=1e-5, rtol=0)


async def test_invalid_utf8_is_refused_naming_the_element(plane: DataPlane) -> None:
    with pytest.raises(InvalidArgument, match=r"element 1 is not valid UTF-8"):
        await embed(plane, ["fine", b"\xff\xfe broken"])


async def test_too_many_texts_in_one_request_are_refused(plane: DataPlane) -> None:
    with pytest.raises(InvalidArgument, match=f"1 to {MAX_TEXTS}"):
        await embed(plane, ["x"] * (MAX_TEXTS + 1))


async def test_numbers_sent_to_a_text_model_are_refused_in_the_protocols_words(
    plane: DataPlane,
) -> None:
    with pytest.raises(InvalidArgument, match=r"has datatype FP32 .* expects BYTES"):
        await plane.infer("minilm", "", {"text": np.zeros((1, 3), dtype=np.float32)})


async def test_a_classifier_answers_probabilities_and_label_names(
    plane: DataPlane, source: MemorySource
) -> None:
    result = await plane.infer("docs-classifier", "", {"text": texts_array(TEXTS[:2])})
    probabilities, labels = result.outputs["probabilities"], result.outputs["label"]
    assert probabilities.shape == (2, len(corpus.LABELS))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    expected = [corpus.LABELS[i].encode() for i in probabilities.argmax(axis=1)]
    assert labels.tolist() == expected


# --- over HTTP (KServe v2 REST) ----------------------------------------------------------------


@pytest.fixture
async def rest_url(plane: DataPlane) -> AsyncIterator[str]:
    plane.ready = True
    http = HttpServer("127.0.0.1:0")
    http.add(OipRestRoutes(plane, Authorizer(None), Metrics()))
    await http.start()
    yield f"127.0.0.1:{http.port}"
    await http.stop()


async def test_texts_sent_as_json_strings_over_rest_get_the_in_process_embeddings(
    rest_url: str, minilm: TextModel
) -> None:
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[:2]}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{rest_url}/v2/models/minilm/infer", json=doc) as response,
    ):
        reply = await response.json()
    assert response.status == 200, reply
    (output,) = reply["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("embedding", "FP32", [2, 384])
    served = np.array(output["data"], dtype=np.float32).reshape(2, 384)
    np.testing.assert_allclose(served, minilm(TEXTS[:2]), atol=1e-5, rtol=0)


async def test_tritonclient_http_sends_an_object_array_and_reads_the_labels_back(
    rest_url: str,
) -> None:
    import tritonclient.http as triton_http

    def ask() -> np.ndarray:
        client = triton_http.InferenceServerClient(rest_url)
        text = triton_http.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array(TEXTS[:2], dtype=np.object_), binary_data=True)
        wanted = [triton_http.InferRequestedOutput(name, binary_data=True) for name in ("label",)]
        try:
            return client.infer("docs-classifier", [text], outputs=wanted).as_numpy("label")
        finally:
            client.close()

    labels = await asyncio.to_thread(ask)
    assert labels.shape == (2,) and all(label.decode() in corpus.LABELS for label in labels)


async def test_a_bytes_input_over_rest_that_is_not_strings_is_400_naming_the_element(
    rest_url: str,
) -> None:
    doc = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 5]}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{rest_url}/v2/models/minilm/infer", json=doc) as response,
    ):
        reply = await response.json()
    assert response.status == 400 and "element 1 is int" in reply["error"]
