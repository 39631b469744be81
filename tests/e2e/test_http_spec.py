"""GraphQL over HTTP: graphql-http's audit passes whole, and each media type answers as it should.

The audit is graphql-http's `auditServer`, bundled into tests/http_audit/audit.bundle.mjs (committed)
and run by node; it sends the test's key on every request.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_database
from tests.e2e.conftest import Server


@pytest.fixture(params=["sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """One database kind: nothing here depends on which."""
    yield from fresh_database(request, tmp_path)


AUDIT = Path(__file__).resolve().parents[1] / "http_audit" / "audit.bundle.mjs"
GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"


async def run_audit(url: str, key: str) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "the GraphQL-over-HTTP audit needs node (Debian's nodejs) on PATH"
    process = await asyncio.create_subprocess_exec(
        node, str(AUDIT), url, key, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    results: list[dict[str, Any]] = json.loads(stdout)
    return results


async def test_the_graphql_http_audit_passes_every_check(server: Server, key: str) -> None:
    results = await run_audit(server.url, key)
    failing = [r for r in results if r["status"] != "ok"]
    assert len(results) >= 61
    assert not failing, json.dumps(failing, indent=2)


async def post(server: Server, key: str, body: dict[str, Any], accept: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if accept is not None:
        headers["Accept"] = accept
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(server.url, json=body, headers=headers)


BAD_REQUESTS: dict[str, dict[str, Any]] = {
    "parse": {"query": "{ capsules { id"},
    "validation": {"query": "{ noSuchField }"},
    "variables": {"query": "query($id: ID!) { capsule(id: $id) { id } }", "variables": {"id": [1]}},
    "subscription over HTTP": {"query": 'subscription { processEvents(capsuleId: "x") { kind } }'},
}


async def test_json_answers_a_request_error_with_200_and_null_data(server: Server, key: str) -> None:
    for accept in (None, "application/json", "*/*", f"{GRAPHQL_RESPONSE_JSON};q=0.5, application/json"):
        for case, body in BAD_REQUESTS.items():
            response = await post(server, key, body, accept)
            assert response.status_code == 200, (accept, case, response.text)
            assert response.headers["content-type"] == "application/json"
            answer = response.json()
            assert "data" in answer
            assert answer["data"] is None
            assert {e["extensions"]["code"] for e in answer["errors"]} == {"INVALID_REQUEST"}


async def test_graphql_response_json_answers_a_request_error_with_400_and_no_data(
    server: Server, key: str
) -> None:
    for accept in (GRAPHQL_RESPONSE_JSON, f"{GRAPHQL_RESPONSE_JSON}, application/json;q=0.9"):
        for case, body in BAD_REQUESTS.items():
            response = await post(server, key, body, accept)
            assert response.status_code == 400, (accept, case, response.text)
            assert response.headers["content-type"].startswith(GRAPHQL_RESPONSE_JSON)
            answer = response.json()
            assert "data" not in answer, (accept, case)
            assert answer["errors"]
            assert {e["extensions"]["code"] for e in answer["errors"]} == {"INVALID_REQUEST"}


async def test_graphql_response_json_answers_an_executed_result_with_200(server: Server, key: str) -> None:
    response = await post(server, key, {"query": "{ capsules { id } }"}, GRAPHQL_RESPONSE_JSON)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(GRAPHQL_RESPONSE_JSON)
    assert response.headers["vary"] == "Accept"
    assert response.json() == {"data": {"capsules": []}}
    # A field's error is no request error: 200, with its data entry.
    response = await post(server, "cap_wrong", {"query": "{ capsules { id } }"}, GRAPHQL_RESPONSE_JSON)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["data"] is None
    assert [e["extensions"]["code"] for e in answer["errors"]] == ["UNAUTHENTICATED"]
