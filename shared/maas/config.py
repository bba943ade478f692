"""Every setting of the platform, read once from the environment.

The env names here are the contract with docker-compose.yml and docs/OPERATIONS.md: a test checks
that every variable compose sets is one this module knows. Units live in the names
(``_bytes``, ``_ms``, ``_us``) and are converted nowhere else. How a row is declared, parsed and
masked lives in maas.config_env.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from maas.config_env import (
    default_cache_dir,
    default_state_dir,
    host_port,
    parse,
    setting,
    shown,
)

MiB = 1024 * 1024
# torch DDP's default bucket (``bucket_cap_mb=25``): a model whose gradient fits one is reduced
# there in one go after backward, and a worker sends it whole after backward too.
TRAINING_OVERLAP_MIN_BYTES = 25 * MiB
KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = setting(
        "MAAS_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers, comma separated"
    )
    kafka_security_protocol: str = setting(
        "MAAS_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        choices=KAFKA_PROTOCOLS,
    )
    kafka_sasl_mechanism: str = setting(
        "MAAS_KAFKA_SASL_MECHANISM",
        "SCRAM-SHA-512",
        "with SASL_*: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN",
        choices=KAFKA_SASL_MECHANISMS,
    )
    kafka_sasl_username: str = setting("MAAS_KAFKA_SASL_USERNAME", "", "with SASL_*: the user")
    kafka_sasl_password: str = setting(
        "MAAS_KAFKA_SASL_PASSWORD", "", "with SASL_*: the password", secret=True
    )
    kafka_ssl_ca_file: str = setting(
        "MAAS_KAFKA_SSL_CA_FILE",
        "",
        "with SSL/SASL_SSL: PEM CA bundle to trust (default: system roots)",
    )
    kafka_max_message_bytes: int = setting(
        "MAAS_KAFKA_MAX_MESSAGE_BYTES",
        16 * MiB,
        "largest record the broker, producers and consumers accept",
    )
    event_max_depth: int = setting(
        "MAAS_EVENT_MAX_DEPTH",
        32,
        "deepest nesting of maps/lists an event may have; deeper ones go to the DLQ",
    )
    dlq_max_attempts: int = setting(
        "MAAS_DLQ_MAX_ATTEMPTS",
        8,
        (
            "dead-letter writes tried (each waits at most 10 s for the broker's ack; backoff "
            "doubling up to 5 s) before a consumer stops, keeping the record uncommitted, and its "
            "service reports NOT_SERVING"
        ),
    )
    # --- S3 ----------------------------------------------------------------------------------
    s3_endpoint: str = setting(
        "MAAS_S3_ENDPOINT", "127.0.0.1:9000", "S3 host:port", check=host_port
    )
    s3_access_key: str = setting("MAAS_S3_ACCESS_KEY", "maas", "S3 access key", secret=True)
    s3_secret_key: str = setting(
        "MAAS_S3_SECRET_KEY", "maas-secret-key", "S3 secret key", secret=True
    )
    s3_secure: bool = setting("MAAS_S3_SECURE", False, "use TLS to reach S3")
    s3_region: str = setting("MAAS_S3_REGION", "us-east-1", "S3 region")
    s3_part_size_bytes: int = setting(
        "MAAS_S3_PART_SIZE_BYTES", 16 * MiB, "multipart upload part size"
    )
    s3_read_timeout_s: int = setting(
        "MAAS_S3_READ_TIMEOUT_S",
        30,
        "longest wait for S3 to send the next bytes of an answer before the call is retried (an "
        "S3 that accepts connections but answers nothing is then reported within this, x5 "
        "attempts)",
    )
    # --- codec -------------------------------------------------------------------------------
    codec_chunk_bytes: int = setting(
        "MAAS_CODEC_CHUNK_BYTES", 4 * MiB, "tensors larger than this are split into chunks"
    )
    # --- local state -------------------------------------------------------------------------
    state_dir: str = setting(
        "MAAS_STATE_DIR",
        doc="logs, pids, broker and S3 data, SQLite files",
        factory=default_state_dir,
    )
    cache_dir: str = setting(
        "MAAS_CACHE_DIR", doc="venv, Kafka jars, S3 server binary", factory=default_cache_dir
    )
    log_level: str = setting(
        "MAAS_LOG_LEVEL",
        "INFO",
        "logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL",
        choices=LOG_LEVELS,
    )
    # --- gRPC endpoints ----------------------------------------------------------------------
    grpc_max_message_bytes: int = setting(
        "MAAS_GRPC_MAX_MESSAGE_BYTES",
        256 * MiB,
        "gRPC send/receive limit (default 4 MiB is a trap)",
    )
    grpc_keepalive_s: int = setting(
        "MAAS_GRPC_KEEPALIVE_S",
        30,
        (
            "a gRPC server pings a client whose calls have been silent this long and closes the "
            "connection when the ping is not answered within as long (the calls of a frozen or "
            "vanished client end); clients may ping every 10 s"
        ),
    )
    registry_listen: str = setting(
        "MAAS_REGISTRY_LISTEN", "127.0.0.1:50051", "address the registry server binds"
    )
    registry_addr: str = setting(
        "MAAS_REGISTRY_ADDR", "127.0.0.1:50051", "address clients use to reach the registry"
    )
    registry_max_manifest_bytes: int = setting(
        "MAAS_REGISTRY_MAX_MANIFEST_BYTES",
        1 * MiB,
        "largest manifest.json registered (the training coordinator refuses, before training, "
        "a job whose version would have a larger one: set it alike on both)",
    )
    registry_max_metrics: int = setting(
        "MAAS_REGISTRY_MAX_METRICS", 1000, "most metrics one manifest may carry"
    )
    registry_max_side_file_bytes: int = setting(
        "MAAS_REGISTRY_MAX_SIDE_FILE_BYTES",
        64 * MiB,
        (
            "largest file besides the weights (tokenizer, vocabulary, configs) a version may "
            "hold; the weights are bounded by MAAS_MAX_MODEL_PARAMS"
        ),
    )
    registry_max_reply_bytes: int = setting(
        "MAAS_REGISTRY_MAX_REPLY_BYTES",
        3 * MiB,
        (
            "largest registry reply; list pages (models, versions, alias history) stop short of "
            "it, so clients on gRPC's default 4 MiB limit always fit"
        ),
    )
    inference_listen: str = setting(
        "MAAS_INFERENCE_LISTEN", "127.0.0.1:8001", "address the inference server binds"
    )
    inference_addr: str = setting(
        "MAAS_INFERENCE_ADDR", "127.0.0.1:8001", "address clients use to reach inference"
    )
    # --- security of the gRPC APIs (maas.edge) ------------------------------------------------
    auth: bool = setting(
        "MAAS_AUTH",
        True,
        (
            "gRPC APIs require a bearer token with a role (read/write/service); off only if set "
            "explicitly"
        ),
    )
    auth_tokens_file: str = setting(
        "MAAS_AUTH_TOKENS_FILE",
        "",
        (
            "servers: the token table (identity, role, sha256); default "
            "$MAAS_STATE_DIR/auth/tokens.json"
        ),
    )
    auth_token: str = setting(
        "MAAS_AUTH_TOKEN", "", "clients: the bearer token to send", secret=True
    )
    auth_token_file: str = setting(
        "MAAS_AUTH_TOKEN_FILE",
        "",
        (
            "clients: file holding the token when MAAS_AUTH_TOKEN is unset; default "
            "$MAAS_STATE_DIR/auth/admin.token"
        ),
    )
    grpc_tls: bool = setting(
        "MAAS_GRPC_TLS",
        False,
        "gRPC servers and clients use TLS; the inference HTTP API serves HTTPS (same certificate)",
    )
    tls_cert_file: str = setting(
        "MAAS_TLS_CERT_FILE", "", "servers: PEM certificate chain (with TLS)"
    )
    tls_key_file: str = setting("MAAS_TLS_KEY_FILE", "", "servers: PEM private key (with TLS)")
    tls_ca_file: str = setting(
        "MAAS_TLS_CA_FILE", "", "clients: PEM CA bundle to trust (default: system roots)"
    )
    metrics_bind: str = setting(
        "MAAS_METRICS_BIND", "127.0.0.1", "address the Prometheus /metrics HTTP servers bind"
    )
    inference_max_batch_size: int = setting(
        "MAAS_INFERENCE_MAX_BATCH_SIZE",
        64,
        "rows per batched forward pass (1 = no dynamic batching)",
    )
    inference_max_queue_delay_us: int = setting(
        "MAAS_INFERENCE_MAX_QUEUE_DELAY_US",
        0,
        (
            "longest a request waits for more rows (0 = batch only the backlog; asyncio timers "
            "make anything under 1000 act like ~1000)"
        ),
    )
    inference_max_inflight_bytes: int = setting(
        "MAAS_INFERENCE_MAX_INFLIGHT_BYTES",
        1 << 30,
        (
            "input bytes of requests computed at once; more are answered UNAVAILABLE (retry), "
            "one request is always admitted"
        ),
    )
    inference_workers: int = setting("MAAS_INFERENCE_WORKERS", 2, "threads running forward passes")
    inference_torch_threads: int = setting(
        "MAAS_INFERENCE_TORCH_THREADS",
        1,
        "torch intra-op threads per forward pass (workers x this ~ cores)",
    )
    # The hand-off to a worker costs 100-400 us of CPU on 2 busy cores, and a small
    # model's forward holds the GIL for most of its time anyway.
    inference_inline_forward_us: int = setting(
        "MAAS_INFERENCE_INLINE_FORWARD_US",
        500,
        (
            "forwards predicted shorter than this skip the worker hand-off (0 = always the worker "
            "pool)"
        ),
    )
    inference_load_wait_s: int = setting(
        "MAAS_INFERENCE_LOAD_WAIT_S",
        60,
        (
            "longest a request waits for a model version to load (or its alias to resolve); "
            "then UNAVAILABLE / 503 while the load goes on"
        ),
    )
    inference_cache_bytes: int = setting(
        "MAAS_INFERENCE_CACHE_BYTES",
        1024 * MiB,
        "bytes of loaded versions kept (LRU): weights, and a GPT's key/value cache for its slots",
    )
    inference_http_listen: str = setting(
        "MAAS_INFERENCE_HTTP_LISTEN",
        "",
        (
            "host:port of the inference HTTP API (OIP REST /v2/..., OpenAI-compatible /v1/...); "
            "empty = off"
        ),
    )
    inference_http_max_json_bytes: int = setting(
        "MAAS_INFERENCE_HTTP_MAX_JSON_BYTES",
        4 * MiB,
        (
            "largest JSON document in an HTTP request (the server answers nothing else while it "
            "parses one, ~0.1 s a MiB); tensors sent as binary data do not count"
        ),
    )
    inference_http_max_body_bytes: int = setting(
        "MAAS_INFERENCE_HTTP_MAX_BODY_BYTES",
        32 * MiB,
        (
            "largest HTTP request body (JSON costs ~10x its size in memory while parsed; big "
            "tensors travel better over gRPC, up to MAAS_GRPC_MAX_MESSAGE_BYTES)"
        ),
    )
    inference_http_body_timeout_s: int = setting(
        "MAAS_INFERENCE_HTTP_BODY_TIMEOUT_S",
        60,
        "seconds an HTTP request's body may take to arrive; slower: 408 and a closed connection",
    )
    inference_http_idle_timeout_s: int = setting(
        "MAAS_INFERENCE_HTTP_IDLE_TIMEOUT_S",
        75,
        (
            "seconds an HTTP connection may sit idle, or with a request's headers half sent, "
            "before the server closes it"
        ),
    )
    inference_generation_slots: int = setting(
        "MAAS_INFERENCE_GENERATION_SLOTS",
        8,
        (
            "streams one generative model version decodes together (its KV-cache rows); more wait "
            "for a free slot, up to 32 per slot (more are refused UNAVAILABLE, retriable)"
        ),
    )
    inference_decode_process: bool = setting(
        "MAAS_INFERENCE_DECODE_PROCESS",
        True,
        (
            "decode each generative model version in a child process of its own (the event loop "
            "and the decode step then never wait on one interpreter lock); false = a thread"
        ),
    )
    inference_decode_cpus: str = setting(
        "MAAS_INFERENCE_DECODE_CPUS",
        "",
        (
            "CPUs reserved for the decode processes (e.g. 3, or 2-3,6): they run only there and "
            "the rest of the server never does; empty = the OS places both"
        ),
    )
    inference_stream: bool = setting(
        "MAAS_INFERENCE_STREAM",
        True,
        (
            "answer requests from maas.infer.v1 on maas.predictions.v1 (or the request's "
            "reply_to), exactly once per request record"
        ),
    )
    inference_metrics_port: int = setting(
        "MAAS_INFERENCE_METRICS_PORT",
        8002,
        "inference /metrics, /healthz and /readyz HTTP port (0 = off)",
    )
    metrics_port: int = setting(
        "MAAS_METRICS_PORT",
        0,
        "/metrics (Prometheus), /healthz and /readyz HTTP port of the other services (0 = off)",
    )
    # --- compressor ----------------------------------------------------------------------------
    compressor_torch_threads: int = setting(
        "MAAS_COMPRESSOR_TORCH_THREADS",
        1,
        (
            "torch intra-op threads for pruning/distilling/measuring (small models gain nothing "
            "from more, and stall on a loaded host)"
        ),
    )
    compressor_max_poll_interval_ms: int = setting(
        "MAAS_COMPRESSOR_MAX_POLL_INTERVAL_MS",
        3_600_000,
        (
            "longest one compress job may run (it fails, resource_exhausted, at 90% of it): a jobs "
            "consumer busy longer loses its partitions to another compressor (Kafka's default, "
            "5 min, is shorter than a distillation)"
        ),
    )
    # --- training (gradient workers, aggregator shards) ----------------------------------
    training_compute_threads: int = setting(
        "MAAS_TRAINING_COMPUTE_THREADS",
        1,
        (
            "threads a gradient worker's torch and a shard's BLAS use (workers x this ~ cores: on "
            "a busy host extra threads spin instead of computing)"
        ),
    )
    training_overlap_min_bytes: int = setting(
        "MAAS_TRAINING_OVERLAP_MIN_BYTES",
        TRAINING_OVERLAP_MIN_BYTES,
        (
            "a worker pushes gradients tensor by tensor during backward for models whose fp32 "
            "gradient is at least this many bytes (torch DDP's bucket size); smaller ones leave "
            "whole after backward, which costs less CPU per step"
        ),
    )
    member_id: str = setting(
        "MAAS_MEMBER_ID",
        "",
        (
            "this worker's or shard's name in the training pool (default: host-pid-random, new on "
            "every start; set it only if it is unique)"
        ),
    )
    member_heartbeat_ms: int = setting(
        "MAAS_MEMBER_HEARTBEAT_MS",
        1_000,
        "how often a gradient worker or aggregator shard says `up` on the control topic",
    )
    step_deadline_ms: int = setting(
        "MAAS_STEP_DEADLINE_MS",
        10_000,
        "sync step closes after this with whoever reported (job may override)",
    )
    progress_interval_ms: int = setting(
        "MAAS_PROGRESS_INTERVAL_MS",
        2_000,
        (
            "longest time between a running job's progress status events (one also comes "
            "every 1/20 of the job's steps, whichever is sooner)"
        ),
    )
    aggregator_listen: str = setting(
        "MAAS_AGGREGATOR_LISTEN",
        "127.0.0.1:0",
        (
            "address a shard serves the training data plane (gRPC) on; port 0 picks a free one "
            "(the shard advertises whichever it got)"
        ),
    )
    aggregator_advertise: str = setting(
        "MAAS_AGGREGATOR_ADVERTISE",
        "",
        (
            "host:port workers dial for this shard (default: the listen host, or this host's name "
            "when listening on 0.0.0.0, with the bound port)"
        ),
    )
    worker_max_kept_bytes: int = setting(
        "MAAS_WORKER_MAX_KEPT_BYTES",
        4 << 30,
        (
            "most gradient bytes a gradient worker keeps to replay to a restarted shard; the "
            "coordinator fits each job's checkpoint_every so that 2 x checkpoint_every + 1 steps "
            "fit (the default comes down; a value the job gave that does not fit is refused)"
        ),
    )
    worker_heartbeat_timeout_ms: int = setting(
        "MAAS_WORKER_HEARTBEAT_TIMEOUT_MS",
        10_000,
        (
            "a pool member silent this long on the control topic is gone (its job goes on without "
            "it), and a worker without a data-plane stream this long is removed from its job"
        ),
    )
    worker_rejoin_after_ms: int = setting(
        "MAAS_WORKER_REJOIN_AFTER_MS",
        60_000,
        (
            "how long a gradient worker whose token the shards refused stays out of the training "
            "pool before it asks the shard that refused it again (it rejoins once that shard "
            "takes the token); doubled with each refusal in a row, up to 30 minutes"
        ),
    )
    job_stall_timeout_ms: int = setting(
        "MAAS_JOB_STALL_TIMEOUT_MS",
        600_000,
        "a training job whose shards make no progress this long fails",
    )
    # --- jobs (checked by the CLI and every service alike) -----------------------------------
    max_model_params: int = setting(
        "MAAS_MAX_MODEL_PARAMS",
        100_000_000,
        (
            "largest model (parameters, counted from arch + config) a job may build or the "
            "registry accept"
        ),
    )
    max_dataset_bytes: int = setting(
        "MAAS_MAX_DATASET_BYTES",
        1 << 30,
        (
            "largest s3:// dataset a job may name, as stored and as unpacked (every worker, and "
            "the coordinator, loads it: about 3x this at the peak)"
        ),
    )
    dataset_buckets: str = setting(
        "MAAS_DATASET_BUCKETS",
        "maas-datasets",
        "buckets a job's s3:// dataset may come from, comma separated",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = parse(f, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, str]:
        """Every setting by env name, secrets masked: safe to log or print."""
        out: dict[str, str] = {}
        for f in fields(self):
            out[f.metadata["env"]] = shown(f, getattr(self, f.name))
        return out

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir)


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
    return [
        (f.metadata["env"], shown(f, getattr(defaults, f.name)), f.metadata["doc"])
        for f in fields(Settings)
    ]
