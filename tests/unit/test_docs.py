"""What the docs name exists: every MAAS_* variable, topic, `maas` command, builtin dataset and
local port in README.md, docs/*.md and deploy/k8s/README.md is one the code has."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from maas.cli import build_parser
from maas.config import Settings, known_env_names
from maas.datasets import BUILTINS
from maas.topics import ALL_TOPICS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy/k8s/README.md"]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Read by a script or the test fixtures, not by the platform (so not in maas.config).
NOT_SETTINGS = {
    "MAAS_TEST_USE_RUNNING_STACK": ROOT / "tests" / "conftest.py",
    "MAAS_E2E_USE_RUNNING_STACK": ROOT / "tests" / "e2e" / "test_platform.py",
    "MAAS_PYTHON": ROOT / "infra" / "dev.sh",
    "MAAS_TORCH": ROOT / "infra" / "dev.sh",
    "MAAS_FUZZ_INFER_REQUESTS": ROOT / "tests" / "fuzz" / "test_infer_fuzz.py",
    "MAAS_FUZZ_HTTP_REQUESTS": ROOT / "tests" / "fuzz" / "test_http_fuzz.py",
}
_ENV = re.compile(r"\bMAAS_[A-Z0-9_]*")
_VERSIONED = re.compile(r"\bmaas\.[a-z][a-z-]*\.v[0-9]+\b")
_FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE_CLI = re.compile(r"`(maas [^`]+)`")
TIMES = "\N{MULTIPLICATION SIGN}"  # the table writes `aggregator` (x2, ...) with it
_PORT = re.compile(r"\b(\d{4,5})(?:-(\d{4,5}))?\b")


def _text(path: Path) -> str:
    return path.read_text()


def _ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


# --- environment variables -------------------------------------------------------------------


def _known(name: str) -> bool:
    # MAAS_PORT_* (host ports) and MAAS_COMPOSE_* (endpoints, published and advertised host)
    # are Compose's own knobs: known where docker-compose.yml reads them.
    knobs = {
        n
        for n in _ENV.findall(COMPOSE_FILE.read_text())
        if n.startswith(("MAAS_PORT_", "MAAS_COMPOSE_"))
    }
    known = known_env_names() | set(NOT_SETTINGS) | knobs
    if name.endswith("_"):  # a wildcard such as MAAS_*_LISTEN, written MAAS_
        return any(k.startswith(name) for k in known)
    return name in known


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_maas_variable_a_doc_names_exists(doc: Path) -> None:
    unknown = sorted({n for n in _ENV.findall(_text(doc)) if not _known(n)})
    assert unknown == [], f"{doc.name} names variables nothing reads"


def test_every_variable_that_is_no_setting_is_read_where_the_allow_list_says() -> None:
    for name, reader in NOT_SETTINGS.items():
        assert name not in known_env_names(), f"{name} is a setting now; drop it from the list"
        assert name in reader.read_text(), f"{reader} no longer reads {name}"


def test_the_variable_check_refuses_a_typo() -> None:
    assert _known("MAAS_KAFKA_BOOTSTRAP") and _known("MAAS_PORT_KAFKA")
    assert not _known("MAAS_KAFKA_BOOTSTRAPS")
    assert not _known("MAAS_PORT_NOTHING")


# --- topics ----------------------------------------------------------------------------------


def _proto_packages() -> set[str]:
    packages: set[str] = set()
    for proto in (ROOT / "schemas" / "proto").rglob("*.proto"):
        packages |= set(re.findall(r"^package ([\w.]+);", proto.read_text(), re.MULTILINE))
    return packages


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_topic_a_doc_names_exists(doc: Path) -> None:
    # `maas.<name>.v<N>` is a topic or a gRPC package; anything else is a topic that is gone.
    topics = {t.name for t in ALL_TOPICS}
    named = set(_VERSIONED.findall(_text(doc)))
    assert sorted(named - topics - _proto_packages()) == []


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_topic_table_row_has_the_real_key_partitions(doc: Path) -> None:
    partitions = {t.name: t.partitions for t in ALL_TOPICS}
    rows = re.findall(r"^\| `(maas\.[a-z0-9.-]+)` \| [^|]+ \| (\d+) \|", _text(doc), re.MULTILINE)
    for topic, count in rows:
        assert partitions.get(topic) == int(count), f"{doc.name}: {topic} has {count}"


def test_the_topic_tables_list_every_topic() -> None:
    for doc in (ROOT / "docs" / "OPERATIONS.md", ROOT / "docs" / "ARCHITECTURE.md"):
        rows = set(re.findall(r"^\| `(maas\.[a-z0-9.-]+)` \|", _text(doc), re.MULTILINE))
        assert rows >= {t.name for t in ALL_TOPICS}, doc.name


# --- `maas` commands -------------------------------------------------------------------------


def _shell_commands(doc: Path) -> list[list[str]]:
    """`maas ...` command lines of the doc's shell code blocks, split like a shell would."""
    commands = []
    for lang, body in _FENCE.findall(_text(doc)):
        if lang not in ("", "bash", "sh", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            segment: list[str] = []
            for token in [*tokens, "&&"]:
                if token in ("&&", "||", ";", "|", "&"):
                    while segment and re.match(r"^[A-Z_][A-Z0-9_]*=", segment[0]):
                        segment.pop(0)  # VAR=value prefixes
                    if segment[:1] == ["maas"]:
                        commands.append(segment[1:])
                    segment = []
                else:
                    segment.append(token)
    return commands


def _parses(argv: list[str]) -> str | None:
    """None if the real parser accepts argv, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code != 0:
            return err.getvalue().strip().splitlines()[-1]
    return None


def _command_path(argv: list[str]) -> tuple[list[str], str | None]:
    """The leading words of argv that are subcommands (flags between them skipped), and the
    first word a command group did not know (None when the path ends at a command)."""
    parser: Any = build_parser()
    path: list[str] = []
    for token in argv:
        if token.startswith("-"):
            continue
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not groups:
            return path, None
        if token not in groups[0].choices:
            return path, token
        parser = groups[0].choices[token]
        path.append(token)
    return path, None


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_maas_command_in_a_code_block_parses(doc: Path) -> None:
    failures = [(" ".join(c), why) for c in _shell_commands(doc) if (why := _parses(c))]
    assert failures == []


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_inline_maas_command_names_real_subcommands(doc: Path) -> None:
    # Inline mentions may hold placeholders (`maas models import SOURCE`): their subcommands,
    # down to the last group, must exist and answer --help.
    for text in _INLINE_CLI.findall(_text(doc)):
        path, unknown = _command_path(shlex.split(text)[1:])
        assert unknown is None, f"{doc.name}: `{text}`: no command {unknown!r}"
        assert _parses([*path, "--help"]) is None, text


def test_the_command_checks_refuse_what_does_not_exist() -> None:
    assert _parses(["models", "show", "digits-mlp@staging"]) is None
    assert _parses(["models", "promote", "digits-mlp"]) is not None
    assert _parses(["stack", "up", "--shard-partitions", "16"]) is not None
    assert _command_path(["stack", "--infra-only", "up"]) == (["stack", "up"], None)
    assert _command_path(["predict", "NAME", "--input", "x"]) == (["predict"], None)
    assert _command_path(["models", "promote", "x"]) == (["models"], "promote")
    assert _command_path(["COMMAND", "--help"]) == ([], "COMMAND")


# --- datasets --------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_builtin_dataset_a_doc_names_exists(doc: Path) -> None:
    named = set(re.findall(r"\bbuiltin:([a-z0-9-]*[a-z0-9])", _text(doc)))
    assert sorted(named - set(BUILTINS)) == []


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_every_job_file_a_doc_shows_passes_the_job_checks(doc: Path) -> None:
    from maas.jobs import check_job, prepare_job

    for lang, body in _FENCE.findall(_text(doc)):
        job = yaml.safe_load(body) if lang == "yaml" else None
        if isinstance(job, dict) and "type" in job:
            check_job(prepare_job(job), Settings.from_env({}))  # raises naming the field


# --- ports -----------------------------------------------------------------------------------


def _local_table() -> list[tuple[str, str, set[int]]]:
    """(component, its cell, ports) of OPERATIONS' "What runs locally" table."""
    text = _text(ROOT / "docs" / "OPERATIONS.md")
    section = text.split("## What runs locally", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in section.splitlines()[2:]:
        component, _what, ports = (cell.strip() for cell in line.strip("|").split("|"))
        numbers: set[int] = set()
        for first, last in _PORT.findall(ports):
            numbers |= set(range(int(first), int(last or first) + 1))
        rows.append((re.findall(r"`([a-z0-9-]+)`", component)[0], component, numbers))
    return rows


def _compose_ports(service: dict[str, Any]) -> set[int]:
    return {int(n) for n in re.findall(r"\b\d{4,5}\b", yaml.safe_dump(service))}


def test_every_service_port_in_the_local_table_is_compose_s(compose: dict[str, Any]) -> None:
    services = compose["services"]
    rows = [row for row in _local_table() if row[0] in services and row[0] != "kafka"]
    assert {"model-registry", "inference", "aggregator", "gradient-worker"} <= {r[0] for r in rows}
    for name, component, ports in rows:
        replicas = services[name].get("deploy", {}).get("replicas", 1)
        if TIMES in component:
            assert f"{TIMES}{replicas}" in component, f"{name} runs {replicas} replicas in compose"
        base = _compose_ports(services[name])
        # Replicas on one host: each gets the compose port + its replica index.
        stray = {p for p in ports if not any(p - r in base for r in range(replicas))}
        assert stray == set(), f"{name}: ports {sorted(stray)} are not in docker-compose.yml"


def test_the_infrastructure_ports_in_the_local_table_are_the_native_defaults() -> None:
    from infra.s3 import WeedPorts

    settings = Settings.from_env({})
    kafka = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    s3 = int(settings.s3_endpoint.rsplit(":", 1)[1])
    table = {name: ports for name, _, ports in _local_table()}
    assert table["kafka"] == {kafka, kafka + 1}  # client, then the controller
    assert table["s3"] == set(WeedPorts.after(s3).all())
