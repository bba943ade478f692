"""What `maas` prints when a command cannot go on: one line naming the problem, no traceback."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maas import cli
from maas.errors import InvalidArgument
from maas.textfile import read_text_file


def test_a_binary_file_given_as_text_is_named_with_what_it_was_for(tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\xcb\xff" * 8)
    with pytest.raises(InvalidArgument, match=r"job file .*weights.bin is not UTF-8 text"):
        read_text_file(binary, "job file")


def test_a_missing_file_is_named_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot read policy file .*nope.yaml"):
        read_text_file(tmp_path / "nope.yaml", "policy file")


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def writes_into_a_closed_pipe(args: argparse.Namespace, settings: object) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(cli, "build_parser", lambda: _parser(writes_into_a_closed_pipe))
    assert cli.main(["go"]) == 141
    assert capsys.readouterr().err == ""


def _parser(handler: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.set_defaults(func=handler)
    return parser


def test_an_unreachable_broker_is_one_line_without_the_kafka_clients_own(tmp_path: Path) -> None:
    env = {**os.environ, "MAAS_KAFKA_BOOTSTRAP": "127.0.0.1:1", "MAAS_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "maas", "jobs", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [done.stderr.strip()]  # one line
    assert done.stderr.startswith("maas: Unavailable: cannot reach Kafka at 127.0.0.1:1")


def test_an_error_message_prints_control_characters_as_text(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuses(args: argparse.Namespace, settings: object) -> int:
        raise InvalidArgument("job x\x1b[2Jy is unknown\nsecond line")

    monkeypatch.setattr(cli, "build_parser", lambda: _parser(refuses))
    assert cli.main(["go"]) == 1
    assert capsys.readouterr().err == (
        "maas: InvalidArgument: job x\\x1b[2Jy is unknown\nsecond line\n"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "list", "\udcff"],  # how Python hands on argument bytes that are not UTF-8
        ["models", "history", "digits", "--alias", "\udcff"],
        ["models", "show", "digits@\udcff"],
        ["models", "policy", "show", "\udcff"],
        ["predict", "minilm", "--text", "a\udcff"],
    ],
)
def test_an_argument_that_is_not_utf8_is_a_usage_error_naming_it(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_a_file_named_dash_is_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.write(write, b"type: train\n")
    os.close(write)
    monkeypatch.setattr(sys, "stdin", os.fdopen(read))
    assert read_text_file("-", "job file") == "type: train\n"


def test_datasets_help_names_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    from maas.datasets import BUILTINS

    with pytest.raises(SystemExit):
        cli.main(["datasets", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert [n for n in BUILTINS if f"builtin:{n}" not in shown] == []


def test_a_dataset_name_ending_in_npz_is_refused_naming_the_name_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "my-data.npz"
    data.write_bytes(b"")
    assert cli.main(["datasets", "upload", str(data), "my-data.npz"]) == 1
    err = capsys.readouterr().err
    assert "give it without .npz" in err and f"upload {data} my-data" in err


def test_a_dataset_name_longer_than_s3_takes_is_refused_before_uploading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SeaweedFS refused the key as too long; retried as if S3 were away, it ended Unavailable.
    data = tmp_path / "my-data.npz"
    data.write_bytes(b"")
    assert cli.main(["datasets", "upload", str(data), "b" * 201]) == 1
    assert "has 201 characters; at most 200 are accepted" in capsys.readouterr().err
