"""Distributed data-parallel training: the math, free of Kafka and S3.

Numpy only (what aggregator shards import): ``layout`` (flat vector, partitions), ``codecs``
(gradient compression, error feedback), ``optim`` (SGD/Adam on a flat partition), ``aggregate``
(a shard's sync/async step rules), ``plan`` (validated job plan), ``sampler`` (batches),
``checkpoint`` (checkpoint encoding and S3 layout).

Torch (workers, the coordinator, tests): ``replica`` (model replica over a flat vector, loss,
evaluation), ``prepare`` (job event -> plan + initial weights), ``local`` (reference trainer
and in-process simulation of the distributed algorithm).
"""
