"""Model compression: pruning, int8/fp16 quantization and knowledge distillation.

Importing this package teaches the shared loader (``maas.artifacts.materialize``) every stored
compressed format, so ``load(name, version)`` runs any variant the compressor registered.

Modules: ``quant`` (prepare -> convert, the int8 runtime layer), ``prune``, ``distill``,
``formats`` (pack/unpack to safetensors tensors), ``train`` (the seeded local training loop),
``measure`` (metrics of an artifact as loaded), ``pipeline`` (job methods -> variants).
"""

from maas import artifacts
from maas.compression.formats import FORMATS, materialize
from maas.compression.measure import artifact_metrics, relative_metrics
from maas.compression.pipeline import (
    Plan,
    Variant,
    parent_variant,
    parse_method,
    parse_methods,
    run,
)
from maas.compression.train import FitConfig, Tensors

for _format in FORMATS:
    artifacts.register_format(_format, materialize)

__all__ = [
    "FORMATS",
    "FitConfig",
    "Plan",
    "Tensors",
    "Variant",
    "artifact_metrics",
    "parent_variant",
    "parse_method",
    "parse_methods",
    "relative_metrics",
    "run",
]
