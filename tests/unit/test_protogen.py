"""Generated gRPC code is reproducible from schemas/proto and committed up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from maas import protogen


def test_committed_generated_code_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "maas.protogen", "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_check_names_a_stale_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stale_file = tmp_path / "registry_pb2.py"
    stale_file.write_bytes(b"# edited by hand\n")
    monkeypatch.setattr(protogen, "expected_files", lambda: {stale_file: b"# generated\n"})
    assert protogen.stale() == [stale_file]


def test_imports_of_a_proto_package_can_be_moved_to_ours() -> None:
    generated = (
        "import grpc\n"
        "from inference import grpc_predict_v2_pb2 as inference_dot_grpc__predict__v2__pb2\n"
        "from inferencex import other\n"
    )
    target = protogen.Target("inference/x.proto", "shared/maas/oip", (("inference", "maas.oip"),))
    rewritten = protogen._rewrite(generated, target)
    assert "from maas.oip import grpc_predict_v2_pb2 as" in rewritten
    assert "from inferencex import other" in rewritten


def test_every_target_proto_exists() -> None:
    for target in protogen.TARGETS:
        assert (protogen.PROTO_ROOT / target.proto).is_file(), target.proto
