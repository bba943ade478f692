"""`maas models alias` with a split, `maas models policy set/show`, and the policy in `maas
models show`, against a fake registry client."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from maas.cli import build_parser
from maas.cli_models import _alias, _show
from maas.cli_policy import _policy_clear, _policy_set, _policy_show
from maas.errors import InvalidArgument, NotFound
from maas.registry.types import AliasChange, ModelVersion, PolicyVersion

POLICY = {"promote": {"alias": "production", "rule": "best_accuracy"}}


class Client:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def set_alias(self, name, alias, version, *, reason=""):
        self.calls.append(("set_alias", name, alias, version, reason))
        return AliasChange(name, alias, 3, version, "admin", 0, reason)

    async def set_split(self, name, alias, targets, *, reason=""):
        self.calls.append(("set_split", name, alias, targets, reason))
        return AliasChange(name, alias, 3, targets[0][0], "admin", 0, reason, tuple(targets))

    async def set_policy(self, name, document):
        self.calls.append(("set_policy", name, document))
        return PolicyVersion(name, 2, document, "admin", 0)

    async def get(self, ref):
        if ref.name != "digits":
            raise NotFound(f"model {ref.name!r} is not registered")
        return ModelVersion(ref.name, 3, "mlp", "dense", b"{}", "", (), "maas-models", "x/3/")

    async def get_policy(self, name, version=None):
        if name != "digits":
            raise NotFound(f"model {name!r} has no policy")
        return PolicyVersion(name, version or 2, POLICY, "admin", 0)


def parse(*words: str) -> argparse.Namespace:
    return build_parser().parse_args(["models", *words])


ACTIONS = {"alias": _alias, "set": _policy_set, "clear": _policy_clear, "show": _policy_show}


async def run(args: argparse.Namespace, client: Client) -> None:
    """The action the parsed command names, with the fake client in place of the real one."""
    action = ACTIONS[getattr(args, "policy_command", None) or args.models_command]
    assert await action(client, args) == 0


async def test_alias_with_version_then_alias_moves_it_whole(capsys):
    client = Client()
    await run(parse("alias", "digits", "4", "production", "--reason", "rollback"), client)
    assert client.calls == [("set_alias", "digits", "production", 4, "rollback")]
    assert "digits@production -> 4 (was 3)" in capsys.readouterr().out


async def test_alias_with_weights_splits_it(capsys):
    client = Client()
    await run(parse("alias", "digits", "production", "4=90", "5=10"), client)
    assert client.calls == [("set_split", "digits", "production", [(4, 90), (5, 10)], "")]
    assert "digits@production -> 4=90, 5=10" in capsys.readouterr().out


@pytest.mark.parametrize("pair", ["4:90", "²=90", "4=" + "9" * 5000])
async def test_a_malformed_weight_names_the_form_to_use(pair):
    with pytest.raises(InvalidArgument, match="VERSION=WEIGHT"):
        await run(parse("alias", "digits", "production", pair), Client())


async def test_a_version_of_more_digits_than_int64_has_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match="versions are integers from 1"):
        await run(parse("alias", "digits", "9" * 5000, "production"), Client())


async def test_policy_set_reads_the_yaml_file(tmp_path: Path, capsys):
    file = tmp_path / "policy.yaml"
    file.write_text("promote:\n  alias: production\n  rule: best_accuracy\n")
    client = Client()
    await run(parse("policy", "set", "digits", str(file)), client)
    assert client.calls == [("set_policy", "digits", POLICY)]
    assert "policy version 2" in capsys.readouterr().out


async def test_policy_set_for_a_model_not_registered_yet_says_so(tmp_path: Path, capsys):
    file = tmp_path / "policy.yaml"
    file.write_text("promote:\n  alias: production\n  rule: best_accuracy\n")
    await run(parse("policy", "set", "digts", str(file)), Client())
    assert "no model 'digts' is registered yet" in capsys.readouterr().err


async def test_policy_clear_for_a_model_not_registered_yet_says_so(capsys):
    await run(parse("policy", "clear", "digts"), Client())
    assert "no model 'digts' is registered yet" in capsys.readouterr().err


async def test_policy_set_of_a_missing_file_says_which(tmp_path: Path):
    with pytest.raises(InvalidArgument, match="cannot read policy file"):
        await run(parse("policy", "set", "digits", str(tmp_path / "none.yaml")), Client())


async def test_policy_set_of_a_file_that_sets_nothing_points_at_clear(tmp_path: Path):
    file = tmp_path / "empty.yaml"
    file.write_text("{}\n")
    client = Client()
    with pytest.raises(InvalidArgument, match="run: maas models policy clear digits"):
        await run(parse("policy", "set", "digits", str(file)), client)
    assert client.calls == []


async def test_policy_clear_stores_the_empty_policy(capsys):
    client = Client()
    await run(parse("policy", "clear", "digits"), client)
    assert client.calls == [("set_policy", "digits", {})]
    assert "none (no plan or promotion from now on" in capsys.readouterr().out


async def test_policy_show_prints_the_document_as_yaml(capsys):
    await run(parse("policy", "show", "digits", "--version", "1"), Client())
    out = capsys.readouterr().out
    assert "digits policy version 1" in out and "rule: best_accuracy" in out


class ShowClient(Client):
    async def get(self, ref):
        return ModelVersion(ref.name, 3, "mlp", "dense", b"{}", "", (), "maas-models", "x/3/")


@pytest.mark.parametrize(("name", "policy"), [("digits", {"version": 2, **POLICY}), ("x", None)])
async def test_show_prints_the_models_current_policy_or_null(name, policy, capsys):
    args = parse("show", name)
    assert await _show(ShowClient(), args) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == policy
