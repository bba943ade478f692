from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerMessage(_message.Message):
    __slots__ = ("join", "push", "pushes_from")
    JOIN_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FROM_FIELD_NUMBER: _ClassVar[int]
    join: Join
    push: Push
    pushes_from: PushesFrom
    def __init__(self, join: _Optional[_Union[Join, _Mapping]] = ..., push: _Optional[_Union[Push, _Mapping]] = ..., pushes_from: _Optional[_Union[PushesFrom, _Mapping]] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("job_id", "worker", "shard", "member")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    worker: int
    shard: int
    member: str
    def __init__(self, job_id: _Optional[str] = ..., worker: _Optional[int] = ..., shard: _Optional[int] = ..., member: _Optional[str] = ...) -> None: ...

class PushesFrom(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class Push(_message.Message):
    __slots__ = ("version", "codec", "offset", "size", "piece", "pieces", "samples", "loss", "accuracy", "scale", "values", "indices")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    version: int
    codec: str
    offset: int
    size: int
    piece: int
    pieces: int
    samples: int
    loss: float
    accuracy: float
    scale: float
    values: bytes
    indices: bytes
    def __init__(self, version: _Optional[int] = ..., codec: _Optional[str] = ..., offset: _Optional[int] = ..., size: _Optional[int] = ..., piece: _Optional[int] = ..., pieces: _Optional[int] = ..., samples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., scale: _Optional[float] = ..., values: _Optional[bytes] = ..., indices: _Optional[bytes] = ...) -> None: ...

class ShardMessage(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: Params
    def __init__(self, params: _Optional[_Union[Params, _Mapping]] = ...) -> None: ...

class Params(_message.Message):
    __slots__ = ("version", "final", "durable_version", "dtype", "offset", "piece", "pieces", "values")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    DURABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    version: int
    final: bool
    durable_version: int
    dtype: str
    offset: int
    piece: int
    pieces: int
    values: bytes
    def __init__(self, version: _Optional[int] = ..., final: _Optional[bool] = ..., durable_version: _Optional[int] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., piece: _Optional[int] = ..., pieces: _Optional[int] = ..., values: _Optional[bytes] = ...) -> None: ...
