"""Model compression: pruning, int8/fp16 quantization and knowledge distillation.

Modules: ``quant`` (prepare -> convert, the int8 runtime layer), ``prune``, ``distill``,
``formats`` (pack/unpack to safetensors tensors; the shared loader ``maas.artifacts.materialize``
decodes every compressed format with it), ``train`` (the seeded local training loop),
``measure`` (metrics of an artifact as loaded), ``pipeline`` (job methods -> variants).

The package itself imports nothing: ``maas.artifacts`` needs only ``formats``, and ``measure``
needs ``maas.artifacts``, so importing one module never drags in the others.
"""
