"""GraphiQL at /graphql in a real headless chromium: it renders, runs queries and subscriptions with
the key from its Headers editor, and loads nothing from anywhere but the server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Locator, Page, WebSocket, async_playwright, expect

from tests.e2e.browser import WAIT_MS, launch
from tests.e2e.client import HttpClient
from tests.e2e.conftest import Server

# The page does not depend on the store: one database kind is enough.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@dataclass
class GraphiQL:
    """The GraphiQL page of a server, and everything the page asked the network for."""

    page: Page
    urls: list[str] = field(default_factory=list)
    sent_frames: list[str] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def response(self) -> Locator:
        return self.page.locator(".graphiql-response .view-lines")

    async def set_headers(self, text: str) -> None:
        await self.page.locator(".graphiql-editor-tools").get_by_text("Headers", exact=True).click()
        await _replace_text(self.page.locator(".graphiql-editor-tool .graphiql-editor:not(.hidden)"), text)

    async def run(self, operation: str) -> None:
        await _replace_text(self.page.locator(".graphiql-query-editor .graphiql-editor"), operation)
        await self.page.locator(".graphiql-execute-button").click()

    def off_server(self, server: Server) -> list[str]:
        """Every URL the page asked for that is not on the server's own host and port."""
        address = urlsplit(server.url).netloc
        return [url for url in self.urls if urlsplit(url).netloc != address]

    def on_websocket(self, socket: WebSocket) -> None:
        self.urls.append(socket.url)
        socket.on("framesent", self._on_frame_sent)

    def _on_frame_sent(self, payload: str | bytes) -> None:
        frame = payload.decode() if isinstance(payload, bytes) else payload
        self.sent_frames.append(frame)
        if json.loads(frame).get("type") == "subscribe":
            self.subscribed.set()


async def _replace_text(editor: Locator, text: str) -> None:
    """Replaces a Monaco editor's text, as a paste would."""
    keyboard = editor.page.keyboard
    await editor.click()
    await keyboard.press("ControlOrMeta+A")
    await keyboard.insert_text(text)
    # Monaco closes the first bracket it sees inserted; that closer lands after the cursor.
    await keyboard.press("ControlOrMeta+Shift+End")
    await keyboard.press("Delete")


@pytest.fixture
async def graphiql(server: Server) -> AsyncIterator[GraphiQL]:
    async with async_playwright() as playwright:
        browser = await launch(playwright)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            opened = GraphiQL(page)
            context.on("request", lambda request: opened.urls.append(request.url))
            page.on("websocket", opened.on_websocket)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(server.url)
            await expect(page.locator(".graphiql-query-editor .monaco-editor")).to_be_visible(timeout=WAIT_MS)
            yield opened
            assert not errors, errors
        finally:
            await browser.close()


def _bearer(key: str) -> str:
    return json.dumps({"Authorization": f"Bearer {key}"})


async def test_page_renders_and_runs_a_query_with_the_key_in_headers(
    server: Server, graphiql: GraphiQL, api: HttpClient, key: str
) -> None:
    capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
    await graphiql.run("{ capsules { id } }")
    await expect(graphiql.response).to_contain_text("UNAUTHENTICATED", timeout=WAIT_MS)

    await graphiql.set_headers(_bearer(key))
    await graphiql.run("{ capsules { id } }")
    await expect(graphiql.response).to_contain_text(capsule_id, timeout=WAIT_MS)

    assert any(url.endswith("/static/graphiql/graphiql.js") for url in graphiql.urls), graphiql.urls
    assert graphiql.off_server(server) == []


async def test_subscription_uses_the_headers_typed_before_it_started(
    server: Server, graphiql: GraphiQL, api: HttpClient, key: str
) -> None:
    capsule_id = (await api.run("CreateCapsule")).ok()["createCapsule"]["id"]
    spec = {"cmd": "cat", "tag": "echo", "stdin": True}
    (await api.run("StartProcess", capsuleId=capsule_id, input=spec)).ok()
    subscription = (
        f'subscription {{ processOutput(capsuleId: "{capsule_id}", selector: "echo") '
        "{ __typename ... on OutputChunk { data } } }"
    )

    await graphiql.run(subscription)  # no key yet: the server closes the socket with 4403
    await expect(graphiql.response).to_contain_text("4403", timeout=WAIT_MS)

    await graphiql.set_headers(_bearer(key))
    await graphiql.run(subscription)
    async with asyncio.timeout(WAIT_MS / 1000):  # input sent after this is output the page sees live
        await graphiql.subscribed.wait()
    (await api.run("SendInput", capsuleId=capsule_id, selector="echo", data="live-from-stdin\n")).ok()
    await expect(graphiql.response).to_contain_text("live-from-stdin", timeout=WAIT_MS)
    (await api.run("CloseInput", capsuleId=capsule_id, selector="echo")).ok()
    await expect(graphiql.response).to_contain_text("ProcessExited", timeout=WAIT_MS)

    inits = [json.loads(frame) for frame in graphiql.sent_frames if '"connection_init"' in frame]
    assert [init.get("payload", {}).get("Authorization") for init in inits] == [None, f"Bearer {key}"]
    assert [url for url in graphiql.urls if url.startswith("ws")] == [server.ws_url] * 2
    assert graphiql.off_server(server) == []
