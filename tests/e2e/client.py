"""GraphQL clients for the end-to-end tests: httpx over HTTP, gql over both WebSocket protocols."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
from gql import Client, GraphQLRequest
from gql.transport.websockets import WebsocketsTransport

DOCUMENTS = Path(__file__).resolve().parents[2] / "graphql"
PROTOCOLS = ("graphql-transport-ws", "graphql-ws")


@cache
def document(name: str) -> str:
    """The text of graphql/<name>.graphql, with the fragments it spreads from graphql/fragments/."""
    text = (DOCUMENTS / f"{name}.graphql").read_text()
    for fragment in sorted((DOCUMENTS / "fragments").glob("*.graphql")):
        if f"...{fragment.stem}" in text:
            text += "\n" + fragment.read_text()
    return text


@dataclass
class Answer:
    """A GraphQL response: data and errors."""

    data: dict[str, Any] | None
    errors: list[dict[str, Any]]

    @property
    def codes(self) -> list[str]:
        return [e.get("extensions", {}).get("code") for e in self.errors]

    def ok(self) -> dict[str, Any]:
        assert not self.errors, self.errors
        assert self.data is not None
        return self.data


class HttpClient:
    """Posts the graphql/ documents with a bearer key, as a frontend would."""

    def __init__(self, url: str, key: str | None) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=30)
        self.url = url

    async def query(self, text: str, **variables: Any) -> Answer:
        response = await self.http.post(self.url, json={"query": text, "variables": variables})
        assert response.status_code == 200, response.text
        body = response.json()
        return Answer(data=body.get("data"), errors=body.get("errors") or [])

    async def run(self, name: str, **variables: Any) -> Answer:
        return await self.query(document(name), **variables)

    async def aclose(self) -> None:
        await self.http.aclose()


@asynccontextmanager
async def ws_session(url: str, key: str | None, protocol: str, *, header: bool = False) -> AsyncIterator[Any]:
    """A gql session over one WebSocket protocol; the key goes in connection_init (or the header)."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    transport = WebsocketsTransport(
        url=url,
        subprotocols=[protocol],
        init_payload={} if header else auth,
        headers=auth if header else None,
        ack_timeout=10,
        close_timeout=2,
    )
    async with Client(transport=transport, fetch_schema_from_transport=False) as session:
        yield session


async def subscribe(session: Any, name: str, **variables: Any) -> AsyncIterator[dict[str, Any]]:
    """Yields each result of a subscription document."""
    async for result in session.subscribe(GraphQLRequest(document(name), variable_values=variables)):
        yield result


async def collect_events(
    session: Any, capsule_id: str, *, until_tag: str, live: asyncio.Event
) -> list[tuple[str, str]]:
    """(kind, tag) of processEvents until the EXITED event of until_tag; sets live at the first event."""
    seen: list[tuple[str, str]] = []
    async for result in subscribe(session, "ProcessEvents", capsuleId=capsule_id):
        event = result["processEvents"]
        seen.append((event["kind"], event["process"]["tag"]))
        live.set()
        if seen[-1] == ("EXITED", until_tag):
            return seen
    return seen


@asynccontextmanager
async def live_events(
    url: str,
    key: str,
    protocol: str,
    capsule_id: str,
    *,
    until_tag: str,
    start_probe: Callable[[], Awaitable[object]],
) -> AsyncIterator[asyncio.Task[list[tuple[str, str]]]]:
    """A processEvents subscription that is known to receive: probe processes are started until it
    sees one. Yields the task collecting (kind, tag) until the EXITED event of until_tag."""
    live = asyncio.Event()
    async with ws_session(url, key, protocol) as session:
        listener = asyncio.create_task(collect_events(session, capsule_id, until_tag=until_tag, live=live))
        while not live.is_set():
            await start_probe()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.wait(), 0.2)
        yield listener
