"""`maas predict NAME[@VERSION|@ALIAS] --input FILE.npy|FILE.json|JSON`: one inference call.

Talks the Open Inference Protocol to the inference server at MAAS_INFERENCE_ADDR (with the
bearer token of MAAS_AUTH_TOKEN or MAAS_AUTH_TOKEN_FILE, which `maas stack up` writes into the
state dir, and TLS when MAAS_GRPC_TLS is on) and prints the outputs as JSON, or saves them
with ``--output FILE.npy``. A ``.npy`` input of floats is sent as FP32 (the models' datatype:
numpy saves float64 by default), any other ``.npy`` with its own dtype; JSON (a file or inline)
becomes FP32. A single row may be given without the batch dimension.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maas.command_line import BARE_NAME, command, model_ref
from maas.config import Settings
from maas.errors import InvalidArgument
from maas.events import json_failure
from maas.registry.types import ModelRef
from maas.textfile import read_text_file

if TYPE_CHECKING:  # numpy and grpc load when a prediction runs, so `maas --help` stays fast
    import numpy as np

INPUT_NAME = "input"
TEXT_INPUT_NAME = "text"


def _utf8_text(text: str) -> str:
    """A --text as sent: UTF-8. Python hands on argument bytes that do not decode as lone
    surrogates, which no request can carry."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text[: exc.start]!r} is followed by bytes that are not UTF-8; give the text in "
            "UTF-8 (is the terminal's encoding UTF-8?)"
        ) from None
    return text


def read_input(spec: str) -> np.ndarray:
    """The tensor named by ``--input``: a .npy file, a .json file, or inline JSON."""
    import numpy as np

    path = Path(spec)
    if spec.endswith(".npy"):
        try:
            array: np.ndarray = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"--input {spec}: not a readable .npy array: {exc}") from None
        if array.dtype.kind == "f" and array.dtype != np.float32:
            # numpy saves float64 unless told otherwise; every float model here takes FP32,
            # and an FP64 request was refused without saying how to send the file.
            array = array.astype(np.float32)
    else:
        text = read_text_file(path, "--input") if spec.endswith(".json") else spec
        try:
            array = np.asarray(json.loads(text), dtype=np.float32)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidArgument(
                f"--input {spec[:60]!r}: not a .npy file, a .json file or a JSON array of "
                f"numbers ({json_failure(exc)})"
            ) from None
    if array.ndim == 0:
        raise InvalidArgument("--input is a single number; give at least one row of features")
    return array.reshape(1, -1) if array.ndim == 1 else array


def datatype_of(dtype: np.dtype[Any]) -> str:
    """numpy dtype -> OIP datatype: float32 -> FP32, int64 -> INT64, bool -> BOOL."""
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise InvalidArgument(f"dtype {dtype.name} has no Open Inference Protocol datatype")
    return dtype.name.replace("float", "fp").upper()


def dtype_of(datatype: str) -> np.dtype[Any]:
    """The inverse of ``datatype_of`` (little-endian, as on the wire)."""
    import numpy as np

    return np.dtype(datatype.lower().replace("fp", "float")).newbyteorder("<")


async def predict(settings: Settings, ref: ModelRef, x: np.ndarray) -> dict[str, Any]:
    import grpc
    import numpy as np

    from maas.edge import open_channel
    from maas.oip import grpc_predict_v2_pb2 as pb
    from maas.oip import grpc_predict_v2_pb2_grpc as pb_grpc
    from maas.registry.client import error_from_rpc
    from maas.text import wire

    version = str(ref.version) if ref.version is not None else ref.alias or ""
    request = pb.ModelInferRequest(model_name=ref.name, model_version=version)
    if x.dtype == np.object_:  # --text: UTF-8 strings for a text model
        request.inputs.add(name=TEXT_INPUT_NAME, datatype=wire.BYTES, shape=list(x.shape))
        request.raw_input_contents.append(wire.encode_raw(x))
    else:
        request.inputs.add(name=INPUT_NAME, datatype=datatype_of(x.dtype), shape=list(x.shape))
        raw = np.ascontiguousarray(x, x.dtype.newbyteorder("<")).tobytes()
        request.raw_input_contents.append(raw)
    async with open_channel(settings, settings.inference_addr) as channel:
        try:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(
                exc, f"predict {ref} (inference at {settings.inference_addr})"
            ) from None
    outputs = {}
    for out, raw in zip(reply.outputs, reply.raw_output_contents, strict=True):
        if out.datatype == wire.BYTES:
            outputs[out.name] = wire.decode_items(raw, out.shape, out.name, limit=None)
        else:
            outputs[out.name] = np.frombuffer(raw, dtype_of(out.datatype)).reshape(tuple(out.shape))
    return {"model": reply.model_name, "version": int(reply.model_version), "outputs": outputs}


def _plain(array: np.ndarray) -> Any:
    """JSON-ready values; BYTES outputs (label names) as strings."""
    if array.dtype == object:
        return [v.decode(errors="replace") for v in array.reshape(-1)]
    return array.tolist()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    import numpy as np

    from maas.text import wire

    x = wire.texts_array(args.text) if args.text else read_input(args.input)
    answer = asyncio.run(predict(settings, args.ref, x))
    outputs: dict[str, np.ndarray] = answer["outputs"]
    if args.output:
        np.save(args.output, outputs["output"], allow_pickle=False)
    print(
        json.dumps(
            {
                "model": answer["model"],
                "version": answer["version"],
                "outputs": {
                    name: {
                        "shape": list(a.shape),
                        "dtype": a.dtype.name,
                        **({} if args.output else {"data": _plain(a)}),
                    }
                    for name, a in outputs.items()
                },
                "argmax": outputs["output"].argmax(axis=-1).tolist()
                if "output" in outputs
                else None,
            },
            indent=2,
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = command(
        subparsers,
        "predict",
        help="run one inference on a served model",
        description=__doc__,
        example=[
            "maas predict digits-mlp --input row.npy",
            "maas predict digits-mlp@3 --input '[[0.1, 0.2, ...]]'",
            "maas predict digits-mlp@staging --input batch.json --output out.npy",
            'maas predict minilm --text "a sentence to embed"',
        ],
    )
    p.add_argument(
        "ref",
        type=model_ref,
        metavar="NAME[@VERSION|@ALIAS]",
        help=f"the model; NAME alone: {BARE_NAME}",
    )
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--input",
        metavar="FILE.npy|FILE.json|JSON",
        help="the input tensor: rows of features",
    )
    given.add_argument(
        "--text",
        action="append",
        type=_utf8_text,
        help="a text for a text model (repeat for a batch)",
    )
    p.add_argument("--output", metavar="FILE.npy", help="save the output here instead of printing")
    p.set_defaults(func=_run)
