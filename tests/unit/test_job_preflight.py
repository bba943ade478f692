"""`maas jobs submit --dry-run` judges a train job's model against a builtin dataset's rows, as
the coordinator will (the services' own check, run in the CLI)."""

from __future__ import annotations

import asyncio

import pytest

from maas.config import Settings
from maas.errors import InvalidArgument
from maas.job_preflight import preflight


def train(config: dict[str, object]) -> dict[str, object]:
    return {
        "job_id": "j",
        "type": "train",
        "model": {"name": "m", "arch": "mlp", "config": config},
        "dataset": {"uri": "builtin:digits"},
    }


def test_a_model_whose_inputs_do_not_fit_the_builtin_rows_is_refused() -> None:
    job = train({"in_features": 20, "hidden": [8], "num_classes": 10})
    with pytest.raises(InvalidArgument, match="takes 20 input features but builtin:digits rows"):
        asyncio.run(preflight(job, Settings()))


def test_a_model_with_fewer_classes_than_the_labels_is_refused() -> None:
    job = train({"in_features": 64, "hidden": [8], "num_classes": 3})
    with pytest.raises(InvalidArgument, match="num_classes=3 .* set it to 10 or more"):
        asyncio.run(preflight(job, Settings()))


def test_a_model_that_fits_the_builtin_rows_passes() -> None:
    asyncio.run(preflight(train({"in_features": 64, "hidden": [8], "num_classes": 10}), Settings()))


@pytest.mark.parametrize(
    ("training", "says"),
    [
        ({"shards": 64, "split": "vertical"}, r"split='vertical' needs at least as many layers"),
        ({"workers": 64, "batch_size": 32}, r"batch_size=32 is more than the 22 training rows"),
    ],
    ids=["vertical-split", "batch-per-worker"],
)
def test_a_job_the_coordinator_could_not_plan_is_refused(training: dict, says: str) -> None:
    # Both passed a dry run and failed a second after they were published.
    job = {**train({"in_features": 64, "hidden": [8], "num_classes": 10}), "training": training}
    with pytest.raises(InvalidArgument, match=says):
        asyncio.run(preflight(job, Settings()))
