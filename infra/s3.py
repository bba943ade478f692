"""A real S3 server run natively: SeaweedFS `weed server` with its S3 gateway.

Data lives on disk in `<state_dir>/s3/data`; SigV4 keys come from MAAS_S3_ACCESS_KEY/SECRET_KEY via
an identities file written on every start. `weed server` runs master, volume, filer and S3 in one
process; each of them (and its gRPC twin) needs a port, all of which are configurable so several
stacks can run side by side (the test fixture picks free ones).

The binary is built once from the Go module proxy into `<cache_dir>/bin/weed`:

    python -m infra.s3 ensure
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from infra.kafka import file_lock
from infra.proc import NativeServer, ensure_command, port_open, split_host_port
from maas.config import Settings
from maas.errors import FailedPrecondition

WEED_MODULE = "github.com/seaweedfs/seaweedfs"
WEED_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
LOOPBACK = "127.0.0.1"
PROBE_TIMEOUT_S = 2.0


def weed_binary(cache_dir: Path) -> Path:
    return cache_dir / "bin" / "weed"


def ensure_weed(cache_dir: Path) -> Path:
    """The weed binary, built from the Go module proxy on first use (several minutes).

    `go install pkg@version` refuses modules whose go.mod has replace directives (seaweedfs has),
    so: download the module, copy it to a writable tree, and `go build` there.
    """
    binary = weed_binary(cache_dir)
    if binary.exists():
        return binary
    with file_lock(cache_dir / "bin" / "weed.lock"):
        if binary.exists():
            return binary
        go = shutil.which("go") or (
            "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
        )
        if go is None:
            raise FailedPrecondition("Go is not installed; it is needed once to build SeaweedFS")
        logs = cache_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        print(
            f"building SeaweedFS {WEED_VERSION} once (minutes); log {logs}/weed-build.log",
            file=sys.stderr,
        )
        info = subprocess.run(
            [go, "mod", "download", "-json", f"{WEED_MODULE}@{WEED_VERSION}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if info.returncode != 0:
            raise FailedPrecondition(
                f"go mod download {WEED_MODULE} failed:\n{info.stdout}{info.stderr}"
            )
        module_dir = Path(json.loads(info.stdout)["Dir"])
        src = cache_dir / "src" / "seaweedfs"
        if not (src / "weed").is_dir():
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(module_dir, src)
            for root, dirs, files in os.walk(src):  # the module cache is read-only
                for name in dirs + files:
                    path = Path(root) / name
                    path.chmod(path.stat().st_mode | 0o200)
        tmp = binary.with_suffix(".tmp")
        with open(logs / "weed-build.log", "ab") as log:
            build = subprocess.run(
                [go, "build", "-o", str(tmp), "./weed"],
                cwd=src,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if build.returncode != 0:
            raise FailedPrecondition(f"building weed failed; see {logs / 'weed-build.log'}")
        tmp.rename(binary)
    return binary


@dataclass(frozen=True)
class WeedPorts:
    """Every port one `weed server` listens on (HTTP and gRPC for each role)."""

    s3: int
    master: int
    volume: int
    filer: int
    s3_grpc: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int

    @classmethod
    def after(cls, s3_port: int) -> WeedPorts:
        """The default layout: the S3 port, then the seven ports right after it."""
        return cls(s3_port, *(s3_port + i for i in range(1, 8)))

    def all(self) -> list[int]:
        return sorted([*self.gateway(), *self.internal()])

    def gateway(self) -> list[int]:
        """The S3 gateway's ports: the only ones served beyond this machine."""
        return [self.s3, self.s3_grpc]

    def internal(self) -> list[int]:
        """The master's, volume server's and filer's: they answer without credentials (every
        bucket, read and write), so they listen on the loopback interface only."""
        return [
            self.master,
            self.volume,
            self.filer,
            self.master_grpc,
            self.volume_grpc,
            self.filer_grpc,
        ]


def public_default_keys(settings: Settings) -> str:
    """A warning when the S3 endpoint is reachable beyond this machine with the well-known
    default keys (empty otherwise): anyone who can reach it can then read and write every
    model, dataset and checkpoint."""
    host, _ = split_host_port(settings.s3_endpoint, default_port=9000)
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return ""
    default = Settings()
    if (settings.s3_access_key, settings.s3_secret_key) != (
        default.s3_access_key,
        default.s3_secret_key,
    ):
        return ""
    return (
        f"the S3 endpoint {settings.s3_endpoint} is reachable from other machines and uses the "
        "default keys everyone knows; set MAAS_S3_ACCESS_KEY and MAAS_S3_SECRET_KEY"
    )


@dataclass(frozen=True, kw_only=True)
class WeedS3(NativeServer):
    name: ClassVar[str] = "s3"
    ports: WeedPorts
    access_key: str
    secret_key: str

    @classmethod
    def from_settings(
        cls, settings: Settings, *, ports: WeedPorts | None = None, attached: bool = False
    ) -> WeedS3:
        host, port = split_host_port(settings.s3_endpoint, default_port=9000)
        return cls(
            **cls.places(settings),
            host=host,
            ports=ports or WeedPorts.after(port),
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            attached=attached,
        )

    @property
    def port(self) -> int:
        return self.ports.s3

    @property
    def marker(self) -> str:
        return f"-dir={self.data_dir}"

    def identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "maas",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }

    def argv(self, binary: Path) -> list[str]:
        p = self.ports
        return [
            str(binary),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.ip.bind={self.host}",
            f"-master.port={p.master}",
            f"-master.port.grpc={p.master_grpc}",
            "-master.telemetry=false",
            # One master: it waits out this timeout (several rounds) before it leads again after
            # a restart, and serves no object meanwhile (10 s default: ~20 s after every start).
            "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={p.volume}",
            f"-volume.port.grpc={p.volume_grpc}",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p.filer}",
            f"-filer.port.grpc={p.filer_grpc}",
            "-s3",
            f"-s3.port={p.s3}",
            f"-s3.port.grpc={p.s3_grpc}",
            # Extra listeners this version starts by default; off, so stacks never collide.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.home / 's3-identities.json'}",
        ]

    def prepare(self) -> list[str]:
        """weed's command line, its binary built and its identities written."""
        busy = [port for port in self.ports.gateway() if port_open(self.host, port)]
        busy += [port for port in self.ports.internal() if port_open(LOOPBACK, port)]
        if busy:
            raise FailedPrecondition(
                f"ports {busy} are taken; the S3 server needs {self.ports.gateway()} on "
                f"{self.host} and {self.ports.internal()} on {LOOPBACK} (set MAAS_S3_ENDPOINT "
                "to move them)"
            )
        binary = ensure_weed(self.cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.home / "s3-identities.json"
        config.write_text(json.dumps(self.identities(), indent=2))
        config.chmod(0o600)
        self.keep_internal_ports_signed()
        return self.argv(binary)

    def keep_internal_ports_signed(self) -> None:
        """weed's own HTTP ports (master, volume, filer) answer whoever reaches the loopback
        unless its ``security.toml`` (read from the working directory, the S3 home) gives them
        signing keys: then a volume or filer read or write needs a token only weed's own parts
        get. The keys are made once per state directory and kept."""
        path = self.home / "security.toml"
        if path.exists():
            return
        sections = (
            "jwt.signing",
            "jwt.signing.read",
            "jwt.filer_signing",
            "jwt.filer_signing.read",
        )
        text = "".join(f'[{s}]\nkey = "{secrets.token_hex(32)}"\n\n' for s in sections)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)

    def ready(self) -> bool:
        """The S3 gateway answers an authenticated ListBuckets."""
        if not port_open(self.host, self.port):
            return False
        import urllib3
        from minio import Minio

        # One short try: a probe that waited out the client's default retries and 5-minute
        # read timeout would hang `maas stack status` on a frozen S3 server.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=PROBE_TIMEOUT_S, read=PROBE_TIMEOUT_S), retries=False
        )
        client = Minio(
            f"{self.host}:{self.port}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )
        try:
            client.list_buckets()
        except Exception:  # still starting (the filer is not up behind the gateway), or frozen
            return False
        finally:
            http.clear()
        return True


def main(argv: list[str] | None = None) -> int:
    return ensure_command(
        argv,
        module="infra.s3",
        does="build the SeaweedFS weed binary into the cache",
        ensure=ensure_weed,
        what=f"weed {WEED_VERSION}",
    )


if __name__ == "__main__":
    raise SystemExit(main())
