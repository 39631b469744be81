"""Generated and checked-in artefacts stay in step with the code: SDL, documents, stubs.

The API contract lives in a design folder beside the project; .ci/run checks schema.graphql
against it, so these tests pass in a clone that has no such sibling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from graphql import parse, validate

from app.api.auth import TeamRequired
from app.api.schema import schema
from tests.e2e.client import document

ROOT = Path(__file__).resolve().parents[1]


def test_schema_file_matches_the_code() -> None:
    exported = schema.as_str() + "\n"
    assert (ROOT / "schema.graphql").read_text() == exported, (
        "schema.graphql drifted: run `.venv/bin/python -m app.api.schema > schema.graphql`"
    )


@pytest.mark.parametrize("path", sorted((ROOT / "graphql").glob("*.graphql")), ids=lambda p: p.name)
def test_documents_are_valid(path: Path) -> None:
    errors = validate(schema._schema, parse(document(path.stem)))
    assert not errors, errors


@pytest.mark.parametrize("root", ["Query", "Mutation", "Subscription"])
def test_every_root_field_requires_a_team(root: str) -> None:
    definition = schema.get_type_by_name(root)
    assert definition is not None
    for field in definition.fields:  # type: ignore[union-attr]
        assert any(p is TeamRequired for p in field.permission_classes), (
            f"{root}.{field.name} lacks TeamRequired"
        )


def test_grpc_stubs_match_the_proto(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "app" / "pb").mkdir(parents=True)
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iapp/pb=proto",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    for generated in sorted((out / "app" / "pb").iterdir()):
        assert (ROOT / "app" / "pb" / generated.name).read_text() == generated.read_text(), (
            f"app/pb/{generated.name} is stale: regenerate it (see README)"
        )


def test_the_bench_peer_serves_the_same_output_document() -> None:
    # bench/peers.py's bare Strawberry subscription stands beside ours in `python -m bench`: it must
    # accept the very document clients use, whatever the union has gained.
    from bench.peers import schema as peer_schema

    errors = validate(peer_schema(1, 1)._schema, parse(document("ProcessOutput")))
    assert not errors, errors
