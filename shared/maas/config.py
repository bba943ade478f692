"""Every setting of the platform, read once from the environment.

The env names here are the contract with docker-compose.yml and docs/OPERATIONS.md: a test checks
that every variable compose sets is one this module knows. Units live in the names
(``_bytes``, ``_ms``, ``_us``) and are converted nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from maas.errors import InvalidArgument

MiB = 1024 * 1024


def _env(name: str, *, secret: bool = False, doc: str = "") -> dict[str, Any]:
    return {"env": name, "secret": secret, "doc": doc}


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "maas")


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "maas")


@dataclass(frozen=True)
class Settings:
    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = field(
        default="127.0.0.1:9092",
        metadata=_env("MAAS_KAFKA_BOOTSTRAP", doc="Kafka bootstrap servers, comma separated"),
    )
    kafka_security_protocol: str = field(
        default="PLAINTEXT",
        metadata=_env(
            "MAAS_KAFKA_SECURITY_PROTOCOL", doc="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
        ),
    )
    kafka_sasl_mechanism: str = field(
        default="SCRAM-SHA-512",
        metadata=_env(
            "MAAS_KAFKA_SASL_MECHANISM",
            doc="with SASL_*: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
        ),
    )
    kafka_sasl_username: str = field(
        default="", metadata=_env("MAAS_KAFKA_SASL_USERNAME", doc="with SASL_*: the user")
    )
    kafka_sasl_password: str = field(
        default="",
        metadata=_env("MAAS_KAFKA_SASL_PASSWORD", secret=True, doc="with SASL_*: the password"),
    )
    kafka_ssl_ca_file: str = field(
        default="",
        metadata=_env(
            "MAAS_KAFKA_SSL_CA_FILE",
            doc="with SSL/SASL_SSL: PEM CA bundle to trust (default: system roots)",
        ),
    )
    kafka_max_message_bytes: int = field(
        default=16 * MiB,
        metadata=_env(
            "MAAS_KAFKA_MAX_MESSAGE_BYTES",
            doc="largest record the broker, producers and consumers accept",
        ),
    )
    event_max_depth: int = field(
        default=32,
        metadata=_env(
            "MAAS_EVENT_MAX_DEPTH",
            doc="deepest nesting of maps/lists an event may have; deeper ones go to the DLQ",
        ),
    )
    dlq_max_attempts: int = field(
        default=8,
        metadata=_env(
            "MAAS_DLQ_MAX_ATTEMPTS",
            doc="dead-letter writes tried (each waits at most 10 s for the broker's ack; backoff "
            "doubling up to 5 s) before a consumer stops, "
            "keeping the record uncommitted, and its service reports NOT_SERVING",
        ),
    )
    # --- S3 ----------------------------------------------------------------------------------
    s3_endpoint: str = field(
        default="127.0.0.1:9000", metadata=_env("MAAS_S3_ENDPOINT", doc="S3 host:port")
    )
    s3_access_key: str = field(
        default="maas", metadata=_env("MAAS_S3_ACCESS_KEY", secret=True, doc="S3 access key")
    )
    s3_secret_key: str = field(
        default="maas-secret-key",
        metadata=_env("MAAS_S3_SECRET_KEY", secret=True, doc="S3 secret key"),
    )
    s3_secure: bool = field(
        default=False, metadata=_env("MAAS_S3_SECURE", doc="use TLS to reach S3")
    )
    s3_region: str = field(default="us-east-1", metadata=_env("MAAS_S3_REGION", doc="S3 region"))
    s3_part_size_bytes: int = field(
        default=16 * MiB,
        metadata=_env("MAAS_S3_PART_SIZE_BYTES", doc="multipart upload part size"),
    )
    # --- codec -------------------------------------------------------------------------------
    codec_chunk_bytes: int = field(
        default=4 * MiB,
        metadata=_env(
            "MAAS_CODEC_CHUNK_BYTES", doc="tensors larger than this are split into chunks"
        ),
    )
    # --- local state -------------------------------------------------------------------------
    state_dir: str = field(
        default_factory=_default_state_dir,
        metadata=_env("MAAS_STATE_DIR", doc="logs, pids, broker and S3 data, SQLite files"),
    )
    cache_dir: str = field(
        default_factory=_default_cache_dir,
        metadata=_env("MAAS_CACHE_DIR", doc="venv, Kafka jars, S3 server binary"),
    )
    log_level: str = field(default="INFO", metadata=_env("MAAS_LOG_LEVEL", doc="logging level"))
    # --- gRPC endpoints ----------------------------------------------------------------------
    grpc_max_message_bytes: int = field(
        default=256 * MiB,
        metadata=_env(
            "MAAS_GRPC_MAX_MESSAGE_BYTES", doc="gRPC send/receive limit (default 4 MiB is a trap)"
        ),
    )
    registry_listen: str = field(
        default="127.0.0.1:50051",
        metadata=_env("MAAS_REGISTRY_LISTEN", doc="address the registry server binds"),
    )
    registry_addr: str = field(
        default="127.0.0.1:50051",
        metadata=_env("MAAS_REGISTRY_ADDR", doc="address clients use to reach the registry"),
    )
    registry_max_manifest_bytes: int = field(
        default=1 * MiB,
        metadata=_env("MAAS_REGISTRY_MAX_MANIFEST_BYTES", doc="largest manifest.json registered"),
    )
    registry_max_metrics: int = field(
        default=1000,
        metadata=_env("MAAS_REGISTRY_MAX_METRICS", doc="most metrics one manifest may carry"),
    )
    registry_max_reply_bytes: int = field(
        default=3 * MiB,
        metadata=_env(
            "MAAS_REGISTRY_MAX_REPLY_BYTES",
            doc="largest registry reply; list pages (models, versions, alias history) stop short "
            "of it, so clients on gRPC's "
            "default 4 MiB limit always fit",
        ),
    )
    inference_listen: str = field(
        default="127.0.0.1:8001",
        metadata=_env("MAAS_INFERENCE_LISTEN", doc="address the inference server binds"),
    )
    inference_addr: str = field(
        default="127.0.0.1:8001",
        metadata=_env("MAAS_INFERENCE_ADDR", doc="address clients use to reach inference"),
    )
    # --- security of the gRPC APIs (maas.edge) ------------------------------------------------
    auth: bool = field(
        default=True,
        metadata=_env(
            "MAAS_AUTH",
            doc="gRPC APIs require a bearer token with a role (read/write); off only if set "
            "explicitly",
        ),
    )
    auth_tokens_file: str = field(
        default="",
        metadata=_env(
            "MAAS_AUTH_TOKENS_FILE",
            doc="servers: the token table (identity, role, sha256); default "
            "$MAAS_STATE_DIR/auth/tokens.json",
        ),
    )
    auth_token: str = field(
        default="",
        metadata=_env("MAAS_AUTH_TOKEN", secret=True, doc="clients: the bearer token to send"),
    )
    auth_token_file: str = field(
        default="",
        metadata=_env(
            "MAAS_AUTH_TOKEN_FILE",
            doc="clients: file holding the token when MAAS_AUTH_TOKEN is unset; default "
            "$MAAS_STATE_DIR/auth/admin.token",
        ),
    )
    grpc_tls: bool = field(
        default=False,
        metadata=_env("MAAS_GRPC_TLS", doc="gRPC servers and clients use TLS"),
    )
    tls_cert_file: str = field(
        default="",
        metadata=_env("MAAS_TLS_CERT_FILE", doc="servers: PEM certificate chain (with TLS)"),
    )
    tls_key_file: str = field(
        default="",
        metadata=_env("MAAS_TLS_KEY_FILE", doc="servers: PEM private key (with TLS)"),
    )
    tls_ca_file: str = field(
        default="",
        metadata=_env(
            "MAAS_TLS_CA_FILE", doc="clients: PEM CA bundle to trust (default: system roots)"
        ),
    )
    metrics_bind: str = field(
        default="127.0.0.1",
        metadata=_env("MAAS_METRICS_BIND", doc="address the Prometheus /metrics HTTP servers bind"),
    )
    inference_max_batch_size: int = field(
        default=64,
        metadata=_env(
            "MAAS_INFERENCE_MAX_BATCH_SIZE",
            doc="rows per batched forward pass (1 = no dynamic batching)",
        ),
    )
    inference_max_queue_delay_us: int = field(
        default=0,
        metadata=_env(
            "MAAS_INFERENCE_MAX_QUEUE_DELAY_US",
            doc="longest a request waits for more rows (0 = batch only the backlog; "
            "asyncio timers make anything under 1000 act like ~1000)",
        ),
    )
    inference_workers: int = field(
        default=2,
        metadata=_env("MAAS_INFERENCE_WORKERS", doc="threads running forward passes"),
    )
    inference_torch_threads: int = field(
        default=1,
        metadata=_env(
            "MAAS_INFERENCE_TORCH_THREADS",
            doc="torch intra-op threads per forward pass (workers x this ~ cores)",
        ),
    )
    inference_inline_forward_us: int = field(
        # The hand-off to a worker costs 100-400 us of CPU on 2 busy cores, and a small
        # model's forward holds the GIL for most of its time anyway.
        default=500,
        metadata=_env(
            "MAAS_INFERENCE_INLINE_FORWARD_US",
            doc="forwards predicted shorter than this skip the worker hand-off "
            "(0 = always the worker pool)",
        ),
    )
    inference_cache_bytes: int = field(
        default=1024 * MiB,
        metadata=_env("MAAS_INFERENCE_CACHE_BYTES", doc="weights kept loaded (LRU)"),
    )
    inference_http_listen: str = field(
        default="",
        metadata=_env(
            "MAAS_INFERENCE_HTTP_LISTEN",
            doc="host:port of the inference HTTP API (OIP REST /v2/..., OpenAI-compatible "
            "/v1/...); empty = off",
        ),
    )
    inference_generation_slots: int = field(
        default=8,
        metadata=_env(
            "MAAS_INFERENCE_GENERATION_SLOTS",
            doc="streams one generative model version decodes together (its KV-cache rows); "
            "more wait for a free slot",
        ),
    )
    inference_stream: bool = field(
        default=True,
        metadata=_env(
            "MAAS_INFERENCE_STREAM",
            doc="answer requests from maas.infer.v1 on maas.predictions.v1 (or the request's "
            "reply_to), exactly once per request id",
        ),
    )
    inference_metrics_port: int = field(
        default=8002,
        metadata=_env(
            "MAAS_INFERENCE_METRICS_PORT", doc="inference /metrics and /healthz HTTP port (0 = off)"
        ),
    )
    metrics_port: int = field(
        default=0,
        metadata=_env(
            "MAAS_METRICS_PORT",
            doc="/metrics (Prometheus) and /healthz HTTP port of the other services (0 = off)",
        ),
    )
    # --- compressor ----------------------------------------------------------------------------
    compressor_torch_threads: int = field(
        default=1,
        metadata=_env(
            "MAAS_COMPRESSOR_TORCH_THREADS",
            doc="torch intra-op threads for pruning/distilling/measuring (small models "
            "gain nothing from more, and stall on a loaded host)",
        ),
    )
    compressor_max_poll_interval_ms: int = field(
        default=3_600_000,
        metadata=_env(
            "MAAS_COMPRESSOR_MAX_POLL_INTERVAL_MS",
            doc="longest one compress job may run: a jobs consumer busy longer loses its "
            "partitions to another compressor (Kafka's default, 5 min, is shorter than a "
            "distillation)",
        ),
    )
    # --- training (gradient workers, aggregator shards) ----------------------------------
    training_compute_threads: int = field(
        default=1,
        metadata=_env(
            "MAAS_TRAINING_COMPUTE_THREADS",
            doc="threads a gradient worker's torch and a shard's BLAS use (workers x this ~ "
            "cores: on a busy host extra threads spin instead of computing)",
        ),
    )
    member_id: str = field(
        default="",
        metadata=_env(
            "MAAS_MEMBER_ID",
            doc="this worker's or shard's name in the training pool (default: host-pid-random, "
            "new on every start; set it only if it is unique)",
        ),
    )
    member_heartbeat_ms: int = field(
        default=1_000,
        metadata=_env(
            "MAAS_MEMBER_HEARTBEAT_MS",
            doc="how often a gradient worker or aggregator shard says `up` on the control topic",
        ),
    )
    step_deadline_ms: int = field(
        default=10_000,
        metadata=_env(
            "MAAS_STEP_DEADLINE_MS",
            doc="sync step closes after this with whoever reported (job may override)",
        ),
    )
    progress_interval_ms: int = field(
        default=2_000,
        metadata=_env("MAAS_PROGRESS_INTERVAL_MS", doc="job progress status event period"),
    )
    aggregator_listen: str = field(
        default="127.0.0.1:0",
        metadata=_env(
            "MAAS_AGGREGATOR_LISTEN",
            doc="address a shard serves the training data plane (gRPC) on; port 0 picks a free "
            "one (the shard advertises whichever it got)",
        ),
    )
    aggregator_advertise: str = field(
        default="",
        metadata=_env(
            "MAAS_AGGREGATOR_ADVERTISE",
            doc="host:port workers dial for this shard (default: the listen host, or this "
            "host's name when listening on 0.0.0.0, with the bound port)",
        ),
    )
    worker_heartbeat_timeout_ms: int = field(
        default=10_000,
        metadata=_env(
            "MAAS_WORKER_HEARTBEAT_TIMEOUT_MS",
            doc="a pool member silent this long on the control topic is gone (its job goes on "
            "without it), and a worker without a data-plane stream this long is removed from "
            "its job",
        ),
    )
    job_stall_timeout_ms: int = field(
        default=600_000,
        metadata=_env(
            "MAAS_JOB_STALL_TIMEOUT_MS",
            doc="a training job whose shards make no progress this long fails",
        ),
    )
    # --- jobs (checked by the CLI and every service alike) -----------------------------------
    max_model_params: int = field(
        default=100_000_000,
        metadata=_env(
            "MAAS_MAX_MODEL_PARAMS",
            doc="largest model (parameters, counted from arch + config) a job may build",
        ),
    )
    dataset_buckets: str = field(
        default="maas-datasets",
        metadata=_env(
            "MAAS_DATASET_BUCKETS",
            doc="buckets a job's s3:// dataset may come from, comma separated",
        ),
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, str]:
        """Every setting by env name, secrets masked: safe to log or print."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = "***" if f.metadata["secret"] and value else str(value)
        return out

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    name = f.metadata["env"]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise InvalidArgument(f"{name}={raw!r} is not a boolean; use true or false")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise InvalidArgument(f"{name}={raw!r} is not an integer") from None
    return raw


def known_env_names() -> set[str]:
    """Every environment variable the platform reads (used by the compose test)."""
    return {f.metadata["env"] for f in fields(Settings)} | set(EXTRA_ENV_NAMES)


# Variables read by a single service rather than through Settings (the aggregator's role).
# Each service documents its own in docs/OPERATIONS.md; they are listed here so the compose test
# can tell a typo from a real setting.
EXTRA_ENV_NAMES: tuple[str, ...] = (
    "MAAS_AGGREGATOR_ROLE",  # aggregator: "shard" (default) or "coordinator"
)


def env_doc() -> list[tuple[str, str, str]]:
    """(env name, default, meaning) rows for docs and `maas config`."""
    defaults = Settings()
    rows = []
    for f in fields(Settings):
        value = getattr(defaults, f.name)
        shown = "***" if f.metadata["secret"] and value else str(value)
        rows.append((f.metadata["env"], shown, f.metadata["doc"]))
    return rows
