"""The Open Inference Protocol over HTTP/REST (KServe v2 / Triton), on the same dataplane as gRPC.

Routes (a model path is ``/v2/models/{name}`` or ``/v2/models/{name}/versions/{version}``):

    GET  /v2/health/live, /v2/health/ready        200 or 503; open, like gRPC health
    GET  /v2                                      server metadata
    GET  {model}, {model}/ready                   model metadata; readiness (200 or 400)
    POST {model}/infer                            JSON tensors, or Triton's binary extension
    GET  {model}/config, {model}/stats            Triton model config; statistics
    GET  /v2/models/stats                         statistics of every loaded version
    POST /v2/repository/index                     {"ready": bool} -> loaded and known models
    POST /v2/repository/models/{name}/load|unload

Every other route needs the same bearer token as gRPC (``Authorization: Bearer <token>``) with
the role of the gRPC method it mirrors. Errors are ``{"error": message}`` with the HTTP status
of the ``MaasError``; anything unexpected is 500 carrying only a request id, as over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from maas.edge import Authorizer, failure
from maas.errors import InvalidArgument
from maas.oip import grpc_predict_v2_pb2 as pb
from services.inference import rest_codec
from services.inference.dataplane import DataPlane
from services.inference.describe import (
    message_json,
    model_config,
    model_metadata,
    model_statistics,
    repository_index,
    server_metadata,
)
from services.inference.http_app import (
    HTTP_STATUS,
    authorization_entries,
    check_json_size,
    checked_expect,
    off_loop_if_large,
    read_body,
    too_large,
)
from services.inference.interceptors import metrics_observer
from services.inference.metrics import Metrics
from services.inference.served import ServedModel
from services.inference.tensors import check_load_parameters

SERVICE = "/inference.GRPCInferenceService/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(doc, separators=(",", ":")).encode(),
        status=status,
        content_type=rest_codec.JSON_TYPE,
    )


class OipRestRoutes:
    """The handlers; ``add_to(app)`` registers them on the server's aiohttp application."""

    prefix = "/v2"

    def __init__(self, plane: DataPlane, authorizer: Authorizer, metrics: Metrics) -> None:
        self._plane = plane
        self._authorizer = authorizer
        self._observe = metrics_observer(metrics)

    def error_body(self, message: str, status: int) -> dict[str, Any]:
        return {"error": message}

    def add_to(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/v2/health/live", self.live)
        router.add_get("/v2/health/ready", self.ready)
        router.add_get("/v2", self._guard(self.server_metadata, "ServerMetadata"))
        # Before /v2/models/{name}: "stats" is not a model name here.
        router.add_get("/v2/models/stats", self._guard(self.stats, "ModelStatistics"))
        self._add_post(router, "/v2/repository/index", self.index, "RepositoryIndex")
        for action, verb in (("load", "RepositoryModelLoad"), ("unload", "RepositoryModelUnload")):
            path = f"/v2/repository/models/{{name}}/{action}"
            self._add_post(router, path, getattr(self, action), verb)
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            router.add_get(model, self._guard(self.metadata, "ModelMetadata"))
            router.add_get(f"{model}/ready", self._guard(self.model_ready, "ModelReady"))
            self._add_post(router, f"{model}/infer", self.infer, "ModelInfer")
            router.add_get(f"{model}/config", self._guard(self.config, "ModelConfig"))
            router.add_get(f"{model}/stats", self._guard(self.stats, "ModelStatistics"))

    # --- the edge: auth, errors, metrics ----------------------------------------------------

    def _add_post(
        self, router: web.UrlDispatcher, path: str, handler: Handler, method: str
    ) -> None:
        def check(request: web.Request) -> object:
            return self._authorizer.authorize(SERVICE + method, authorization_entries(request))

        expect = checked_expect(check, lambda message, _status: {"error": message})
        router.add_post(path, self._guard(handler, method), expect_handler=expect)

    def _guard(self, handler: Handler, method: str) -> Handler:
        full = SERVICE + method
        label = f"http {method}"

        async def guarded(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._authorizer.authorize(full, authorization_entries(request))
                return await handler(request)
            except web.HTTPRequestEntityTooLarge as exc:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                return _json({"error": too_large(exc)}, 413)
            except web.HTTPRequestTimeout:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                raise  # the listener answers it, and closes the connection
            except asyncio.CancelledError:  # the client left (``handler_cancellation``)
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message = failure(exc, label)
                return _json({"error": message}, HTTP_STATUS.get(code.name, 500))
            finally:
                self._observe(label, code, time.perf_counter() - started)

        return guarded

    # --- health and metadata ----------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._plane.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(server_metadata()))

    async def metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(model_metadata(await self._model(request))))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _ref(request)
        ready = await self._plane.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 400)

    async def config(self, request: web.Request) -> web.Response:
        model = await self._model(request)
        return _json(message_json(model_config(model, model.batching, self._plane.instances)))

    async def stats(self, request: web.Request) -> web.Response:
        if "name" in request.match_info:
            models = [await self._model(request)]
        else:
            models = self._plane.loaded()
        reply = pb.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in models])
        return _json(message_json(reply))

    async def _model(self, request: web.Request) -> ServedModel:
        return await self._plane.model(*_ref(request))

    # --- repository -------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("'ready' must be true or false")
        entries = repository_index(await self._plane.catalogue(ready_only=ready))
        return _json([message_json(m) for m in entries.models])

    async def load(self, request: web.Request) -> web.Response:
        body = await _optional_json(request)
        if set(body) - {"parameters"}:
            raise InvalidArgument("a load request's body holds only 'parameters'")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidArgument("'parameters' must be an object")
        check_load_parameters(parameters)
        version = parameters.get("version", "")
        if isinstance(version, bool) or not isinstance(version, str | int):
            raise InvalidArgument("parameter 'version' must be a string or a whole number")
        await self._plane.model(request.match_info["name"], str(version))
        return _json({})

    async def unload(self, request: web.Request) -> web.Response:
        self._plane.unload(request.match_info["name"])
        return _json({})

    # --- inference --------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _ref(request)
        body = await read_body(request)
        json_bytes = rest_codec.json_length(body, request.headers.get(rest_codec.HEADER_LENGTH))
        check_json_size(request, json_bytes)

        def decode() -> rest_codec.InferRequest:
            return rest_codec.decode_request(*rest_codec.split_body(body, json_bytes))

        parsed = await off_loop_if_large(len(body), decode)
        result = await self._plane.infer(name, version, parsed.inputs, parsed.requested)
        outputs = result.outputs
        binary_names = set(outputs) if parsed.binary_all and not parsed.requested else parsed.binary
        header = {"model_name": result.model.name, "model_version": result.model.version_text}
        if parsed.id:
            header["id"] = parsed.id
        answered = [(n, outputs[n]) for n in parsed.requested or outputs]
        # JSON spells a float in ~10-20 characters: a 45 KB request whose 40 MB answer was
        # encoded here held every other request, gRPC's too, for 1.3 s.
        json_size = JSON_CHARS_A_VALUE * sum(a.size for n, a in answered if n not in binary_names)
        reply = await off_loop_if_large(
            json_size, lambda: rest_codec.encode_response(header, answered, binary_names)
        )
        return web.Response(body=reply.data, content_type=reply.content_type, headers=reply.headers)


JSON_CHARS_A_VALUE = 10  # about, for a response's size before it is encoded


def _ref(request: web.Request) -> tuple[str, str]:
    return request.match_info["name"], request.match_info.get("version", "")


async def _optional_json(request: web.Request) -> dict[str, Any]:
    body = await read_body(request)
    if not body.strip():
        return {}
    check_json_size(request, len(body))
    doc, _ = rest_codec.split_body(body, len(body))
    return doc
