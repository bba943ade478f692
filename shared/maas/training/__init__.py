"""Distributed data-parallel training: the math, and the three edges it talks through.

The math has no Kafka, S3 or gRPC in it. Numpy only (what aggregator shards import): ``layout``
(flat vector, partitions), ``codecs`` (gradient compression, error feedback), ``optim``
(SGD/Adam on a flat partition), ``aggregate`` (a shard's sync/async step rules), ``plan``
(validated job plan), ``sampler`` (batches), ``pool`` (who trains what), ``protocol`` (gradient
and parameter frames), ``checkpoint`` (checkpoint encoding and S3 layout). Torch (workers, the
coordinator, tests): ``replica`` (model replica over a flat vector, loss, evaluation),
``prepare`` (job event -> plan + initial weights), ``worker`` (a worker's steps), ``local``
(reference trainer and in-process simulation of the distributed algorithm).

The edges use the platform's one module for each transport: ``control`` (the control topic,
through ``maas.bus``), ``storage`` (checkpoints in S3, through ``maas.store``), ``dataplane``
(gradients and parameters over gRPC, through ``maas.edge``).
"""
