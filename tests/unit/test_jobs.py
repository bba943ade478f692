"""Job files: loading, completing the envelope, and mistakes named by field before publishing."""

import pytest

from maas import events, jobs
from maas.errors import InvalidArgument


def train_doc(**overrides):
    doc = {
        "type": "train",
        "model": {"name": "digits-mlp", "arch": "mlp", "config": {"hidden": [32]}},
        "dataset": {"uri": "builtin:digits"},
        "training": {"steps": 10, "optimizer": {"name": "sgd", "lr": 0.1}},
    }
    doc.update(overrides)
    return doc


def test_a_yaml_job_file_becomes_a_complete_job_event(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("type: train\nmodel: {name: m, arch: mlp}\ndataset: {uri: 'builtin:digits'}\n")
    job = jobs.check_job(jobs.prepare_job(jobs.load_job_file(path)))
    assert job["schema"] == events.JOB
    assert job["job_id"].startswith("train-")
    assert job["id"] and job["ts"] > 0


def test_an_explicit_job_id_is_kept_as_the_idempotency_key():
    assert jobs.prepare_job(train_doc(job_id="mine"))["job_id"] == "mine"
    assert jobs.prepare_job(train_doc(), job_id="override")["job_id"] == "override"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"name": "m", "arch": "transformer"}}, "unknown arch 'transformer'"),
        ({"training": {"optimizer": {"lr": -1}}}, r"training\.optimizer\.lr"),
        ({"dataset": {"uri": "builtin:imagenet"}}, "builtin:digits"),
        ({"model": {"name": "m", "arch": "mlp", "config": {"hiddden": [3]}}}, "hiddden"),
    ],
)
def test_a_mistake_is_refused_naming_the_field(change, field):
    with pytest.raises(InvalidArgument, match=field):
        jobs.check_job(jobs.prepare_job(train_doc(**change)))


def test_a_train_job_without_a_dataset_is_refused():
    doc = train_doc()
    del doc["dataset"]
    with pytest.raises(InvalidArgument, match="needs dataset"):
        jobs.check_job(jobs.prepare_job(doc))


def test_a_compress_job_needs_a_base_model():
    with pytest.raises(InvalidArgument, match="needs base"):
        jobs.check_job(
            jobs.prepare_job({"type": "compress", "compress": {"methods": [{"quantize": {}}]}})
        )


def test_an_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="broken.json is not valid json"):
        jobs.load_job_file(path)


def status(state, **fields):
    return events.new_event(events.JOB_STATUS, job_id="j", state=state, **fields)


def test_a_summary_follows_progress_to_the_registered_model():
    summary = jobs.JobSummary("j")
    summary.apply(status("running", step=5, total_steps=10, metrics={"loss": 0.5}))
    summary.apply(status("succeeded", step=10, model={"name": "m", "version": 3}))
    assert summary.done and summary.step == 10 and summary.metrics["loss"] == 0.5
    assert summary.model == {"name": "m", "version": 3}


def test_a_late_running_event_does_not_undo_a_terminal_state():
    summary = jobs.JobSummary("j")
    summary.apply(status("failed", error={"code": "x", "message": "boom"}))
    summary.apply(status("running", step=3))
    assert summary.state == "failed" and summary.error["message"] == "boom"
