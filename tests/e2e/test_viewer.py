"""The log viewer at /viewer in a real headless chromium, against a real server and real processes.

One browser and one server for the module; each test gets a fresh browser context and capsule.
Screenshots go to each test's tmp_path (the path is printed).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Locator, Page, WebSocketRoute, async_playwright, expect
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from app.config import Settings
from tests.e2e.browser import WAIT_MS, launch
from tests.e2e.client import HttpClient
from tests.e2e.conftest import Server, running_server
from tests.system import TEST_RUNTIME

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1024 * 1024
# Small, so a test can outrun it and see an OutputGap; 100,000 numbered lines (589 kB) still fit.
OUTPUT_CAP = 1 * MiB
KEY_ITEM = "capsule.viewer.apiKey"
TWO_FRAMES = "new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)))"


@dataclass
class Served:
    """The module's server and a key of its own team."""

    server: Server
    settings: Settings
    key: str
    api: HttpClient

    @property
    def base(self) -> str:
        return self.server.url.removesuffix("/graphql")

    async def capsule(self) -> str:
        return str((await self.api.run("CreateCapsule")).ok()["createCapsule"]["id"])

    async def start(self, capsule_id: str, cmd: str, *args: str, tag: str, stdin: bool = False) -> int:
        spec = {"cmd": cmd, "args": list(args), "tag": tag, "stdin": stdin}
        process = (await self.api.run("StartProcess", capsuleId=capsule_id, input=spec)).ok()["startProcess"]
        return int(process["pid"])

    async def send(self, capsule_id: str, tag: str, data: str) -> None:
        (await self.api.run("SendInput", capsuleId=capsule_id, selector=tag, data=data)).ok()

    async def exited(self, capsule_id: str, tag: str) -> None:
        async with asyncio.timeout(WAIT_MS / 1000):
            while True:
                process = (await self.api.run("Process", capsuleId=capsule_id, selector=tag)).ok()["process"]
                if process["status"] == "EXITED":
                    return
                await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def viewer_settings(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Settings:
    data_dir = tmp_path_factory.mktemp("viewer") / "data"
    data_dir.mkdir()
    database = data_dir / "capsule.db"
    database.write_bytes(sqlite_template.read_bytes())
    return Settings(
        runtime=TEST_RUNTIME,
        data_dir=data_dir,
        database_url=f"sqlite+aiosqlite:///{database}",
        retention_sec=60.0,
        output_cap_bytes=OUTPUT_CAP,
        idle_check_interval_sec=0.2,
        team_requests_per_sec=1000.0,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(viewer_settings: Settings) -> AsyncIterator[Served]:
    async with running_server(viewer_settings) as server:
        key = await server.new_key("viewers")
        api = HttpClient(server.url, key)
        try:
            yield Served(server=server, settings=viewer_settings, key=key, api=api)
        finally:
            await api.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await launch(playwright)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Viewer:
    """A page of the viewer in a fresh browser context, its key in session storage."""

    page: Page
    served: Served
    shots: Path
    errors: list[str] = field(default_factory=list)

    @property
    def log(self) -> Locator:
        return self.page.locator(".log")

    @property
    def rows(self) -> Locator:
        return self.page.locator(".log-window .row")

    @property
    def link(self) -> Locator:
        return self.page.get_by_test_id("link")

    async def open(self, capsule_id: str, process: str = "", **params: str) -> None:
        query = urlencode({"capsule": capsule_id, "process": process, **params})
        await self.page.goto(f"{self.served.base}/viewer?{query}")
        await expect(self.page.get_by_test_id("capsules")).to_be_visible(timeout=WAIT_MS)
        if process:
            await expect(self.log).to_be_visible(timeout=WAIT_MS)

    async def model(self, expression: str) -> Any:
        """Evaluates `expression` with `m` the page's output log (everything kept, not only what is shown)."""
        script = f"(() => {{ const m = window.capsuleViewer.model; return {expression}; }})()"
        return await self.page.evaluate(script)

    async def output(self) -> list[str]:
        """The text of every output line kept (notices left out)."""
        texts: list[str] = await self.model("m.lines.filter((l) => l.kind < 2).map((l) => l.text)")
        return texts

    async def until_lines(self, count: int) -> None:
        await expect(self.page.get_by_test_id("line-count")).to_have_text(f"{count:,} lines", timeout=WAIT_MS)

    @property
    def texts(self) -> Locator:
        """The text of each row in the DOM (rows follow a filter on the next animation frame)."""
        return self.page.locator(".log-window .row .text")

    async def shown(self) -> list[str]:
        """The texts of the rows in the DOM now."""
        return await self.texts.all_inner_texts()

    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.page.url).query)

    async def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=path)
        print(f"screenshot: {path}")
        return path


async def new_viewer(browser: Browser, served: Served, shots: Path, *, key: str | None) -> tuple[Any, Viewer]:
    context = await browser.new_context(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    if key is not None:
        await context.add_init_script(f"sessionStorage.setItem({json.dumps(KEY_ITEM)}, {json.dumps(key)})")
    page = await context.new_page()
    viewer = Viewer(page=page, served=served, shots=shots)
    page.on("pageerror", lambda error: viewer.errors.append(str(error)))
    page.on("dialog", lambda dialog: viewer.errors.append(f"dialog: {dialog.message}"))
    return context, viewer


@pytest_asyncio.fixture(loop_scope="module")
async def viewer(browser: Browser, served: Served, tmp_path: Path) -> AsyncIterator[Viewer]:
    context, opened = await new_viewer(browser, served, tmp_path, key=served.key)
    try:
        yield opened
        assert not opened.errors, opened.errors
    finally:
        await context.close()


def numbered(first: int, last: int) -> str:
    return "".join(f"line-{i}\n" for i in range(first, last + 1))


async def test_lines_appear_in_order_and_resume_after_a_dropped_socket(
    served: Served, viewer: Viewer
) -> None:
    capsule_id = await served.capsule()
    await served.start(capsule_id, "cat", tag="echo", stdin=True)
    sockets: list[WebSocketRoute] = []
    servers: list[WebSocketRoute] = []
    from_seqs: list[int] = []
    server_down = asyncio.Event()

    async def route(socket: WebSocketRoute) -> None:
        if server_down.is_set():  # the upgrade succeeds, then the "server" goes away at once
            await socket.close(code=1013, reason="server restarting")
            return
        sockets.append(socket)
        server = socket.connect_to_server()
        servers.append(server)

        def forward(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "subscribe" and "processOutput" in frame["payload"]["query"]:
                from_seqs.append(frame["payload"]["variables"]["fromSeq"])
            server.send(message)

        socket.on_message(forward)

    await viewer.page.route_web_socket(re.compile(r"/graphql$"), route)
    await viewer.open(capsule_id, "echo")
    await expect(viewer.link).to_have_text("live", timeout=WAIT_MS)
    await served.send(capsule_id, "echo", numbered(1, 20))
    await served.send(capsule_id, "echo", numbered(21, 40))
    await viewer.until_lines(40)
    await expect(viewer.rows.last).to_contain_text("line-40")

    server_down.set()
    await sockets[-1].close(code=1001, reason="going away")
    await servers[-1].close()
    await expect(viewer.link).to_contain_text("reconnecting", timeout=WAIT_MS)
    await served.send(capsule_id, "echo", numbered(41, 60))  # written while the page is away
    await viewer.shot("reconnecting")
    server_down.clear()
    await served.send(capsule_id, "echo", numbered(61, 80))

    await viewer.until_lines(80)
    await expect(viewer.link).to_have_text("live", timeout=WAIT_MS)
    assert await viewer.output() == [f"line-{i}" for i in range(1, 81)]
    await expect(viewer.rows.last).to_contain_text("line-80")
    assert from_seqs[0] == 0 and len(from_seqs) >= 2 and from_seqs[-1] > 0, from_seqs
    await viewer.shot("resumed")


async def test_filter_text_and_regex_counts_and_the_address(served: Served, viewer: Viewer) -> None:
    capsule_id = await served.capsule()
    lines = ["alpha one", "beta two", "alpha three", "Gamma four", "BETA five"]
    await served.start(capsule_id, "printf", r"%s\n", *lines, tag="words")
    await viewer.open(capsule_id, "words")
    await expect(viewer.page.locator(".row.exit")).to_contain_text("exited with code 0", timeout=WAIT_MS)
    assert await viewer.output() == lines

    count = viewer.page.get_by_test_id("match-count")
    await viewer.page.keyboard.press("/")
    await viewer.page.keyboard.type("alpha")
    await expect(count).to_have_text("2 matching of 6 lines")
    await expect(viewer.texts).to_have_text(["alpha one", "alpha three"])
    await expect(viewer.page).to_have_url(re.compile(r"[?&]q=alpha(&|$)"))  # written after it renders
    assert viewer.query()["q"] == ["alpha"]

    await viewer.page.get_by_title("Regular expression").click()
    await viewer.page.get_by_role("searchbox", name="Filter").fill("^(beta|gamma)")
    await expect(count).to_have_text("3 matching of 6 lines")
    await expect(viewer.texts).to_have_text(["beta two", "Gamma four", "BETA five"])
    await viewer.page.get_by_title("Match case").click()
    await expect(count).to_have_text("1 matching of 6 lines")
    await expect(viewer.texts).to_have_text(["beta two"])

    await viewer.page.get_by_role("button", name="Highlight").click()
    await expect(viewer.rows).to_have_count(6)
    await expect(viewer.page.locator(".row mark")).to_have_text(["beta"])
    await viewer.shot("highlight")
    await expect(viewer.page).to_have_url(re.compile(r"[?&]mode=mark(&|$)"))
    assert viewer.query() == {
        "capsule": [capsule_id],
        "process": ["words"],
        "q": ["^(beta|gamma)"],
        "re": ["1"],
        "case": ["1"],
        "mode": ["mark"],
    }

    # The address is the view: opened anew, it shows the same filter.
    await viewer.page.goto(viewer.page.url)
    await expect(count).to_have_text("1 matching of 6 lines", timeout=WAIT_MS)
    await expect(viewer.page.get_by_role("searchbox", name="Filter")).to_have_value("^(beta|gamma)")
    await viewer.page.get_by_role("button", name="Only matches").click()
    await expect(viewer.rows).to_have_count(1)
    await viewer.page.get_by_role("searchbox", name="Filter").press("Escape")
    await expect(viewer.rows).to_have_count(6)
    await expect(viewer.page).not_to_have_url(re.compile(r"[?&]q="))
    assert "q" not in viewer.query()


async def test_scrolling_up_pauses_follow_and_counts_new_lines(served: Served, viewer: Viewer) -> None:
    capsule_id = await served.capsule()
    await served.start(capsule_id, "cat", tag="chatty", stdin=True)
    await viewer.open(capsule_id, "chatty")
    await expect(viewer.link).to_have_text("live", timeout=WAIT_MS)
    await served.send(capsule_id, "chatty", numbered(1, 300))
    await viewer.until_lines(300)
    await expect(viewer.rows.last).to_contain_text("line-300")
    jump = viewer.page.get_by_test_id("jump")
    await expect(jump).to_be_hidden()

    await viewer.log.hover()
    await viewer.page.mouse.wheel(0, -1500)
    await expect(jump).to_have_text("↓ Follow (f)", timeout=WAIT_MS)
    await served.send(capsule_id, "chatty", numbered(301, 325))
    await viewer.until_lines(325)
    await expect(jump).to_contain_text("25 new lines")
    assert "line-325" not in await viewer.shown()
    await viewer.shot("paused")

    await jump.click()
    await expect(jump).to_be_hidden()
    await expect(viewer.rows.last).to_contain_text("line-325")
    await served.send(capsule_id, "chatty", numbered(326, 330))
    await expect(viewer.rows.last).to_contain_text("line-330", timeout=WAIT_MS)


STREAMS_SCRIPT = r"""
printf 'plain stdout line\n'
sleep 0.1
printf 'this goes to stderr\n' >&2
sleep 0.1
printf '\033[31mred text\033[0m then \033[1;32mbold green\033[0m\n'
printf '<img src=x onerror=alert(1)> <b>not bold</b>\n'
sleep 0.1
printf 'bytes \377\376 end\n'
"""


async def test_streams_colours_escaping_and_bytes(served: Served, viewer: Viewer) -> None:
    capsule_id = await served.capsule()
    await served.start(capsule_id, "sh", "-c", STREAMS_SCRIPT, tag="mixed")
    await viewer.open(capsule_id, "mixed")
    page = viewer.page
    await expect(page.locator(".row.exit")).to_be_visible(timeout=WAIT_MS)

    await expect(page.locator(".row.err")).to_have_count(1)
    await expect(page.locator(".row.err .text")).to_have_text("this goes to stderr")
    await expect(page.locator(".row.out", has_text="plain stdout line")).to_have_count(1)
    await expect(page.locator(".row .ansi-red-fg")).to_have_text("red text")
    green = page.locator(".row .ansi-bright-green-fg, .row .ansi-green-fg")
    await expect(green).to_have_text("bold green")
    assert await green.evaluate("(e) => getComputedStyle(e).fontWeight") == "700"
    await expect(page.locator(".log img, .log b")).to_have_count(0)
    await expect(page.locator(".row .text", has_text="onerror")).to_have_text(
        "<img src=x onerror=alert(1)> <b>not bold</b>"
    )
    await expect(page.locator(".row .text", has_text="bytes")).to_have_text(r"bytes \xff\xfe end")
    await expect(page.locator(".row .byte")).to_have_text([r"\xff", r"\xfe"])
    await page.emulate_media(color_scheme="dark")
    await viewer.shot("streams-dark")
    await page.emulate_media(color_scheme="light")
    await viewer.shot("streams-light")

    for keep, expected in ((False, "red text then bold green"), (True, "\x1b[31mred text\x1b[0m")):
        await page.get_by_text("Download", exact=True).click()
        async with page.expect_download() as waiting:
            await page.get_by_role("button", name=f"Text, ANSI {'kept' if keep else 'stripped'}").click()
        download = await waiting.value
        text = await asyncio.to_thread(Path(await download.path()).read_text, encoding="utf-8")
        assert download.suggested_filename == f"{capsule_id}-mixed.log"
        assert expected in text and "this goes to stderr\n" in text, text
        assert ("\x1b" in text) is keep
        assert text.endswith("exited with code 0 at " + text.rsplit(" at ", 1)[1])


async def test_output_past_the_cap_shows_a_gap(served: Served, viewer: Viewer) -> None:
    capsule_id = await served.capsule()
    await served.start(capsule_id, "sh", "-c", "yes 0123456789abcdef | head -c 1500000", tag="flood")
    await served.exited(capsule_id, "flood")
    await viewer.open(capsule_id, "flood")
    page = viewer.page
    await expect(page.locator(".row.exit")).to_contain_text("exited with code 0", timeout=WAIT_MS)
    first = await viewer.model("m.lines[0]")
    assert first["kind"] == 2 and first["seq"] > 0, first
    kept = await viewer.output()
    assert 0 < len(kept) * 17 <= OUTPUT_CAP + 17
    # Eviction cuts whole events, where the process's writes cut its lines: the ends may be partial.
    assert all(line == "0123456789abcdef" for line in kept[1:-1]), kept[:3]
    assert "0123456789abcdef".endswith(kept[0]) and kept[-1] == "0123456789abcdef"[: 1_500_000 % 17]
    # The gap is where the lost output was: above the first line kept.
    await viewer.log.evaluate("(e) => { e.scrollTop = 0; }")
    gap = page.locator(".row.gap")
    await expect(viewer.rows.first).to_have_class(re.compile(r"\bgap\b"), timeout=WAIT_MS)
    notice = re.compile(r"^[\d,]+ events? no longer retained \([\d.]+ (?:B|KiB|MiB) of output\)$")
    await expect(gap).to_have_text(notice)
    await viewer.shot("gap")


async def test_100000_lines_render_and_scroll_with_few_rows_in_the_dom(
    served: Served, viewer: Viewer
) -> None:
    capsule_id = await served.capsule()
    await served.start(capsule_id, "seq", "1", "100000", tag="numbers")
    await served.exited(capsule_id, "numbers")
    page = viewer.page
    started = time.monotonic()
    await viewer.open(capsule_id, "numbers")
    await expect(page.locator(".row.exit")).to_be_visible(timeout=30_000)
    await expect(viewer.rows.locator(".text", has_text=re.compile(r"^100000$"))).to_have_count(1)
    rendered = time.monotonic() - started
    assert await viewer.model("m.lines.length") == 100_001
    most = await page.locator(".log-window").evaluate("(e) => e.childElementCount")
    assert 0 < most <= 300, most

    # A timer that should tick every 20 ms: its longest gap is the longest the page stood still.
    await page.evaluate(
        "window.gaps = []; let last = performance.now(); "
        "window.ticker = setInterval(() => { "
        "const now = performance.now(); gaps.push(now - last); last = now; }, 20)"
    )
    started = time.monotonic()
    for fraction in (0, 0.25, 0.5, 0.75, 0.1, 0.9, 0.33, 1):
        await viewer.log.evaluate(f"(e) => e.scrollTop = {fraction} * (e.scrollHeight - e.clientHeight)")
        await page.evaluate(TWO_FRAMES)
        first = int((await viewer.shown())[0])
        assert abs(first - fraction * 100_000) < 200, (fraction, first)
        most = max(most, await page.locator(".log-window").evaluate("(e) => e.childElementCount"))
    scrolled = time.monotonic() - started
    longest_pause = await page.evaluate("(clearInterval(window.ticker), Math.max(...window.gaps))")
    await page.get_by_label("Wrap").check()
    await expect(viewer.rows.first).to_be_visible()
    most = max(most, await page.locator(".log-window").evaluate("(e) => e.childElementCount"))
    print(
        f"100,000 lines: replayed and rendered in {rendered:.2f} s, 8 scroll jumps in {scrolled:.2f} s, "
        f"longest main-thread pause while scrolling {longest_pause:.0f} ms, at most {most} rows in the DOM"
    )
    assert most <= 300, most
    assert rendered < 30 and scrolled < 30  # a sanity bound only: a frozen page never gets here
    await viewer.shot("100k")

    # A smaller cap drops the oldest lines; "Load earlier" replays from a seq before the first kept.
    await page.locator("summary[title=Settings]").click()
    await page.get_by_label("Line cap").fill("20000")
    await page.get_by_label("Line cap").press("Enter")
    await page.locator("summary[title=Settings]").click()
    earlier = page.get_by_test_id("earlier")
    await expect(earlier).to_contain_text("earlier lines not kept (at most 20,000 are)")
    kept = await viewer.output()
    assert len(kept) < 20_000 and kept[-1] == "100000", (len(kept), kept[-1])
    first_kept = int(kept[0])
    await earlier.get_by_role("button", name="Load earlier").click()
    jump = page.get_by_test_id("jump")
    await expect(jump).to_contain_text("Paused at 20,000 lines", timeout=WAIT_MS)
    # From the seq of a chunk that began before the first line kept (a replay merges chunks of up to
    # 1 MiB, so perhaps from the start), taken in up to the cap or the one chunk past it, no further.
    replayed = [int(text) for text in await viewer.output()]
    assert replayed[0] < first_kept, (replayed[0], first_kept)
    assert replayed == list(range(replayed[0], replayed[0] + len(replayed))), replayed[:3]
    await viewer.shot("earlier")
    await jump.click()
    await expect(page.locator(".row.exit")).to_be_visible(timeout=WAIT_MS)
    assert (await viewer.output())[-1] == "100000"


async def test_processes_update_live_and_take_signals(served: Served, viewer: Viewer) -> None:
    capsule_id = await served.capsule()
    await viewer.open(capsule_id)
    page = viewer.page
    await expect(page.get_by_text("none yet")).to_be_visible(timeout=WAIT_MS)
    await served.start(capsule_id, "sleep", "300", tag="sleeper")
    sleeper = page.get_by_test_id("processes").get_by_role("button", name=re.compile("sleeper"))
    await expect(sleeper).to_contain_text("running", timeout=WAIT_MS)  # through processEvents
    await sleeper.click()
    # The page writes its address in an effect after it renders: wait for it, as for the page.
    await expect(page).to_have_url(re.compile(r"[?&]process=sleeper(&|$)"))
    assert viewer.query()["process"] == ["sleeper"]
    toolbar = page.locator(".toolbar").first
    await expect(toolbar).to_contain_text("PID")
    await toolbar.locator("select").select_option("SIGTERM")
    await toolbar.get_by_role("button", name="Send").click()
    await expect(page.locator(".row.exit")).to_contain_text("killed by SIGTERM", timeout=WAIT_MS)
    await expect(sleeper.locator(".chip")).to_have_text("SIGTERM")
    await expect(toolbar.get_by_role("button", name="Send")).to_be_disabled()

    await served.start(capsule_id, "sleep", "300", tag="stopper")
    stopper = page.get_by_test_id("processes").get_by_role("button", name=re.compile("stopper"))
    await stopper.click()
    await expect(toolbar.get_by_role("button", name="Stop")).to_be_enabled(timeout=WAIT_MS)
    await toolbar.get_by_role("button", name="Stop").click()
    await expect(stopper.locator(".chip")).to_have_text("SIGTERM", timeout=WAIT_MS)
    await viewer.shot("signals")


async def test_key_asked_once_or_given_to_a_local_page_of_the_embedded_default(
    browser: Browser, served: Served, tmp_path: Path
) -> None:
    capsule_id = await served.capsule()
    context, viewer = await new_viewer(browser, served, tmp_path, key=None)
    dev_key_file = served.settings.data_dir / "dev-api-key"
    try:
        page = viewer.page
        await page.goto(f"{served.base}/viewer")
        await page.get_by_label("API key").fill("not-a-key")
        await page.get_by_role("button", name="Connect").click()
        await expect(page.locator(".dialog .error")).to_be_visible(timeout=WAIT_MS)
        await viewer.shot("key-refused")
        await page.get_by_label("API key").fill(served.key)
        await page.get_by_role("button", name="Connect").click()
        listed = page.get_by_test_id("capsules").get_by_text(capsule_id)
        await expect(listed).to_be_visible(timeout=WAIT_MS)
        assert await page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_ITEM)})") == served.key
        await page.reload()  # kept for the tab: not asked again
        await expect(listed).to_be_visible(timeout=WAIT_MS)

        dev_key, _ = await served.server.state.platform.keys.ensure_dev_key(served.settings.data_dir)
        local, remote = await page_configs(served)
        assert local == {"graphqlPath": "/graphql", "devKey": dev_key}
        assert remote == {"graphqlPath": "/graphql", "devKey": None}
        fresh_context, fresh = await new_viewer(browser, served, tmp_path, key=None)
        try:
            await fresh.page.goto(f"{served.base}/viewer")
            await expect(fresh.page.get_by_text("Choose a capsule.")).to_be_visible(timeout=WAIT_MS)
            await expect(fresh.page.get_by_label("API key")).to_have_count(0)
            assert not fresh.errors, fresh.errors
        finally:
            await fresh_context.close()
        assert not viewer.errors, viewer.errors
    finally:
        dev_key_file.unlink(missing_ok=True)
        await context.close()


async def page_configs(served: Served) -> tuple[dict[str, Any], dict[str, Any]]:
    """The viewer page's config as this machine gets it, and as a foreign Host name gets it."""
    configs = []
    async with httpx.AsyncClient() as http:
        for headers in ({}, {"Host": "logs.example.com"}):
            response = await http.get(f"{served.base}/viewer", headers=headers)
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-store"
            assert "script-src 'self'" in response.headers["content-security-policy"]
            found = re.search(r'<script id="viewer-config" [^>]*>(.*?)</script>', response.text)
            assert found is not None, response.text
            configs.append(json.loads(found.group(1)))
    return configs[0], configs[1]


async def terminal_lines(page: Page) -> list[str]:
    """The lines of the page's terminal, scrollback included, trailing blanks left out."""
    lines: list[str] = await page.evaluate("window.capsuleTerminal.text()")
    return [line.rstrip() for line in lines]


async def until_terminal_line(page: Page, text: str, count: int = 1) -> None:
    """Waits until `count` lines of the page's terminal read exactly `text`."""
    script = (
        "([text, count]) => "
        "window.capsuleTerminal?.text().filter((l) => l.trimEnd() === text).length >= count"
    )
    try:
        await page.wait_for_function(script, arg=[text, count], timeout=WAIT_MS)
    except PlaywrightTimeoutError:
        raise AssertionError(
            f"no {count} line(s) {text!r} in the terminal: {await terminal_lines(page)}"
        ) from None


async def until_prompt(page: Page) -> None:
    """Waits until the shell's prompt ($ or #, nothing typed after it) is the terminal's last line."""
    script = (
        "() => { const lines = window.capsuleTerminal.text().map((l) => l.trimEnd()).filter((l) => l);"
        " return ['$', '#'].includes(lines[lines.length - 1]); }"
    )
    try:
        await page.wait_for_function(script, timeout=WAIT_MS)
    except PlaywrightTimeoutError:
        raise AssertionError(f"no prompt in the terminal: {await terminal_lines(page)}") from None


async def terminal_size(page: Page, other_than: str | None = None) -> str:
    """The terminal's size as stty size prints it, once resizeTerminal has been given it (and, with
    `other_than`, once the terminal has left that size: the fit follows the window a frame later)."""
    if other_than is not None:
        script = (
            "(old) => { const t = window.capsuleTerminal.terminal; return `${t.rows} ${t.cols}` !== old; }"
        )
        await page.wait_for_function(script, arg=other_than, timeout=WAIT_MS)
    await expect(page.get_by_test_id("terminal-size")).not_to_be_empty(timeout=WAIT_MS)
    rows, cols = await page.evaluate(
        "[window.capsuleTerminal.terminal.rows, window.capsuleTerminal.terminal.cols]"
    )
    await expect(page.get_by_test_id("terminal-size")).to_have_text(f"{cols} \u00d7 {rows}", timeout=WAIT_MS)
    return f"{rows} {cols}"


async def open_shell(served: Served, viewer: Viewer) -> str:
    """Starts sh on an 80x24 terminal in a new capsule and opens it in the viewer; the capsule's id."""
    capsule_id = await served.capsule()
    spec = {"cmd": "sh", "tag": "shell", "terminal": {"cols": 80, "rows": 24}}
    (await served.api.run("StartProcess", capsuleId=capsule_id, input=spec)).ok()
    page = viewer.page
    await page.goto(f"{served.base}/viewer?{urlencode({'capsule': capsule_id, 'process': 'shell'})}")
    await expect(page.get_by_test_id("terminal").locator(".xterm")).to_be_visible(timeout=WAIT_MS)
    await expect(viewer.link).to_have_text("live", timeout=WAIT_MS)
    await page.get_by_test_id("terminal").click()
    return capsule_id


async def test_a_terminal_process_in_xterm_takes_keys_and_the_window_size(
    served: Served, viewer: Viewer
) -> None:
    await open_shell(served, viewer)
    page = viewer.page
    size = await terminal_size(page)
    assert size != "24 80"  # the pane's, not the start's

    await page.keyboard.type("echo hi\n")
    await until_terminal_line(page, "hi")
    await page.keyboard.type("stty size\n")
    await until_terminal_line(page, size)

    await page.set_viewport_size({"width": 900, "height": 500})  # the terminal follows the window
    smaller = await terminal_size(page, other_than=size)
    assert smaller != size
    await page.keyboard.type("stty size\n")
    await until_terminal_line(page, smaller)

    # The job says it runs once it is the terminal's foreground job (a ^C typed before would go to the shell).
    await page.keyboard.type("sh -c 'echo sleeping; exec sleep 300'\n")
    await until_terminal_line(page, "sleeping")
    await page.keyboard.press("Control+C")  # ^C: SIGINT of the foreground job, the shell prompts again
    await until_prompt(page)  # as a person waits for it before typing on
    await page.keyboard.type("echo after-interrupt\n")
    await until_terminal_line(page, "after-interrupt")
    await viewer.shot("terminal")


async def test_a_terminal_resumes_without_doubling_and_its_link_opens_the_same_session(
    browser: Browser, served: Served, viewer: Viewer
) -> None:
    from_seqs: list[int] = []
    sockets: list[WebSocketRoute] = []

    async def route(socket: WebSocketRoute) -> None:
        sockets.append(socket)
        server = socket.connect_to_server()

        def forward(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "subscribe" and "processOutput" in frame["payload"]["query"]:
                from_seqs.append(frame["payload"]["variables"]["fromSeq"])
            server.send(message)

        socket.on_message(forward)

    page = viewer.page
    await page.route_web_socket(re.compile(r"/graphql$"), route)
    capsule_id = await open_shell(served, viewer)
    await page.keyboard.type("echo hi\n")
    await until_terminal_line(page, "hi")

    # A dropped socket: the output resumes after the last seq seen, nothing written twice.
    await sockets[-1].close(code=1001, reason="going away")
    await expect(viewer.link).to_contain_text("reconnecting", timeout=WAIT_MS)
    await expect(viewer.link).to_have_text("live", timeout=WAIT_MS)
    await page.keyboard.type("echo back\n")
    await until_terminal_line(page, "back")
    assert from_seqs[0] == 0 and len(from_seqs) >= 2 and from_seqs[-1] > 0, from_seqs
    lines = await terminal_lines(page)
    typed = [line for line in lines if line.endswith(" echo hi")]  # after the prompt, $ or #
    assert lines.count("hi") == 1 and len(typed) == 1, lines

    # The link opens the same session: its output so far, then what either page types.
    context, other = await new_viewer(browser, served, viewer.shots, key=served.key)
    try:
        await other.page.goto(page.url)
        await until_terminal_line(other.page, "back")
        await other.page.get_by_test_id("terminal").click()
        await other.page.keyboard.type("echo from-the-link\n")
        await until_terminal_line(other.page, "from-the-link")
        await until_terminal_line(page, "from-the-link")
        assert not other.errors, other.errors
    finally:
        await context.close()

    await page.keyboard.type("exit\n")
    await served.exited(capsule_id, "shell")
    screen = page.get_by_test_id("terminal").locator(".xterm-rows")
    await expect(screen).to_contain_text("[process exited with code 0]", timeout=WAIT_MS)
    await expect(page.locator(".toolbar").first.locator(".chip")).to_have_text("exit 0", timeout=WAIT_MS)
    await expect(page.get_by_test_id("terminal")).to_be_visible()  # still the terminal, once it has ended
    await viewer.shot("terminal-exited")


async def test_a_restarted_process_shows_each_run_and_how_it_ended(served: Served, viewer: Viewer) -> None:
    capsule_id = await served.capsule()
    spec = {
        "cmd": "sh",
        "args": ["-c", "echo run; exit 3"],
        "tag": "crasher",
        "restart": {"policy": "ON_FAILURE", "maxRestarts": 2, "backoffSec": 0.05, "maxBackoffSec": 0.1},
    }
    (await served.api.run("StartProcess", capsuleId=capsule_id, input=spec)).ok()
    await served.exited(capsule_id, "crasher")
    await viewer.open(capsule_id, "crasher")
    page = viewer.page
    await expect(page.locator(".row.exit")).to_contain_text("exited with code 3", timeout=WAIT_MS)
    restarts = page.locator(".row.restart")
    await expect(restarts).to_have_count(2)
    await expect(restarts.first).to_contain_text("exited with code 3; restarted as pid")
    await expect(restarts.nth(1)).to_contain_text("(restart 2)")
    assert await viewer.output() == ["run", "run", "run"]  # one stream, every run's output in it
    await viewer.shot("restarted")
