"""Assembly of the inference server: gRPC (OIP + health), metrics over HTTP, registry events.

``InferenceServer.start()`` binds, starts consuming ``maas.models.v1`` from the latest offset in
a consumer group of its own (every replica must see every alias move), and only then reports
ready, so an alias moved after readiness is never missed. ``stop()`` stops accepting, lets
in-flight calls finish within the grace period, then releases the workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from maas import cpus, events, topics
from maas.bus import EventProducer, Record
from maas.bus_consumer import EventConsumer
from maas.config import Settings
from maas.edge import Authorizer, add_port, serve_reflection, server_options
from maas.edge.tls import server_ssl_context
from maas.errors import InvalidArgument
from maas.liveness import Liveness
from maas.oip import grpc_predict_v2_pb2 as pb
from services.inference.admission import InflightBytes
from services.inference.batcher import BatchingConfig
from services.inference.dataplane import DataPlane
from services.inference.generation import Generators
from services.inference.http_app import HttpServer
from services.inference.interceptors import ErrorMappingInterceptor
from services.inference.kafka_stream import InferenceStream
from services.inference.loading import ModelSource
from services.inference.metrics import Metrics
from services.inference.openai_http import OpenAIRoutes, bearer_auth
from services.inference.rest import OipRestRoutes
from services.inference.servicer import SERVICE, InferenceServicer, add_to_server

log = logging.getLogger(__name__)

OIP_SERVICE = "inference.GRPCInferenceService"


def batching_of(settings: Settings) -> BatchingConfig:
    if settings.inference_max_batch_size < 1 or settings.inference_max_queue_delay_us < 0:
        raise InvalidArgument(
            "MAAS_INFERENCE_MAX_BATCH_SIZE must be >= 1 and MAAS_INFERENCE_MAX_QUEUE_DELAY_US "
            f">= 0; got {settings.inference_max_batch_size} and "
            f"{settings.inference_max_queue_delay_us}"
        )
    return BatchingConfig(
        max_batch_size=settings.inference_max_batch_size,
        max_queue_delay_us=settings.inference_max_queue_delay_us,
    )


def build_grpc_server(
    settings: Settings,
    plane: DataPlane,
    metrics: Metrics,
    health_servicer: health_pb2_grpc.HealthServicer,
    generators: Generators | None = None,
) -> grpc.aio.Server:
    """The OIP, health and reflection server behind the edge (auth unless MAAS_AUTH=off, status
    mapping; health and reflection open, so grpcurl-style clients can discover the API)."""
    edge = ErrorMappingInterceptor(metrics, Authorizer.from_settings(settings))
    server = grpc.aio.server(interceptors=[edge], options=server_options(settings))
    add_to_server(InferenceServicer(plane, generators), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # The OIP messages live in a descriptor pool of their own (maas.protogen: tritonclient's
    # copies of the same files may share the process); reflection describes from that pool.
    serve_reflection(server, (SERVICE, health.SERVICE_NAME), pool=pb.DESCRIPTOR.pool)
    return server


def decode_cpus(settings: Settings) -> cpus.Reservation | None:
    """The CPUs MAAS_INFERENCE_DECODE_CPUS reserves for decode processes, checked."""
    reservation = cpus.reserve(settings.inference_decode_cpus, "MAAS_INFERENCE_DECODE_CPUS")
    if reservation is not None and not settings.inference_decode_process:
        raise InvalidArgument(
            "MAAS_INFERENCE_DECODE_CPUS reserves CPUs for decode processes, but "
            "MAAS_INFERENCE_DECODE_PROCESS=false decodes in threads of the server: set one of them"
        )
    return reservation


class InferenceServer:
    def __init__(self, settings: Settings, source: ModelSource) -> None:
        if settings.inference_workers < 1 or settings.inference_torch_threads < 1:
            raise InvalidArgument(
                f"MAAS_INFERENCE_WORKERS={settings.inference_workers} and "
                f"MAAS_INFERENCE_TORCH_THREADS={settings.inference_torch_threads}; both must be "
                "at least 1"
            )
        self._settings = settings
        self.metrics = Metrics()
        # Parallelism comes from the worker count; torch's own intra-op threads on top of that
        # would oversubscribe the cores (and slow batch-1 forwards down).
        torch.set_num_threads(settings.inference_torch_threads)
        self._executor = ThreadPoolExecutor(
            max_workers=settings.inference_workers,
            thread_name_prefix="maas-infer",
            initializer=torch.set_num_threads,
            initargs=(settings.inference_torch_threads,),
        )
        self.plane = DataPlane(
            source,
            self._executor,
            batching=batching_of(settings),
            cache_bytes=settings.inference_cache_bytes,
            metrics=self.metrics,
            inline_forward_us=settings.inference_inline_forward_us,
            instances=settings.inference_workers,
            wait_s=settings.inference_load_wait_s,
            inflight=InflightBytes(settings.inference_max_inflight_bytes),
            max_answer_bytes=settings.grpc_max_message_bytes,
        )
        self._health = health.aio.HealthServicer()
        self.cpu_reservation = decode_cpus(settings)
        # Generative models: one decode engine per version, shared by gRPC and HTTP.
        self.generators = Generators(
            self.plane,
            slots=settings.inference_generation_slots,
            registry=self.metrics.registry,
            isolated=settings.inference_decode_process,
            cpus=self.cpu_reservation.reserved if self.cpu_reservation is not None else frozenset(),
        )
        self._server = build_grpc_server(
            settings, self.plane, self.metrics, self._health, self.generators
        )
        self.http = self._http_server(settings)
        self._producer = EventProducer(settings, client_id="maas-inference")
        self._consumer = EventConsumer(
            settings,
            topics=[topics.MODELS],
            group_id=f"maas-inference-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            handler=self._on_record,
            producer=self._producer,
            expected_schemas=[events.MODEL],
            auto_offset_reset="latest",
        )
        self._consume_task: asyncio.Task[None] | None = None
        # Requests from maas.infer.v1 (MAAS_INFERENCE_STREAM), on the same data plane.
        self.stream = (
            InferenceStream(settings, self.plane, self.metrics)
            if settings.inference_stream
            else None
        )
        self._stream_task: asyncio.Task[None] | None = None
        # Without the models consumer alias moves stop arriving: then say NOT_SERVING, and why.
        self.liveness = Liveness(self.metrics.registry, on_change=self._not_serving)
        self.liveness.dependencies.add_kafka_and_s3(self._producer, settings)
        self.port = 0

    def _http_server(self, settings: Settings) -> HttpServer | None:
        if not settings.inference_http_listen:
            return None
        http = HttpServer(
            settings.inference_http_listen,
            max_body_bytes=settings.inference_http_max_body_bytes,
            max_json_bytes=settings.inference_http_max_json_bytes,
            body_timeout_s=settings.inference_http_body_timeout_s,
            idle_timeout_s=settings.inference_http_idle_timeout_s,
            # The same bearer tokens arrive here as over gRPC: with TLS on, no plaintext door.
            ssl_context=server_ssl_context(settings) if settings.grpc_tls else None,
        )
        authorizer = Authorizer.from_settings(settings)
        http.add(OipRestRoutes(self.plane, authorizer, self.metrics))
        http.add(OpenAIRoutes(self.generators, bearer_auth(authorizer)))
        return http

    async def _not_serving(self, why: str | None) -> None:
        self.plane.ready = False
        for service in ("", OIP_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _on_record(self, record: Record) -> None:
        await self.plane.on_model_event(record.event)

    async def start(self) -> None:
        listen = self._settings.inference_listen
        self.port = add_port(self._server, listen, self._settings, "MAAS_INFERENCE_LISTEN")
        await self._server.start()
        if self.http is not None:
            await self.http.start()
        await self._producer.start()
        await self._consumer.start()
        await self._consumer.wait_assigned()
        self._consume_task = asyncio.get_running_loop().create_task(
            self.liveness.supervise("models-consumer", self._consumer.run())
        )
        self.plane.ready = True
        if self.stream is not None:
            await self.stream.start()
            self._stream_task = asyncio.get_running_loop().create_task(
                self.liveness.supervise("infer-stream", self.stream.run())
            )
        for service in ("", OIP_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("inference serving on %s (port %d)", self._settings.inference_listen, self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        self.plane.ready = False
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        if self.http is not None:
            await self.http.stop()
        await self.generators.close()
        if self.stream is not None:
            await self.stream.stop()  # the transaction in progress commits or aborts first
        if self._stream_task is not None:
            self._stream_task.cancel()
            await asyncio.gather(self._stream_task, return_exceptions=True)
        await self._consumer.stop()
        if self._consume_task is not None:
            self._consume_task.cancel()
            await asyncio.gather(self._consume_task, return_exceptions=True)
        await self._producer.stop()
        await self.plane.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
