"""MaaS shared library: config, Kafka bus, object store, tensor codec, events, model zoo."""

__version__ = "0.1.0"
