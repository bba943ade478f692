"""Compressing a BERT encoder: structured head/FFN pruning and layer-dropping students.

int8 needs nothing here: ``maas.compression.quant`` quantizes every ``nn.Linear`` of any model,
the encoder's included (the embedding tables stay fp32). What is BERT-specific:

- ``prune_structured``: remove the least important attention heads and FFN channels of every
  layer. A head's importance is the norm of its value rows times the norm of its columns in the
  attention output projection (what it can write into the residual stream); a channel's, the
  norm of its input row times its output column. The result is a smaller dense ``bert`` whose
  config lists the widths per layer (``layer_heads``, ``layer_intermediate``).
- ``layer_student``: a shallower ``bert`` whose layers are evenly spaced copies of the teacher's
  (with the teacher's embeddings and head), the usual start for distilling a BERT.
- ``distill_embeddings``: train a student so its sentence embeddings match the teacher's
  (cosine loss), for encoders without a classification head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from maas import zoo
from maas.compression.train import FitConfig, Tensors, fit, teacher_outputs
from maas.errors import InvalidArgument
from maas.text.bert_config import BertConfig

ARCH = "bert"


def _config(model: nn.Module) -> BertConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, BertConfig):
        raise InvalidArgument("this compression step needs a bert model")
    return config


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in their original order."""
    return torch.sort(torch.topk(scores, keep).indices).values


def _rebuild(config: BertConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    model = zoo.build_skeleton(ARCH, zoo.config_to_dict(config))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def prune_structured(model: nn.Module, fraction: float) -> tuple[nn.Module, dict[str, object]]:
    """Remove ``fraction`` of every layer's heads and FFN channels; (smaller model, its config)."""
    if not 0 <= fraction < 1:
        raise InvalidArgument(f"prune.sparsity={fraction!r} must be in [0, 1)")
    config = _config(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    heads: list[int] = []
    channels: list[int] = []
    d = config.head_dim
    for i in range(config.layers):
        p = f"encoder.layer.{i}."
        value = state[p + "attention.self.value.weight"]
        out = state[p + "attention.output.dense.weight"]
        n_heads = value.shape[0] // d
        score = value.reshape(n_heads, -1).norm(dim=1) * out.T.reshape(n_heads, -1).norm(dim=1)
        kept = _top(score, max(1, round(n_heads * (1 - fraction))))
        rows = (kept[:, None] * d + torch.arange(d)).reshape(-1)
        for name in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                key = f"{p}attention.self.{name}.{kind}"
                state[key] = state[key][rows]
        state[p + "attention.output.dense.weight"] = out[:, rows]
        inner, outer = state[p + "intermediate.dense.weight"], state[p + "output.dense.weight"]
        score = inner.norm(dim=1) * outer.norm(dim=0)
        keep = _top(score, max(1, round(inner.shape[0] * (1 - fraction))))
        state[p + "intermediate.dense.weight"] = inner[keep]
        state[p + "intermediate.dense.bias"] = state[p + "intermediate.dense.bias"][keep]
        state[p + "output.dense.weight"] = outer[:, keep]
        heads.append(len(kept))
        channels.append(len(keep))
    small = dataclasses.replace(
        config, layer_heads=tuple(heads), layer_intermediate=tuple(channels)
    )
    return _rebuild(small, state), zoo.config_to_dict(small)


def spaced_layers(layers: int, keep: int) -> list[int]:
    """``keep`` of ``layers`` indices, evenly spaced, first and last included."""
    if not 1 <= keep <= layers:
        raise InvalidArgument(f"a student keeps 1..{layers} layers, not {keep}")
    if keep == 1:
        return [layers - 1]
    return [round(i * (layers - 1) / (keep - 1)) for i in range(keep)]


@torch.no_grad()
def layer_student(teacher: nn.Module, layers: int) -> nn.Module:
    """A ``layers``-deep copy of ``teacher``: its embeddings, head and evenly spaced layers."""
    config = _config(teacher)
    picked = spaced_layers(config.layers, layers)
    small = dataclasses.replace(
        config,
        layers=layers,
        layer_heads=tuple(config.heads_of(i) for i in picked) if config.layer_heads else (),
        layer_intermediate=(
            tuple(config.intermediate_of(i) for i in picked) if config.layer_intermediate else ()
        ),
    )
    state: dict[str, torch.Tensor] = {}
    for key, value in teacher.state_dict().items():
        if not key.startswith("encoder.layer."):
            state[key] = value.detach().clone()
            continue
        index, rest = key.removeprefix("encoder.layer.").split(".", 1)
        if int(index) in picked:
            state[f"encoder.layer.{picked.index(int(index))}.{rest}"] = value.detach().clone()
    return _rebuild(small, state)


def student_like(teacher: nn.Module, config: dict[str, Any], fallback: nn.Module) -> nn.Module:
    """``layer_student(teacher, n)`` when ``config`` is the teacher's with ``n`` layers, else
    ``fallback`` (a differently shaped student starts from its own initialisation)."""
    layers = config.get("layers")
    if not isinstance(getattr(teacher, "config", None), BertConfig) or not isinstance(layers, int):
        return fallback
    student = layer_student(teacher, layers)
    same = zoo.config_to_dict(_config(student)) == config
    return student.train() if same else fallback


def distill_embeddings(
    teacher: nn.Module, student: nn.Module, rows: torch.Tensor, config: FitConfig
) -> nn.Module:
    """Train ``student`` so its embeddings of token-id ``rows`` match the teacher's (cosine)."""
    targets = teacher_outputs(teacher, rows)
    data = Tensors(rows, targets, rows[:0], targets[:0], "regression")

    def loss(outputs: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(outputs, targets[picked], dim=1)).mean()

    return fit(student, data, config, loss)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())
