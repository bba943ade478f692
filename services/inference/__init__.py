"""Inference service: the Open Inference Protocol v2 over gRPC, served from the registry.

Layout: ``dataplane`` (transport-neutral core: resolution, cache, hot swap), ``batcher`` (dynamic
batching on a fixed worker pool), ``signature``/``tensors`` (request checks, OIP tensor codec),
``servicer`` + ``interceptors`` (the thin gRPC edge), ``sources`` (where versions come from),
``server`` (assembly) and ``__main__`` (config from env -> build -> run).
"""
