"""TLS on the gRPC APIs from config, with a CA and a server certificate this test generates
(openssl CLI): the real registry and inference processes serve TLS only, the registry client,
inference's own registry client and `maas predict` connect over it, and a client that does not
trust the CA (or speaks plaintext) gets nowhere. The inference HTTP API serves HTTPS only, with
the same certificate: the openai client and urllib reach it, plain HTTP does not."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.proc import free_port
from infra.stack import PythonService
from maas import zoo
from maas.config import Settings
from maas.edge import client_token, open_sync_channel
from maas.errors import Unavailable
from maas.registry import RegistryClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MLP = {"in_features": 8, "hidden": [4], "num_classes": 3}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip


def make_server_cert(directory: Path, ca: str) -> None:
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
        cwd=directory,
    )  # fmt: skip


@dataclass
class TlsPlatform:
    settings: Settings  # a client trusting the test CA
    certs: Path
    http: str  # host:port of inference's HTTP API


def tls_serving(settings: Settings, addr: str) -> bool:
    with open_sync_channel(settings, addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except Exception:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def tls(stack, tmp_path_factory) -> Iterator[TlsPlatform]:
    workdir = tmp_path_factory.mktemp("tls")
    make_ca(workdir, "ca")
    make_ca(workdir, "other-ca")
    make_server_cert(workdir, "ca")
    registry_port, inference_port, http_port = free_port(), free_port(), free_port()
    registry, inference = f"127.0.0.1:{registry_port}", f"127.0.0.1:{inference_port}"
    tls_env = {
        "MAAS_GRPC_TLS": "true",
        "MAAS_TLS_CERT_FILE": str(workdir / "server.pem"),
        "MAAS_TLS_KEY_FILE": str(workdir / "server.key"),
        "MAAS_TLS_CA_FILE": str(workdir / "ca.pem"),
        "MAAS_REGISTRY_ADDR": registry,
    }
    settings = stack.settings.replace(
        grpc_tls=True,
        tls_ca_file=str(workdir / "ca.pem"),
        registry_addr=registry,
        inference_addr=inference,
    )
    started = [
        PythonService(
            "registry-tls",
            "services.model_registry",
            "127.0.0.1",
            registry_port,
            workdir,
            {**tls_env, "MAAS_REGISTRY_LISTEN": registry, "MAAS_STATE_DIR": str(workdir / "r")},
            health=lambda: tls_serving(settings, registry),
        ),
        PythonService(
            "inference-tls",
            "services.inference",
            "127.0.0.1",
            inference_port,
            workdir,
            {
                **tls_env,
                "MAAS_INFERENCE_LISTEN": inference,
                "MAAS_INFERENCE_HTTP_LISTEN": f"127.0.0.1:{http_port}",
                "MAAS_INFERENCE_METRICS_PORT": "0",
            },
            health=lambda: tls_serving(settings, inference),
        ),
    ]
    try:
        for service in started:
            service.start(wait=False)
            deadline = time.monotonic() + 10  # until exec'd, the marker is not in its cmdline
            while not service.process.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            service.wait_ready(timeout_s=120)
        yield TlsPlatform(settings, workdir, f"127.0.0.1:{http_port}")
    finally:
        for service in reversed(started):
            service.stop()


async def test_a_registration_round_trips_over_tls(tls):
    name = f"tls-{uuid.uuid4().hex[:8]}"
    model = zoo.build("mlp", MLP, seed=4).eval()
    async with RegistryClient(tls.settings) as registry:
        registered = await registry.register(model, name, "mlp", MLP, alias="production")
        loaded = await registry.load(f"{name}@production")
    assert registered.version == 1
    assert all(
        (a == b).all()
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


async def test_a_client_that_does_not_trust_the_ca_or_speaks_plaintext_gets_nowhere(tls):
    strangers = [
        tls.settings.replace(tls_ca_file=str(tls.certs / "other-ca.pem")),
        tls.settings.replace(grpc_tls=False),
    ]
    for settings in strangers:
        async with RegistryClient(settings) as registry:
            with pytest.raises(Unavailable):
                await registry.list_models()


def test_maas_predict_reaches_inference_over_tls_and_inference_its_registry(tls):
    """The CLI (TLS + token) -> inference (TLS) -> its registry client (TLS) -> registry."""
    import asyncio

    name = f"tls-{uuid.uuid4().hex[:8]}"

    async def register() -> None:
        async with RegistryClient(tls.settings) as registry:
            await registry.register(
                zoo.build("mlp", MLP, seed=5), name, "mlp", MLP, alias="production"
            )

    asyncio.run(register())
    env = {
        **os.environ,
        "MAAS_GRPC_TLS": "true",
        "MAAS_TLS_CA_FILE": tls.settings.tls_ca_file,
        "MAAS_INFERENCE_ADDR": tls.settings.inference_addr,
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maas.cli",
            "predict",
            name,
            "--input",
            json.dumps(np.ones((1, 8)).tolist()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["output"]["shape"] == [1, 3]


def https_get(url: str, ca_file: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, context=context, timeout=10) as reply:
        return int(reply.status)


def test_the_http_api_serves_https_with_the_same_certificate(tls):
    assert https_get(f"https://{tls.http}/v2/health/ready", tls.certs / "ca.pem") == 200


def test_the_http_api_has_no_plaintext_door_and_a_stranger_ca_fails(tls):
    # Plain HTTP gets one answer, in plain HTTP: a refusal saying to use https.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{tls.http}/v2/health/ready", timeout=10)
    assert refused.value.code == 400
    assert "use an https:// URL" in json.loads(refused.value.read())["error"]
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https_get(f"https://{tls.http}/v2/health/ready", tls.certs / "other-ca.pem")


def test_the_openai_client_lists_models_over_https_with_a_bearer_token(tls):
    import openai

    token = client_token(tls.settings)
    assert token, "the stack writes the operator's token"
    client = openai.OpenAI(
        base_url=f"https://{tls.http}/v1",
        api_key=token,
        max_retries=0,
        timeout=30,
        http_client=openai.DefaultHttpxClient(
            verify=ssl.create_default_context(cafile=str(tls.certs / "ca.pem"))
        ),
    )
    with client:
        assert client.models.list().object == "list"


def test_the_openai_client_given_an_http_url_is_told_to_use_https(tls):
    import openai

    client = openai.OpenAI(
        base_url=f"http://{tls.http}/v1", api_key="any", max_retries=0, timeout=30
    )
    with client, pytest.raises(openai.BadRequestError) as refused:
        client.models.list()
    assert "use an https:// URL" in refused.value.message
