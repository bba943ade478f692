"""Registry values <-> their protobuf messages (one place, used by the server and the client).

proto3 has no null for scalars: 0 / "" stand for "none" on the wire and become ``None`` here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from maas.registry.types import (
    AliasChange,
    AliasTargets,
    ArtifactFile,
    Lineage,
    LineageNode,
    ModelRef,
    ModelSummary,
    ModelVersion,
    PolicyVersion,
)
from maas.registry.v1 import registry_pb2 as pb


def ref_to_proto(ref: ModelRef) -> pb.VersionRef:
    msg = pb.VersionRef(name=ref.name)
    if ref.version is not None:
        msg.version = ref.version
    elif ref.alias is not None:
        msg.alias = ref.alias
    return msg


def ref_from_proto(msg: pb.VersionRef) -> ModelRef:
    """Raises InvalidArgument for malformed names, versions or aliases."""
    selector = msg.WhichOneof("selector")
    if selector == "version":
        return ModelRef(msg.name, version=msg.version)
    if selector == "alias":
        return ModelRef(msg.name, alias=msg.alias)
    return ModelRef(msg.name)


def version_to_proto(v: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=v.name,
        version=v.version,
        arch=v.arch,
        format=v.format,
        manifest_json=v.manifest_json,
        manifest_sha256=v.manifest_sha256,
        files=[
            pb.ArtifactFile(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in v.files
        ],
        bucket=v.bucket,
        prefix=v.prefix,
        parent=ref_to_proto(v.parent) if v.parent else None,
        method=v.method or "",
        job_id=v.job_id or "",
        metrics=v.metrics,
        aliases=list(v.aliases),
        created_ms=v.created_ms,
        created_by=v.created_by,
        size_bytes=v.size_bytes,
        deleted_ms=v.deleted_ms or 0,
    )


def version_from_proto(msg: pb.ModelVersion) -> ModelVersion:
    return ModelVersion(
        name=msg.name,
        version=msg.version,
        arch=msg.arch,
        format=msg.format,
        manifest_json=msg.manifest_json,
        manifest_sha256=msg.manifest_sha256,
        files=tuple(ArtifactFile(f.name, f.sha256, f.size_bytes) for f in msg.files),
        bucket=msg.bucket,
        prefix=msg.prefix,
        parent=ref_from_proto(msg.parent) if msg.HasField("parent") else None,
        method=msg.method or None,
        job_id=msg.job_id or None,
        metrics=dict(msg.metrics),
        aliases=tuple(msg.aliases),
        created_ms=msg.created_ms,
        created_by=msg.created_by,
        size_bytes=msg.size_bytes,
        deleted_ms=msg.deleted_ms or None,
    )


def summary_to_proto(s: ModelSummary) -> pb.ModelSummary:
    return pb.ModelSummary(
        name=s.name,
        latest_version=s.latest_version or 0,
        version_count=s.version_count,
        aliases=s.aliases,
        created_ms=s.created_ms,
        updated_ms=s.updated_ms,
    )


def summary_from_proto(msg: pb.ModelSummary) -> ModelSummary:
    return ModelSummary(
        msg.name,
        msg.latest_version or None,
        msg.version_count,
        dict(msg.aliases),
        msg.created_ms,
        msg.updated_ms,
    )


def change_to_proto(c: AliasChange) -> pb.AliasChange:
    return pb.AliasChange(
        name=c.name,
        alias=c.alias,
        from_version=c.from_version or 0,
        to_version=c.to_version or 0,
        actor=c.actor,
        ts_ms=c.ts_ms,
        reason=c.reason,
        targets=targets_to_proto(c.targets),
    )


def targets_to_proto(targets: AliasTargets) -> list[pb.AliasTarget]:
    return [pb.AliasTarget(version=v, weight=w) for v, w in targets]


def targets_from_proto(messages: Iterable[pb.AliasTarget]) -> AliasTargets:
    return tuple((t.version, t.weight) for t in messages)


def change_from_proto(msg: pb.AliasChange) -> AliasChange:
    return AliasChange(
        msg.name,
        msg.alias,
        msg.from_version or None,
        msg.to_version or None,
        msg.actor,
        msg.ts_ms,
        msg.reason,
        targets_from_proto(msg.targets),
    )


def policy_to_proto(p: PolicyVersion) -> pb.Policy:
    return pb.Policy(
        name=p.name,
        version=p.version,
        document_json=json.dumps(p.document, sort_keys=True),
        actor=p.actor,
        created_ms=p.created_ms,
    )


def policy_from_proto(msg: pb.Policy) -> PolicyVersion:
    return PolicyVersion(
        msg.name, msg.version, json.loads(msg.document_json), msg.actor, msg.created_ms
    )


def _node_to_proto(n: LineageNode) -> pb.LineageNode:
    return pb.LineageNode(
        name=n.name,
        version=n.version,
        method=n.method or "",
        job_id=n.job_id or "",
        created_ms=n.created_ms,
        deleted=n.deleted,
    )


def _node_from_proto(msg: pb.LineageNode) -> LineageNode:
    return LineageNode(
        msg.name, msg.version, msg.method or None, msg.job_id or None, msg.created_ms, msg.deleted
    )


def lineage_to_proto(lineage: Lineage) -> pb.Lineage:
    return pb.Lineage(
        ancestors=[_node_to_proto(n) for n in lineage.ancestors],
        children=[_node_to_proto(n) for n in lineage.children],
    )


def lineage_from_proto(msg: pb.Lineage) -> Lineage:
    return Lineage(
        tuple(_node_from_proto(n) for n in msg.ancestors),
        tuple(_node_from_proto(n) for n in msg.children),
    )
