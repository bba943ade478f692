"""KServe's own gRPC client against our inference server: run by the test in KServe's venv.

python kserve_client_probe.py ADDR MODEL ROWS_JSON   (prints one JSON line)
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(addr: str, name: str, rows: str) -> None:
    x = np.array(json.loads(rows), dtype=np.float32)
    async with InferenceGRPCClient(url=addr) as client:
        ready = await client.is_server_ready() and await client.is_model_ready(name)
        tensor = InferInput(name="input", shape=list(x.shape), datatype="FP32")
        tensor.set_data_from_numpy(x)
        request = InferRequest(model_name=name, infer_inputs=[tensor], request_id="kserve-1")
        answer = await client.infer(request)
    reply = {
        "ready": ready,
        "id": answer.id,
        "version": answer.model_version,
        "output": answer.outputs[0].as_numpy().tolist(),
    }
    print(json.dumps(reply))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
