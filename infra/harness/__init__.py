"""Launchers for integration tests, chaos tests and benches: the platform's services as real
child processes (``python -m services.<name>``) on free ports, next to ``infra.proc`` and
``infra.stack``, which they use. ``serving``: registry and inference servers (and the KServe
peer's venv); ``training``: coordinator, aggregator shards, gradient workers; ``stream``:
requests and answers on the stream-inference topics, as a client writes and reads them."""
