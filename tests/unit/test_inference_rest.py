"""The OIP HTTP/REST routes, in process: JSON and binary tensors, metadata, config, statistics,
repository, status codes with messages, the token check (also before an ``Expect: 100-continue``
body, on the OpenAI routes too). tritonclient.http drives the real
server process in tests/integration/test_oip_http.py."""

import asyncio
import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import numpy as np
import pytest
from dataplane_kit import expected, make_plane
from multidict import CIMultiDict

from maas import zoo
from maas.config import Settings
from maas.edge import Authorizer
from maas.errors import InvalidArgument
from services.inference import rest_codec
from services.inference.http_app import THREADED_PARSE_BYTES, HttpServer
from services.inference.metrics import Metrics
from services.inference.openai_http import OpenAIRoutes, bearer_auth
from services.inference.rest import JSON_CHARS_A_VALUE, OipRestRoutes
from services.inference.rest_codec import HEADER_LENGTH, encode_response
from services.inference.sources import MemorySource

MLP = {"in_features": 4, "hidden": [8], "num_classes": 3}
X = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
TOKEN = "rest-token"
HUGE = 2**62  # beside a zero: no values, but sizes numpy cannot index


class Rest:
    def __init__(
        self,
        authorizer: Authorizer,
        max_body_bytes: int = 1 << 20,
        max_json_bytes: int = 1 << 20,
        **timeouts: float,
    ) -> None:
        self.module = zoo.build("mlp", MLP, seed=2).eval()
        source = MemorySource()
        source.add("digits", self.module, "mlp", MLP, aliases=["production"])
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.plane = make_plane(source, self.pool, metrics=self.metrics)
        self.plane.ready = True
        self.http = HttpServer(
            "127.0.0.1:0", max_body_bytes=max_body_bytes, max_json_bytes=max_json_bytes, **timeouts
        )
        self.http.add(OipRestRoutes(self.plane, authorizer, self.metrics))

    async def __aenter__(self) -> "Rest":
        await self.http.start()
        self.session = aiohttp.ClientSession(f"http://127.0.0.1:{self.http.port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.http.stop()
        await self.plane.close()
        self.pool.shutdown()

    async def call(self, method: str, path: str, **kwargs) -> tuple[int, dict, bytes]:
        async with self.session.request(method, path, **kwargs) as response:
            body = await response.read()
            doc = json.loads(body) if response.content_type == "application/json" else {}
            return response.status, doc, body


@pytest.fixture
async def rest():
    async with Rest(Authorizer(None)) as r:
        yield r


def infer_doc(x=X, **extra):
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": list(x.shape),
        "data": x.ravel().tolist(),
    }
    return {"inputs": [tensor], **extra}


async def test_health_and_server_metadata(rest):
    assert (await rest.call("GET", "/v2/health/live"))[0] == 200
    assert (await rest.call("GET", "/v2/health/ready"))[0] == 200
    rest.plane.ready = False
    assert (await rest.call("GET", "/v2/health/ready"))[0] == 503
    status, doc, _ = await rest.call("GET", "/v2")
    assert status == 200 and doc["name"] == "maas-inference"
    assert "binary_tensor_data" in doc["extensions"]


async def test_infer_with_json_tensors_answers_like_the_model(rest):
    status, doc, _ = await rest.call("POST", "/v2/models/digits/infer", json=infer_doc(id="r1"))
    assert status == 200
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("digits", "1", "r1")
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("output", "FP32", [2, 3])
    np.testing.assert_allclose(
        np.array(out["data"], np.float32).reshape(2, 3), expected(rest.module, X), rtol=1e-6
    )


async def test_nested_json_data_is_read_row_major(rest):
    doc = infer_doc()
    doc["inputs"][0]["data"] = X.tolist()
    status, reply, _ = await rest.call("POST", "/v2/models/digits/versions/1/infer", json=doc)
    assert status == 200 and reply["model_version"] == "1"


async def test_binary_inputs_and_outputs_follow_the_json_header(rest):
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": X.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    async with rest.session.post(
        "/v2/models/digits/infer",
        data=header + X.tobytes(),
        headers={HEADER_LENGTH: str(len(header))},
    ) as response:
        assert response.status == 200
        length = int(response.headers[HEADER_LENGTH])
        body = await response.read()
    meta = json.loads(body[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
    out = np.frombuffer(body[length:], np.float32).reshape(2, 3)
    np.testing.assert_allclose(out, expected(rest.module, X), rtol=1e-6)


@pytest.mark.parametrize(
    ("parameters", "extra", "complaint"),
    [
        ({"binary_data_size": 32}, {"data": [0] * 8}, "both parameters.binary_data_size and data"),
        ({"binary_data_size": 32.0}, {}, "binary_data_size is 32.0"),
    ],
)
async def test_a_binary_input_said_ambiguously_is_400(rest, parameters, extra, complaint):
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 4], "parameters": parameters}
    header = json.dumps({"inputs": [tensor | extra]}).encode()
    code, reply, _ = await rest.call(
        "POST",
        "/v2/models/digits/infer",
        data=header + X.tobytes(),
        headers={HEADER_LENGTH: str(len(header))},
    )
    assert code == 400
    assert complaint in reply["error"]


async def test_a_binary_input_of_a_shape_numpy_cannot_index_is_400_naming_it(rest):
    tensor = {"name": "input", "datatype": "FP32", "shape": [0, 2**62, 2**62]}
    header = json.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": 0}}]}).encode()
    code, reply, _ = await rest.call(
        "POST",
        "/v2/models/digits/infer",
        data=header,
        headers={HEADER_LENGTH: str(len(header))},
    )
    assert code == 400
    assert "inputs[0].shape is [0, 4611686018427387904, 4611686018427387904]" in reply["error"]


@pytest.mark.parametrize(
    ("outputs", "complaint"),
    [
        ([{"name": "output", "parameters": {"classification": 3}}], "classification extension"),
        ([{"name": "output"}, {"name": "output"}], "requested twice"),
    ],
)
async def test_outputs_asked_for_in_a_form_not_offered_are_400(rest, outputs, complaint):
    status, reply, _ = await rest.call(
        "POST", "/v2/models/digits/infer", json=infer_doc(outputs=outputs)
    )
    assert status == 400 and complaint in reply["error"]


def test_an_output_json_cannot_carry_is_refused_saying_to_ask_for_binary():
    output = [("output", np.array([[1.0, np.inf, np.nan]], np.float32))]
    with pytest.raises(InvalidArgument, match="binary_data"):
        encode_response({}, output, binary=set())
    body = encode_response({}, output, binary={"output"})
    assert body.content_type == "application/octet-stream"


@pytest.mark.parametrize(
    ("doc", "status", "complaint"),
    [
        ({"inputs": []}, 400, "non-empty list"),
        (infer_doc() | {"outputs": [{"name": "probs"}]}, 400, "no output ['probs']"),
        (
            {"inputs": [{"name": "input", "datatype": "FP99", "shape": [1], "data": [1]}]},
            400,
            "FP99",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": [1]}]},
            400,
            "needs 8",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ["a"] * 4}]},
            400,
            "only numbers",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]},
            400,
            "expects FP32",
        ),
        (
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1] * 65, "data": [1]}]},
            400,
            "shape has 65 dimensions; at most 64 are accepted",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "data": [1] * 4,
                        "parameters": {"shared_memory_region": "r"},
                    }
                ]
            },
            400,
            "input 'input' has shared_memory_region: this server has no shared-memory extension",
        ),
        (
            infer_doc()
            | {"outputs": [{"name": "output", "parameters": {"shared_memory_byte_size": 12}}]},
            400,
            "output 'output' has shared_memory_byte_size",
        ),
        (
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [3], "data": [["x"], ["y", "z"]]}
                ]
            },
            400,
            "inputs[0].data is a ragged nested list",
        ),
        (
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [0, 2**62, 2**62], "data": []}
                ]
            },
            400,
            "inputs[0].shape is [0, 4611686018427387904, 4611686018427387904]: array is too big",
        ),
    ],
)
async def test_bad_requests_are_400_and_say_what_is_wrong(rest, doc, status, complaint):
    code, reply, _ = await rest.call("POST", "/v2/models/digits/infer", json=doc)
    assert code == status
    assert complaint in reply["error"]


async def test_a_body_that_is_not_json_is_400(rest):
    code, reply, _ = await rest.call("POST", "/v2/models/digits/infer", data=b"\xff{")
    assert code == 400 and "not valid JSON" in reply["error"]


async def test_an_unknown_model_is_404_and_not_ready(rest):
    code, reply, _ = await rest.call("POST", "/v2/models/nope/infer", json=infer_doc())
    assert code == 404 and "nope" in reply["error"]
    code, reply, _ = await rest.call("GET", "/v2/models/nope/ready")
    assert code == 400 and reply["ready"] is False


async def test_a_body_over_the_limit_is_413_naming_the_setting():
    async with Rest(Authorizer(None), max_body_bytes=1024) as small:
        code, reply, _ = await small.call("POST", "/v2/models/digits/infer", data=b"x" * 4096)
    assert code == 413 and "MAAS_INFERENCE_HTTP_MAX_BODY_BYTES" in reply["error"]


async def post_until_closed(port: int, length: int, sent: bytes) -> tuple[bytes, dict[str, Any]]:
    """A POST declaring ``length`` bytes of which it sends ``sent``; the answer's head and JSON
    body, read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (length, sent)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=30)  # read() ends at the close
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


async def test_a_declared_length_over_the_limit_is_413_before_any_body_is_read():
    async with Rest(Authorizer(None), max_body_bytes=1024) as small:
        head, reply = await post_until_closed(small.http.port, 10**12, b"{}")
    assert head.startswith(b"HTTP/1.1 413")
    assert "Content-Length 1000000000000 is over 1024 bytes" in reply["error"]


async def test_a_body_that_stops_arriving_is_408_and_the_connection_is_closed():
    async with Rest(Authorizer(None), body_timeout_s=0.3) as slow:
        head, reply = await post_until_closed(slow.http.port, 100, b'{"inputs"')
    assert head.startswith(b"HTTP/1.1 408")
    assert "MAAS_INFERENCE_HTTP_BODY_TIMEOUT_S" in reply["error"]


async def test_a_client_that_leaves_mid_body_is_counted_cancelled_and_logs_no_traceback(
    rest, caplog
):
    _, writer = await asyncio.open_connection("127.0.0.1", rest.http.port)
    writer.write(
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"inputs"'
    )
    await writer.drain()
    writer.close()
    requests = rest.metrics.requests
    for _ in range(200):  # the handler sees the close within a few loop turns
        if requests.labels("http ModelInfer", "CANCELLED")._value.get():
            break
        await asyncio.sleep(0.01)
    assert requests.labels("http ModelInfer", "CANCELLED")._value.get() == 1
    assert requests.labels("http ModelInfer", "INTERNAL")._value.get() == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a line over aiohttp's limit
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 12\r\n\r\nnot gzipped!",  # refused, then raised again while drained
    ],
    ids=["long-url", "long-header", "bad-gzip"],
)
async def test_a_clients_protocol_garbage_is_answered_and_logged_in_one_info_line(
    rest, caplog, request_bytes
):
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection("127.0.0.1", rest.http.port)
    writer.write(request_bytes)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), timeout=30)
    writer.close()
    await asyncio.sleep(0.2)  # aiohttp logs after it answered
    assert answer.split(b"\r\n")[0].split()[1] == b"400"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert all("\n" not in r.getMessage() for r in caplog.records if r.name == "aiohttp.server")


async def test_a_connection_whose_headers_never_complete_is_closed_after_the_idle_timeout():
    async with Rest(Authorizer(None), idle_timeout_s=0.3) as slow:
        reader, writer = await asyncio.open_connection("127.0.0.1", slow.http.port)
        writer.write(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)
        writer.close()
    assert answer == b""  # closed, nothing said: there was no request to answer


def test_a_timeout_that_is_not_positive_is_refused_naming_its_setting():
    with pytest.raises(InvalidArgument, match="MAAS_INFERENCE_HTTP_BODY_TIMEOUT_S=0"):
        HttpServer("127.0.0.1:0", body_timeout_s=0)


@pytest.mark.parametrize(
    "listen", ["127.0.0.1", "127.0.0.1:99999", "127.0.0.1:²", ":" + "9" * 5000]
)
def test_a_listen_address_without_a_port_in_range_is_refused_naming_its_setting(listen):
    with pytest.raises(InvalidArgument, match="MAAS_INFERENCE_HTTP_LISTEN=.* from 0 to 65535"):
        HttpServer(listen)


async def test_json_over_its_own_limit_is_413_while_binary_data_of_that_size_passes():
    x = np.random.default_rng(4).standard_normal((400, 4)).astype(np.float32)
    async with Rest(Authorizer(None), max_json_bytes=4096) as small:
        code, reply, _ = await small.call("POST", "/v2/models/digits/infer", json=infer_doc(x))
        assert code == 413 and "MAAS_INFERENCE_HTTP_MAX_JSON_BYTES=4096" in reply["error"]
        header = json.dumps(
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [400, 4],
                         "parameters": {"binary_data_size": x.nbytes}}]}
        ).encode()  # fmt: skip
        code, _, _ = await small.call(
            "POST",
            "/v2/models/digits/infer",
            data=header + x.tobytes(),
            headers={HEADER_LENGTH: str(len(header))},
        )
        assert code == 200 and x.nbytes > 4096


async def test_a_request_parameter_of_a_triton_feature_this_server_lacks_is_400(rest):
    doc = infer_doc()
    doc["parameters"] = {"sequence_id": 7}
    code, reply, _ = await rest.call("POST", "/v2/models/digits/infer", json=doc)
    assert code == 400 and "sequence_id" in reply["error"]


@pytest.mark.parametrize("length", ["²", "9" * 5000, "-1", "10"])
async def test_a_json_length_header_that_is_not_a_length_within_the_body_is_400(rest, length):
    code, reply, _ = await rest.call(
        "POST", "/v2/models/digits/infer", data=b"{}", headers={HEADER_LENGTH: length}
    )
    assert code == 400 and HEADER_LENGTH in reply["error"]


async def test_json_nested_deeper_than_the_server_reads_is_400(rest):
    deep = b"[" * 100_000 + b"]" * 100_000
    code, reply, _ = await rest.call("POST", "/v2/models/digits/infer", data=deep)
    assert code == 400 and "nests JSON" in reply["error"]


@pytest.mark.parametrize("coding", ["br", "foo", "gzip, br"])
async def test_a_body_in_an_encoding_the_server_cannot_decode_is_400_naming_it(rest, coding):
    # An unknown coding was handed over as is, and a plain JSON body under it was answered.
    headers = {"Content-Encoding": coding}
    code, reply, _ = await rest.call(
        "POST", "/v2/models/digits/infer", data=json.dumps(infer_doc()).encode(), headers=headers
    )
    assert code == 400 and f"Content-Encoding {coding!r} is not one" in reply["error"]


async def test_a_large_json_request_is_parsed_off_the_loop_and_answered(rest):
    x = np.random.default_rng(3).standard_normal((5_000, 4)).astype(np.float32)
    body = json.dumps(infer_doc(x)).encode()
    assert len(body) > THREADED_PARSE_BYTES
    code, reply, _ = await rest.call("POST", "/v2/models/digits/infer", data=body)
    assert code == 200 and reply["outputs"][0]["shape"][0] == 5_000


async def test_a_large_json_answer_is_encoded_off_the_loop(rest, monkeypatch):
    encoded_on: list[str] = []
    encode = rest_codec.encode_response

    def recording(*args, **kwargs):
        encoded_on.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(rest_codec, "encode_response", recording)
    small = await rest.call("POST", "/v2/models/digits/infer", json=infer_doc())
    rows = THREADED_PARSE_BYTES // (MLP["num_classes"] * JSON_CHARS_A_VALUE) + 1
    x = np.zeros((rows, 4), np.float32)
    large = await rest.call("POST", "/v2/models/digits/infer", json=infer_doc(x))
    assert small[0] == large[0] == 200
    assert encoded_on[0] == threading.main_thread().name != encoded_on[1]


def test_numbers_written_slice_by_slice_read_back_as_one_json_document(monkeypatch):
    monkeypatch.setattr(rest_codec, "JSON_SLICE_VALUES", 3)  # many slices, a ragged last one
    x = np.arange(20, dtype=np.float32).reshape(4, 5) / 7
    body = encode_response({"model_name": "m", "id": "r"}, [("y", x), ("n", x[:0])], set())
    doc = json.loads(body.data)
    assert doc["model_name"] == "m" and doc["id"] == "r"
    assert doc["outputs"][0] == {
        "name": "y", "datatype": "FP32", "shape": [4, 5], "data": x.ravel().tolist()
    }  # fmt: skip
    assert doc["outputs"][1]["data"] == []


async def test_a_path_no_route_serves_is_404_with_a_json_error_naming_it(rest):
    status, doc, _ = await rest.call("POST", "/v2/models//infer", json=infer_doc())
    assert status == 404 and "'/v2/models//infer'" in doc["error"]


async def test_a_number_of_more_digits_than_python_reads_is_400_without_pythons_advice(rest):
    body = b'{"inputs": ' + b"9" * 5000 + b"}"
    status, doc, _ = await rest.call("POST", "/v2/models/digits/infer", data=body)
    assert status == 400
    assert "a whole number of more than 4300 digits" in doc["error"]
    assert "sys.set_int_max_str_digits" not in doc["error"]


async def test_a_404_lists_the_endpoints_the_server_has(rest):
    _, doc, _ = await rest.call("GET", "/v2/modelz")
    assert "the endpoints are " in doc["error"]
    assert "/v2/health/ready" in doc["error"] and "/v2/models/{name}/infer" in doc["error"]


async def test_a_method_the_route_does_not_take_is_405_saying_which_it_takes(rest):
    async with rest.session.request("DELETE", "/v2/models/digits/infer") as response:
        doc = await response.json()
        assert response.status == 405 and response.headers["Allow"] == "POST"
    assert "DELETE" in doc["error"] and "POST" in doc["error"]


async def test_metadata_config_and_statistics_describe_the_model(rest):
    code, meta, _ = await rest.call("GET", "/v2/models/digits")
    assert code == 200 and meta["inputs"][0] == {
        "name": "input",
        "datatype": "FP32",
        "shape": [-1, 4],
    }
    code, config, _ = await rest.call("GET", "/v2/models/digits/config")
    assert code == 200 and (config["max_batch_size"], config["input"][0]["dims"]) == (8, [4])
    await rest.call("POST", "/v2/models/digits/infer", json=infer_doc())
    code, stats, _ = await rest.call("GET", "/v2/models/digits/stats")
    (entry,) = stats["model_stats"]
    assert (entry["name"], entry["inference_count"]) == ("digits", 2)
    code, every, _ = await rest.call("GET", "/v2/models/stats")
    assert [s["name"] for s in every["model_stats"]] == ["digits"]


async def test_the_repository_index_lists_loaded_and_known_models(rest):
    code, index, _ = await rest.call("POST", "/v2/repository/index")
    assert code == 200 and [(m["name"], m["state"]) for m in index] == [("digits", "UNAVAILABLE")]
    assert (await rest.call("POST", "/v2/repository/models/digits/load"))[0] == 200
    code, index, _ = await rest.call("POST", "/v2/repository/index", json={"ready": True})
    assert [(m["name"], m["version"], m["state"]) for m in index] == [("digits", "1", "READY")]


async def test_a_load_asking_to_override_the_config_is_refused_and_a_version_is_loaded(rest):
    override = {"parameters": {"config": '{"max_batch_size": 1}'}}
    code, reply, _ = await rest.call("POST", "/v2/repository/models/digits/load", json=override)
    assert code == 400 and "no config or file overrides" in reply["error"]
    asked = {"parameters": {"version": "1"}}
    assert (await rest.call("POST", "/v2/repository/models/digits/load", json=asked))[0] == 200
    code, index, _ = await rest.call("POST", "/v2/repository/index", json={"ready": True})
    assert [(m["name"], m["version"]) for m in index] == [("digits", "1")]


async def test_requests_are_counted_by_route_and_code(rest):
    await rest.call("POST", "/v2/models/digits/infer", json=infer_doc())
    await rest.call("POST", "/v2/models/nope/infer", json=infer_doc())
    requests = rest.metrics.requests
    assert requests.labels("http ModelInfer", "OK")._value.get() == 1
    assert requests.labels("http ModelInfer", "NOT_FOUND")._value.get() == 1


def token_checker(tmp_path) -> Authorizer:
    table = tmp_path / "tokens.json"
    entry = {"identity": "t", "role": "read", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}
    table.write_text(json.dumps({"format": "maas.tokens/1", "tokens": [entry]}))
    return Authorizer.from_settings(Settings().replace(auth=True, auth_tokens_file=str(table)))


async def test_with_auth_on_the_token_is_checked_and_health_stays_open(tmp_path):
    async with Rest(token_checker(tmp_path)) as secured:
        assert (await secured.call("GET", "/v2/health/ready"))[0] == 200
        code, reply, _ = await secured.call("POST", "/v2/models/digits/infer", json=infer_doc())
        assert code == 401 and "authorization" in reply["error"]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        code, _, _ = await secured.call(
            "POST", "/v2/models/digits/infer", json=infer_doc(), headers=auth
        )
        assert code == 200
        code, reply, _ = await secured.call(
            "POST", "/v2/repository/models/digits/unload", headers=auth
        )
        assert code == 403 and "write" in reply["error"]
        twice = CIMultiDict([("Authorization", f"Bearer {TOKEN}")] * 2)
        code, reply, _ = await secured.call(
            "POST", "/v2/models/digits/infer", json=infer_doc(), headers=twice
        )
        assert code == 401 and "2 'authorization' entries" in reply["error"]


async def expect_continue(port: int, path: bytes, headers: bytes) -> bytes:
    """Sends a POST's head with ``headers`` (an ``Expect``) and returns the server's answer: an
    interim ``100 Continue`` invites the body (held back until then, as curl does for a large
    upload), and the final answer's head follows it."""
    body = json.dumps(infer_doc()).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    if answer.startswith(b"HTTP/1.1 100"):
        writer.write(body)
        await writer.drain()
        answer += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    writer.close()
    return answer


INFER = b"/v2/models/digits/infer"
EXPECT = b"Expect: 100-continue\r\n"


async def test_expect_100_continue_is_refused_without_a_token_before_the_body_is_sent(tmp_path):
    async with Rest(token_checker(tmp_path)) as secured:
        answer = await expect_continue(secured.http.port, INFER, EXPECT)
    assert answer.startswith(b"HTTP/1.1 401")


async def test_expect_100_continue_with_a_token_invites_the_body_and_answers_it(tmp_path):
    auth = b"Authorization: Bearer %s\r\n" % TOKEN.encode()
    async with Rest(token_checker(tmp_path)) as secured:
        answer = await expect_continue(secured.http.port, INFER, auth + EXPECT)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")


async def test_expect_100_continue_with_a_length_over_the_limit_is_413_uninvited():
    async with Rest(Authorizer(None), max_body_bytes=64) as small:
        answer = await expect_continue(small.http.port, INFER, EXPECT)
    assert answer.startswith(b"HTTP/1.1 413")


async def test_an_expectation_other_than_100_continue_is_417(rest):
    answer = await expect_continue(rest.http.port, INFER, b"Expect: 200-ok\r\n")
    assert answer.startswith(b"HTTP/1.1 417")


async def test_the_openai_routes_refuse_expect_100_continue_without_a_token(tmp_path):
    http = HttpServer("127.0.0.1:0")
    # The refusal comes before any handler, so no generator is needed behind the routes.
    http.add(OpenAIRoutes(generators=None, authorize=bearer_auth(token_checker(tmp_path))))
    await http.start()
    try:
        answer = await expect_continue(http.port, b"/v1/completions", EXPECT)
    finally:
        await http.stop()
    assert answer.startswith(b"HTTP/1.1 401")
