"""Job files: loading, completing the envelope, and mistakes named by field before publishing."""

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from maas import cli_jobs, events, jobs
from maas.cli import build_parser
from maas.config import Settings
from maas.errors import AlreadyExists, InvalidArgument, SchemaViolation

SETTINGS = Settings()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def check(doc, settings=SETTINGS):
    return jobs.check_job(jobs.prepare_job(doc), settings)


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
    job = check(jobs.load_job_file(path))
    assert job["schema"] == events.JOB
    assert job["job_id"].startswith("train-")
    assert job["id"] and job["ts"] > 0


def test_a_yaml_nan_anywhere_in_a_job_is_refused_naming_where(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "type: compress\nbase: {name: m}\ncompress: {methods: [{prune: {sparsity: .nan}}]}\n"
    )
    with pytest.raises(
        SchemaViolation, match=r"compress\.methods\.0\.prune\.sparsity=nan is not a finite"
    ):
        check(jobs.load_job_file(path))


def test_an_integer_beyond_64_bits_is_refused_naming_where_before_publishing():
    doc = train_doc(training={"staleness": 10**20, "optimizer": {"name": "sgd", "lr": 0.1}})
    with pytest.raises(SchemaViolation, match=r"training\.staleness is a 67-bit integer, beyond"):
        check(doc)


def test_a_job_file_nested_past_the_parsers_depth_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(InvalidArgument, match="deep.yaml nests lists or mappings deeper"):
        jobs.load_job_file(path)


def test_a_job_file_linked_to_an_endless_device_is_refused_once_the_limit_is_read(tmp_path):
    path = tmp_path / "job.yaml"
    path.symlink_to("/dev/zero")  # read whole, it would fill memory
    with pytest.raises(InvalidArgument, match="holds over 16777216 bytes"):
        jobs.load_job_file(path)


def test_a_job_file_from_a_pipe_is_read_as_process_substitution_gives_it(tmp_path):
    import os
    import threading

    path = tmp_path / "job.fifo"
    os.mkfifo(path)
    text = "type: train\nmodel: {name: m, arch: mlp}\ndataset: {uri: 'builtin:digits'}\n"
    writer = threading.Thread(target=path.write_text, args=(text,))
    writer.start()
    try:
        assert jobs.load_job_file(path)["model"] == {"name": "m", "arch": "mlp"}
    finally:
        writer.join(timeout=10)


def test_a_job_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    from maas import textfile

    monkeypatch.setattr(textfile, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "job.yaml"
    path.write_text("# " + "x" * 2000 + "\n")
    with pytest.raises(InvalidArgument, match="holds over 1000 bytes"):
        jobs.load_job_file(path)


@pytest.mark.parametrize(
    ("methods", "complaint"),
    [
        ([{"chain": [{"quantize": {}}, {"prune": {}}]}], "quantize must be the last method"),
        ([{"distill": {"steps": 10**9}}], r"distill\.steps: 1000000000 is greater than the max"),
    ],
)
def test_a_compress_job_the_compressor_would_refuse_is_refused_before_it_is_sent(
    methods, complaint
):
    doc = {"type": "compress", "base": {"name": "m"}, "compress": {"methods": methods}}
    with pytest.raises(InvalidArgument, match=complaint):
        check(doc)


@pytest.mark.parametrize(
    ("training", "unread"),
    [
        ({"freeze": ["body."]}, "training.freeze"),
        ({"optimizer": {"name": "sgd", "lr": 0.1}}, "training.optimizer.name='sgd'"),
        ({"optimizer": {"lr": 0.1, "momentum": 0.9}}, "training.optimizer.momentum"),
    ],
)
def test_a_training_field_a_compress_job_would_ignore_is_refused_naming_it(training, unread):
    doc = {"type": "compress", "base": {"name": "m"}, "training": training,
           "compress": {"methods": [{"prune": {"sparsity": 0.5}}]}}  # fmt: skip
    with pytest.raises(InvalidArgument, match=re.escape(f"does not read {unread}")):
        check(doc)


def test_a_compress_job_takes_the_training_fields_its_recovery_reads():
    training = {"batch_size": 8, "seed": 3, "optimizer": {"name": "adam", "lr": 0.01}}
    doc = {"type": "compress", "base": {"name": "m"}, "training": training,
           "compress": {"methods": [{"prune": {"sparsity": 0.5}}]}}  # fmt: skip
    assert check(doc)["training"] == training


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
        check(train_doc(**change))


def test_a_train_job_without_a_dataset_is_refused():
    doc = train_doc()
    del doc["dataset"]
    with pytest.raises(InvalidArgument, match="needs dataset"):
        check(doc)


def test_a_cancel_event_names_only_the_job_to_stop():
    assert check({"type": "cancel", "job_id": "train-1"})["type"] == "cancel"


def test_a_cancel_event_carrying_a_job_section_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match="model"):
        check({"type": "cancel", "job_id": "train-1", "model": {"name": "x"}})


def test_a_compress_job_needs_a_base_model():
    with pytest.raises(InvalidArgument, match="needs base"):
        check({"type": "compress", "compress": {"methods": [{"quantize": {}}]}})


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (train_doc(base={"name": "m"}), "a train job does not read base"),
        (train_doc(compress={"methods": [{"quantize": {}}]}), "does not read compress"),
        (
            {"type": "compress", "base": {"name": "m"}, "model": {"name": "x"},
             "compress": {"methods": [{"quantize": {}}]}},
            "a compress job does not read model",
        ),
        (
            {"type": "finetune", "base": {"name": "m", "version": 1, "alias": "production"},
             "dataset": {"uri": "builtin:digits"}},
            "base: give version or alias, not both",
        ),
    ],
    ids=["train-base", "train-compress", "compress-model", "base-version-and-alias"],
)  # fmt: skip
def test_a_section_the_job_would_ignore_is_refused(doc, message):
    with pytest.raises(InvalidArgument, match=message):
        check(doc)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trainig": {"steps": 5}}, "trainig: unknown key; did you mean 'training'?"),
        ({"training": {"step": 5}}, "training.step: unknown key; did you mean 'steps'?"),
        (
            {"training": {"optimizer": {"name": "sgd", "momentm": 0.9}}},
            "training.optimizer.momentm: unknown key; did you mean 'momentum'?",
        ),
        ({"dataset": {"uri": "builtin:digits", "tsk": "x"}}, "dataset.tsk: unknown key"),
        (
            {"model": {"name": "m", "arch": "mlp", "config": {"hidn": [3]}}},
            "model.config.hidn: unknown key; did you mean 'hidden'?",
        ),
        ({"register_as": {"nmae": "m"}}, "register_as.nmae: unknown key; did you mean 'name'?"),
    ],
)
def test_an_unknown_key_at_any_level_is_refused_with_its_path_and_a_suggestion(change, message):
    with pytest.raises(InvalidArgument) as refused:
        check(train_doc(**change))
    assert message in refused.value.message


def test_a_key_like_no_known_one_lists_what_is_accepted():
    with pytest.raises(
        InvalidArgument, match=r"training\.zzz: unknown key; accepted: .*batch_size"
    ):
        check(train_doc(training={"zzz": 1}))


def test_unknown_keys_in_compress_methods_and_chains_are_named():
    job = {
        "type": "compress",
        "base": {"name": "m"},
        "compress": {"methods": [{"chain": [{"prune": {"sparsty": 0.5}}]}]},
    }
    with pytest.raises(InvalidArgument, match="sparsty: unknown key; did you mean 'sparsity'"):
        check(job)


def test_the_dry_run_and_the_services_refuse_with_the_same_words():
    # The services validate each consumed event against the same schema before check_job.
    job = jobs.prepare_job(train_doc(training={"optimizer": {"momentm": 0.9}}))
    with pytest.raises(InvalidArgument) as by_cli:
        jobs.check_job(job, SETTINGS)
    with pytest.raises(InvalidArgument) as by_consumer:
        events.validate(job, events.JOB)
    assert by_cli.value.message == by_consumer.value.message


def test_a_model_over_the_parameter_limit_is_refused_naming_the_field_without_building_it():
    doc = train_doc(model={"name": "m", "arch": "mlp", "config": {"hidden": [10**11]}})
    with pytest.raises(InvalidArgument, match=r"model\.config\.hidden\[0\].*MAAS_MAX_MODEL_PARAMS"):
        check(doc)


def test_the_parameter_limit_is_a_setting():
    doc = train_doc(model={"name": "m", "arch": "mlp", "config": {"hidden": [32]}})
    check(doc, Settings(max_model_params=64 * 32 + 32 + 32 * 10 + 10))
    with pytest.raises(InvalidArgument, match="MAAS_MAX_MODEL_PARAMS=2,409"):
        check(doc, Settings(max_model_params=2409))


def test_a_distill_student_over_the_limit_is_refused_naming_its_place():
    student = {"arch": "mlp", "config": {"hidden": [10**9]}}
    job = {
        "type": "compress",
        "base": {"name": "m"},
        "compress": {"methods": [{"distill": {"student": student}}]},
    }
    with pytest.raises(InvalidArgument, match=r"compress\.methods\[0\]\.distill\.student"):
        check(job)


def test_s3_datasets_come_only_from_the_allowed_buckets():
    doc = train_doc(dataset={"uri": "s3://elsewhere/data.npz"})
    with pytest.raises(InvalidArgument, match="bucket 'elsewhere'.*MAAS_DATASET_BUCKETS"):
        check(doc)
    check(doc, Settings(dataset_buckets="maas-datasets, elsewhere"))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_job_passes_the_check(path):
    check(jobs.load_job_file(path))


def test_an_unreadable_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(InvalidArgument, match="broken.json is not valid json"):
        jobs.load_job_file(path)


def test_a_yaml_number_with_an_exponent_is_a_number_as_in_json(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("training:\n  optimizer: {lr: 1e-3, eps: 1.0e8, decay: .5E-2}\n  note: 1e\n")
    training = jobs.load_job_file(path)["training"]
    assert training["optimizer"] == {"lr": 0.001, "eps": 1e8, "decay": 0.005}
    assert training["note"] == "1e"  # not a number: stays text


def test_a_file_that_is_not_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2")
    with pytest.raises(InvalidArgument, match="broken.yaml is not valid YAML"):
        jobs.load_job_file(path)


@pytest.mark.parametrize(
    "value", ["2020-13-45", "9" * 5000, "!!int x", "2001-12-14t21:59:43.10-99:99"]
)
def test_a_value_yaml_cannot_construct_names_the_file(tmp_path, value):
    path = tmp_path / "odd.yaml"
    path.write_text(f"type: train\nnote: {value}\n")
    with pytest.raises(InvalidArgument, match="odd.yaml holds a value YAML cannot read"):
        jobs.load_job_file(path)


def status(state, **fields):
    return events.new_event(events.JOB_STATUS, job_id="j", state=state, **fields)


def test_a_summary_follows_progress_to_the_registered_model():
    summary = jobs.JobSummary("j")
    summary.apply(status("running", step=5, total_steps=10, metrics={"loss": 0.5}))
    summary.apply(status("succeeded", step=10, model={"name": "m", "version": 3}))
    assert summary.done and summary.step == 10 and summary.metrics["loss"] == 0.5
    assert summary.model == {"name": "m", "version": 3}


def test_a_summary_keeps_the_reason_of_its_latest_status_only():
    summary = jobs.JobSummary("j")
    summary.apply(status("queued", reason="waiting for job a to finish"))
    assert summary.reason == "waiting for job a to finish"
    summary.apply(status("running", step=1, total_steps=2))
    assert summary.reason == ""
    summary.apply(status("succeeded", step=2, reason="promotion: m@production -> 3"))
    assert summary.reason == "promotion: m@production -> 3"


def test_a_summary_lists_every_model_a_compress_job_registered():
    summary = jobs.JobSummary("j")
    variants = [{"name": "m", "version": 2, "method": "quantize"}, {"name": "m", "version": 3}]
    summary.apply(status("succeeded", model={"name": "m", "version": 3}, models=variants))
    assert summary.models == variants


def test_a_late_running_event_does_not_undo_a_terminal_state():
    summary = jobs.JobSummary("j")
    summary.apply(status("failed", error={"code": "x", "message": "boom"}))
    summary.apply(status("running", step=3))
    assert summary.state == "failed" and summary.error["message"] == "boom"


def summary(job_id, state, updated_ms):
    found = jobs.JobSummary(job_id)
    found.state, found.updated_ms = state, updated_ms
    return found


def test_a_listing_keeps_the_states_asked_for_and_the_most_recent_last():
    known = [summary("a", "running", 3), summary("b", "succeeded", 1), summary("c", "queued", 2)]
    picked = jobs.latest(known, states=["running", "queued"], last=1)
    assert [s.job_id for s in picked] == ["a"]
    assert [s.job_id for s in jobs.latest(known)] == ["b", "c", "a"]


def test_a_listing_for_a_state_no_job_has_names_the_accepted_ones():
    with pytest.raises(InvalidArgument, match="'runing' is no job state; accepted: accepted"):
        jobs.check_states(["runing"])


def test_the_job_states_are_the_status_schemas():
    schema = json.loads((events.schemas_dir() / "events" / "job-status.json").read_text())
    assert set(schema["properties"]["state"]["enum"]) == jobs.JOB_STATES


def test_a_listing_shows_the_date_of_an_update_from_another_day():
    now = dt.datetime(2026, 12, 5, 21, 0, 0)
    today = int(dt.datetime(2026, 12, 5, 9, 30, 5).timestamp() * 1000)
    assert cli_jobs.when(today, now) == "09:30:05"
    assert cli_jobs.when(0, now) == dt.datetime.fromtimestamp(0).strftime("%Y-%m-%d %H:%M")


def accepted(job) -> jobs.JobSummary:
    """What the status topic knows of ``job``'s id once a service accepted it."""
    known = jobs.JobSummary(job["job_id"])
    known.apply(
        {"job_id": job["job_id"], "state": "accepted", "content_sha256": jobs.content_sha256(job)}
    )
    return known


def test_watching_a_plan_id_without_status_says_which_versions_get_a_plan() -> None:
    assert "registered before any policy gets no plan" in cli_jobs._plan_hint("policy-m-3")
    assert cli_jobs._plan_hint("train-3f2a9c01de") == ""


def test_an_id_accepted_for_the_same_content_is_free_for_a_resubmission() -> None:
    job = check(train_doc(job_id="mine"))
    again = dict(job, id="another-envelope", ts=job["ts"] + 1)  # a retry: new envelope
    jobs.check_id_free(again, accepted(job))
    jobs.check_id_free(job, jobs.JobSummary("mine"))  # no service has said what it accepted


def test_an_id_accepted_for_other_content_is_refused_naming_it() -> None:
    first = check(train_doc(job_id="mine"))
    edited = check(train_doc(job_id="mine", training={"steps": 11}))
    with pytest.raises(AlreadyExists, match="job_id 'mine' belongs to another job"):
        jobs.check_id_free(edited, accepted(first))


@pytest.mark.parametrize(
    ("training", "refused"),
    [
        ({"freeze": [""]}, "training.freeze=[''] must be a list of non-empty parameter-name"),
        ({"mode": "sync", "sync_every": 4}, "sync_every applies to mode 'local_sgd' only"),
        ({"steps": 5, "epochs": 1}, "training.steps and training.epochs are exclusive"),
        ({"workers": 2, "min_workers": 3}, "min_workers=3 must be at most training.workers=2"),
        ({"mode": "async", "quorum": 0.5}, "training.quorum applies to modes 'sync' and"),
    ],
)
def test_the_cli_judges_the_training_section_as_the_coordinator_does(training, refused) -> None:
    # --dry-run said "a valid train job" for these; the coordinator then refused them.
    training = {"optimizer": {"name": "sgd", "lr": 0.1}, **training}
    with pytest.raises(InvalidArgument, match=re.escape(refused)):
        check(train_doc(training=training))


def test_submit_with_watch_takes_a_timeout_as_watch_does() -> None:
    args = build_parser().parse_args(["jobs", "submit", "job.yaml", "--watch", "--timeout-s", "5"])
    assert (args.watch, args.timeout_s) == (True, 5.0)


def test_submitting_a_job_that_already_ran_publishes_nothing_and_reports_that_run(
    tmp_path, monkeypatch, capsys
) -> None:
    # Published again, a failed compress job re-ran while --watch showed the old failure.
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(train_doc(job_id="mine")))
    ran = accepted(check(train_doc(job_id="mine")))
    ran.apply({"job_id": "mine", "state": "failed", "error": {"code": "x", "message": "y"}})

    async def known(settings, job_id):
        return ran

    async def publish(settings, job):
        raise AssertionError("published a job whose id already ran")

    monkeypatch.setattr(jobs, "summary_of", known)
    monkeypatch.setattr(jobs, "publish_job", publish)
    args = build_parser().parse_args(["jobs", "submit", str(path), "--watch"])
    assert args.func(args, SETTINGS) == 1
    assert "job mine already ran: failed" in capsys.readouterr().out


def test_cancelling_a_job_that_already_ended_publishes_nothing_and_says_so(
    monkeypatch, capsys
) -> None:
    ran = accepted(check(train_doc(job_id="mine")))
    ran.apply({"job_id": "mine", "state": "succeeded"})

    async def known(settings, job_id):
        return ran

    async def publish(settings, job):
        raise AssertionError("published a cancel for a job that is over")

    monkeypatch.setattr(jobs, "summary_of", known)
    monkeypatch.setattr(jobs, "publish_job", publish)
    args = build_parser().parse_args(["jobs", "cancel", "mine"])
    assert args.func(args, SETTINGS) == 1
    assert (
        "job mine already ended: succeeded; there is nothing to cancel" in capsys.readouterr().out
    )


@pytest.mark.parametrize("version", [0, -3])
def test_a_base_version_out_of_range_is_refused_naming_base_version(version):
    doc = {"type": "compress", "base": {"name": "digits-mlp", "version": version},
           "compress": {"methods": [{"quantize": {"dtype": "int8"}}]}}  # fmt: skip
    with pytest.raises(InvalidArgument, match=f"base.version {version} is malformed"):
        check(doc)


def test_a_job_id_of_the_policy_plans_form_is_refused_before_it_is_sent():
    doc = train_doc(job_id="policy-digits-mlp-3")
    with pytest.raises(InvalidArgument, match=r"'policy-' are the policy plans' own"):
        check(doc)


def test_a_cancel_may_name_a_policy_plan():
    cancel = events.new_event(events.JOB, job_id="policy-digits-mlp-3", type="cancel")
    assert jobs.check_job(cancel, SETTINGS)["job_id"] == "policy-digits-mlp-3"


BATCHNORM_NET = {
    "arch": "sequential",
    "config": {"input_shape": [64], "layers": [{"type": "linear", "out_features": 8}, "batchnorm"]},
}


def test_a_batchnorm_model_trained_on_batches_of_one_row_is_refused_naming_the_layer():
    doc = train_doc(
        model={"name": "bn", **BATCHNORM_NET},
        training={"steps": 10, "batch_size": 1, "optimizer": {"name": "sgd", "lr": 0.1}},
    )
    with pytest.raises(InvalidArgument, match=r"training.batch_size=1: model.config.layers\[1\]"):
        check(doc)


def test_a_batchnorm_student_distilled_on_batches_of_one_row_is_refused():
    doc = {
        "type": "compress",
        "base": {"name": "digits-mlp", "version": 1},
        "compress": {"methods": [{"distill": {"student": BATCHNORM_NET, "steps": 5}}]},
        "training": {"batch_size": 1},
    }
    with pytest.raises(InvalidArgument, match=r"distill.student.config.layers\[1\] \(batchnorm\)"):
        check(doc)


def test_a_batchnorm_model_on_batches_of_two_rows_passes():
    training = {"steps": 10, "batch_size": 2, "optimizer": {"name": "sgd", "lr": 0.1}}
    check(train_doc(model={"name": "bn", **BATCHNORM_NET}, training=training))


def test_a_prune_of_sparsity_zero_is_refused():
    # It registered an identical copy of its parent as a "pruned" variant.
    doc = {"type": "compress", "base": {"name": "digits-mlp", "version": 1},
           "compress": {"methods": [{"prune": {"sparsity": 0}}]}}  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"compress.methods.0.prune.sparsity: 0 is less"):
        check(doc)


def test_a_failure_whose_message_holds_markup_and_escapes_prints_as_text(capsys):
    message = "dataset s3://maas-datasets/p[/bold].npz \x1b[2J is missing"
    summary = jobs.JobSummary("j", state="failed", error={"code": "NOT_FOUND", "message": message})
    cli_jobs.print_final(summary)
    out = capsys.readouterr().out
    assert "p[/bold].npz \\x1b[2J is missing" in out and "\x1b[2J" not in out
