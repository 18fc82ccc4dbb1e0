"""CORS (SPEC §4) as a browser enforces it: Debian's headless Chromium, pages of three loopback
sites (three origins) calling the gateway with a key, and the echo upstream behind it.

Keystile allows origins A and C (`gateway.cors_allowed_origins`), not B. Each site serves one
page and its script (a file: the page's CSP allows no inline script and no connection but to
the gateway); the script sends a POST with an Authorization header and a JSON body, which a
browser sends only after a preflight, and writes what it could read of the answer into the page.
The key reaches the page through a form field the test fills; the script empties it and sends
the key nowhere but the gateway. The tests wait for the page's outcome, never for a time.
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    expect,
)

from admin.client import KeystileAdmin
from gateway.app import bound_port
from tests.browser import chromium_browser  # noqa: F401  (the browser fixture)
from tests.support import (
    LOOPBACK,
    Keystile,
    Upstream,
    make_admin,
    make_settings,
    start_keystile,
    wait_until,
)

ROUTE = "/mcp-connect/github/x"  # the echo upstream answers it as /github/mcp/x

PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="referrer" content="no-referrer">
  <meta name="keystile-gateway" content="{gateway}">
  <title>Widget</title>
  <script src="widget.js" defer></script>
</head>
<body>
  <h1>A widget on {origin}</h1>
  <form id="call" autocomplete="off">
    <label for="key">API key</label>
    <input id="key" type="password" spellcheck="false">
    <button type="submit">Call the gateway</button>
  </form>
  <p id="outcome" role="status"></p>
  <dl>
    <dt>Status</dt><dd id="status"></dd>
    <dt>X-Request-Id</dt><dd id="request-id"></dd>
    <dt>Mcp-Session-Id</dt><dd id="session-id"></dd>
    <dt>X-Upstream</dt><dd id="x-upstream"></dd>
    <dt>Error</dt><dd id="error"></dd>
    <dt>Upstream path</dt><dd id="upstream-path"></dd>
  </dl>
</body>
</html>
"""

SCRIPT = """\
"use strict";
// Calls the gateway with the key from the form and shows what the browser let it read.
(() => {
  const gateway = document.querySelector('meta[name="keystile-gateway"]').content;
  const $ = (id) => document.getElementById(id);
  const show = (id, value) => {
    $(id).textContent = value === null ? "(not readable)" : String(value);
  };

  async function call(event) {
    event.preventDefault();
    const key = $("key").value;
    $("key").value = ""; // the key stays nowhere in the page
    $("outcome").textContent = "calling";
    let response;
    try {
      response = await fetch(`${gateway}/mcp-connect/github/x`, {
        method: "POST",
        headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
        body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "tools/list" }),
        credentials: "omit",
        cache: "no-store",
      });
    } catch (err) {
      $("outcome").textContent = `blocked: ${err.name}`;
      return;
    }
    const body = await response.json();
    show("status", response.status);
    show("request-id", response.headers.get("X-Request-Id"));
    show("session-id", response.headers.get("Mcp-Session-Id"));
    show("x-upstream", response.headers.get("X-Upstream"));
    show("error", body.error === undefined ? "" : body.error);
    show("upstream-path", body.path === undefined ? "" : body.path);
    $("outcome").textContent = "answered";
  }

  $("call").addEventListener("submit", call);
})();
"""


# --- the sites ---


@dataclass
class Site:
    """A loopback web server: one origin, serving the widget's page and script."""

    runner: web.AppRunner
    port: int
    gateway: str = ""  # the data plane the page calls (set once Keystile listens)
    seen: list[str] = field(default_factory=list)  # every request it got, as text

    @property
    def origin(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


async def start_site() -> Site:
    site: Site | None = None

    async def serve(request: web.Request) -> web.StreamResponse:
        assert site is not None
        site.seen.append(f"{request.method} {request.path_qs} {dict(request.headers)}")
        headers = {
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'self'; connect-src {site.gateway}; "
                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        }
        if request.path == "/widget.html":
            text = PAGE.format(gateway=html.escape(site.gateway), origin=html.escape(site.origin))
            return web.Response(text=text, content_type="text/html", headers=headers)
        if request.path == "/widget.js":
            return web.Response(text=SCRIPT, content_type="text/javascript", headers=headers)
        return web.Response(status=404, text="not found", headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    site = Site(runner, bound_port(runner))
    return site


@pytest.fixture
async def sites() -> AsyncIterator[dict[str, Site]]:
    """Origins A and C are allowed by the gateway, B is not."""
    started: dict[str, Site] = {}
    try:
        for name in ("A", "B", "C"):
            started[name] = await start_site()
        yield started
    finally:
        for site in started.values():
            await site.runner.cleanup()


@pytest.fixture
async def ks(
    database_url: str, upstream: Upstream, sites: dict[str, Site]
) -> AsyncIterator[Keystile]:
    allowed = (sites["A"].origin, sites["C"].origin)
    settings = make_settings(upstream, gateway={"cors_allowed_origins": allowed})
    async with start_keystile(settings, database_url) as keystile:
        for site in sites.values():
            site.gateway = keystile.gateway
        yield keystile


# --- a tab on a site's page ---


@dataclass
class Widget:
    page: Page
    site: Site
    key: str
    console: list[ConsoleMessage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def shown(self, name: str) -> Locator:
        return self.page.locator(f"#{name}")

    async def call(self) -> None:
        """Give the page the key through its form, and have it call the gateway."""
        await self.page.get_by_label("API key", exact=True).fill(self.key)
        await self.page.get_by_role("button", name="Call the gateway").click()


@asynccontextmanager
async def widget(browser: Browser, site: Site, key: str) -> AsyncIterator[Widget]:
    """The site's page in a fresh tab; afterwards, checked for what it should never do: script
    errors, a request to anywhere but its own site and the gateway, the key in a URL or in
    anything its own site received, the key left in the page."""
    context = await browser.new_context()
    context.set_default_timeout(10_000)
    page = await context.new_page()
    tab = Widget(page, site, key)

    def on_request(request: Request) -> None:
        if not request.url.startswith((site.origin + "/", site.gateway + "/")):
            tab.problems.append(f"a request off the site and the gateway: {request.url}")
        if key in request.url:
            tab.problems.append(f"the key in a URL: {request.url}")

    def on_console(message: ConsoleMessage) -> None:
        tab.console.append(message)

    page.on("console", on_console)
    page.on("pageerror", lambda err: tab.problems.append(f"page error: {err}"))
    page.on("request", on_request)
    await page.goto(site.origin + "/widget.html")
    await expect(page.get_by_role("heading", name=f"A widget on {site.origin}")).to_be_visible()
    yield tab
    assert await page.get_by_label("API key", exact=True).input_value() == ""
    assert key not in await page.content()
    await context.close()
    assert tab.problems == []
    assert site.seen and not [line for line in site.seen if key in line]


def csp_violations(tab: Widget) -> list[str]:
    return [m.text for m in tab.console if "Content Security Policy" in m.text]


# --- the tests ---


async def test_an_allowed_origin_reads_the_answer_and_another_is_blocked_before_its_post(
    ks: Keystile, upstream: Upstream, sites: dict[str, Site], browser: Browser
) -> None:
    user = await ks.user(servers=["github"])
    key = (await ks.key(user, name="widget")).key

    # From origin A: the preflight passes, the POST is forwarded, and the page reads the JSON
    # body and the exposed headers, but not a header the gateway does not expose.
    async with widget(browser, sites["A"], key) as a:
        await a.call()
        await expect(a.shown("outcome")).to_have_text("answered")
        await expect(a.shown("status")).to_have_text("200")
        await expect(a.shown("upstream-path")).to_have_text("/github/mcp/x")
        await expect(a.shown("session-id")).to_have_text("upstream-session")
        await expect(a.shown("request-id")).to_have_text(re.compile(r"^[A-Za-z0-9._:-]{1,128}$"))
        await expect(a.shown("x-upstream")).to_have_text("(not readable)")
        await expect(a.shown("error")).to_have_text("")
        assert csp_violations(a) == []
        request_id = await a.shown("request-id").text_content()
    posts = [s for s in upstream.seen if s["method"] == "POST"]
    assert len(posts) == 1 and posts[0]["path"] == "/github/mcp/x"
    assert posts[0]["headers"]["x-request-id"] == request_id  # the id the page read
    assert posts[0]["headers"]["content-type"] == "application/json"
    assert posts[0]["headers"]["origin"] == sites["A"].origin
    assert "authorization" not in posts[0]["headers"]  # the key stops at the gateway

    # From origin B: the gateway refuses the preflight, so the browser never sends the POST
    # and the page's fetch rejects.
    async with widget(browser, sites["B"], key) as b:
        await b.call()
        await expect(b.shown("outcome")).to_have_text("blocked: TypeError")
        await expect(b.shown("status")).to_have_text("")

        def refusal() -> str | None:  # Chromium says why in the console
            said = [m.text for m in b.console if "blocked by CORS policy" in m.text]
            return said[0] if said else None

        why = await wait_until(refusal, message="Chromium never said why it blocked the call")
        assert "preflight" in why
        assert csp_violations(b) == []
    assert [s for s in upstream.seen if s["method"] == "POST"] == posts  # B's never arrived
    assert not [s for s in upstream.seen if s["method"] == "OPTIONS"]  # nor any preflight


async def test_a_key_bound_to_origin_a_is_refused_on_origin_c_readably(
    ks: Keystile, upstream: Upstream, sites: dict[str, Site], browser: Browser
) -> None:
    """C may read the gateway's answers (it is configured), but the key names only A: the
    page on C gets 403 origin_not_allowed, and can read it."""
    _, admin = await make_admin(ks)
    async with KeystileAdmin(ks.admin, admin.key) as client:
        made = await client.keys.create(
            "docs widget", ["github"], allowed_origins=[sites["A"].origin]
        )
    assert made["allowed_origins"] == [sites["A"].origin]
    key = made["key"]

    async with widget(browser, sites["C"], key) as c:
        await c.call()
        await expect(c.shown("outcome")).to_have_text("answered")
        await expect(c.shown("status")).to_have_text("403")
        await expect(c.shown("error")).to_have_text("origin_not_allowed")
        await expect(c.shown("request-id")).not_to_have_text("(not readable)")
        await expect(c.shown("upstream-path")).to_have_text("")
    assert upstream.seen == []  # refused at the gateway

    async with widget(browser, sites["A"], key) as a:
        await a.call()
        await expect(a.shown("outcome")).to_have_text("answered")
        await expect(a.shown("status")).to_have_text("200")
        await expect(a.shown("upstream-path")).to_have_text("/github/mcp/x")
    assert [s["method"] for s in upstream.seen] == ["POST"]
