"""What fuzzing the API found (tests/fuzz/run.py and by hand), kept so that it stays fixed."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import Server

NOT_OBJECTS = [
    ('"{ capsules { id } }"', "a string"),
    ("1", "a number"),
    ("1.5", "a number"),
    ("true", "a boolean"),
    ("null", "null"),
]


async def test_a_json_body_that_is_no_object_is_refused_with_400(server: Server, key: str) -> None:
    # A body of a JSON string, number, boolean or null was a 500 with strawberry's bare
    # "Internal Server Error" and a traceback in the log.
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=30) as client:
        for body, kind in NOT_OBJECTS:
            response = await client.post(server.url, content=body, headers=headers)
            assert response.status_code == 400, (body, response.text)
            assert response.text.startswith(f"expected a JSON object, got {kind}"), response.text
        # GET reads variables as JSON too
        params = {"query": "{ capsules { id } }", "variables": "1"}
        response = await client.get(server.url, params=params, headers=headers)
        assert response.status_code == 400, response.text
        # and the server goes on serving
        response = await client.post(server.url, json={"query": "{ capsules { id } }"}, headers=headers)
        assert response.json() == {"data": {"capsules": []}}
