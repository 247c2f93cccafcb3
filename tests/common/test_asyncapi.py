"""docs/asyncapi.yaml is what `thalex-tp contract` generates from the models: a contract change that
forgot to regenerate it fails here (regenerate: `thalex-tp contract > docs/asyncapi.yaml`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml

from services.common.contracts import StreamDocument
from services.common.streams import Names

pytest.importorskip("faststream", reason="the `faststream` extra is not installed")

from services.contract import GROUPS, STREAMS, render, specification

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "asyncapi.yaml"
REGENERATE = "docs/asyncapi.yaml differs from the models: run `thalex-tp contract > docs/asyncapi.yaml`"


def contract(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", "contract", *argv], capture_output=True,
                          text=True, cwd=REPO, timeout=60, check=False)


def test_the_committed_document_is_the_generated_one() -> None:
    assert COMMITTED.read_text() == render(specification(Names())), REGENERATE


def test_the_command_prints_it_as_yaml_and_json() -> None:
    printed = contract()
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == COMMITTED.read_text()
    as_json = contract("--json")
    assert json.loads(as_json.stdout) == yaml.safe_load(COMMITTED.read_text())


def test_every_stream_document_has_a_channel_with_its_writer_and_readers() -> None:
    assert {s.model for s in STREAMS} == set(get_args(StreamDocument))
    document = yaml.safe_load(COMMITTED.read_text())
    channels = document["channels"]
    for stream in STREAMS:
        channel = channels[f"tp:{stream.suffix}"]
        assert channel["bindings"]["redis"]["method"] == "xadd"
        assert channel["description"].endswith(f"Writer: {stream.writer}.")
        message = document["components"]["messages"][f"tp:{stream.suffix}:Message"]
        assert message["payload"] == {"$ref": f"#/components/schemas/{stream.model.__name__}"}
    for group in GROUPS:
        binding = channels[f"tp:{group.suffix} (group {group.group})"]["bindings"]["redis"]
        assert (binding["method"], binding["groupName"]) == ("xreadgroup", group.group)
    assert document["components"]["schemas"]["Fill"] == json.loads(json.dumps(
        document["components"]["schemas"]["Fill"]))  # plain data all the way down


def test_every_reference_resolves() -> None:
    document = yaml.safe_load(COMMITTED.read_text())

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(document):
        node = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part.replace("%20", " ").replace("%28", "(").replace("%29", ")")]
        assert node, ref


def test_another_namespace_renames_every_address() -> None:
    printed = contract("--namespace", "paper", "--json")
    assert printed.returncode == 0, printed.stderr
    addresses = {c["address"] for c in json.loads(printed.stdout)["channels"].values()}
    assert addresses == {f"paper:{s.suffix}" for s in STREAMS}


@pytest.mark.parametrize("missing", ["faststream", "yaml"])
def test_without_the_extra_the_command_says_what_to_install(missing: str) -> None:
    blocked = (f"import sys; sys.modules[{missing!r}] = None\n"
               "from services.cli import main; sys.exit(main(['contract']))")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=REPO,
                            timeout=60, check=False)
    assert result.returncode == 2, result.stderr
    assert "pip install 'thalex-tp[faststream]'" in result.stderr and "Traceback" not in result.stderr
