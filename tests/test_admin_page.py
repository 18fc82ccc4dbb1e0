"""The admin web page at GET /admin/api-keys, driven in Debian's headless Chromium.

Each test gets a fresh Keystile (the `keystile` fixture) and its own Chromium, launched in the
test's event loop with Playwright's async API: the page and the server share that loop, and a
launch costs about half a second. Screenshots of the main states go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    expect,
)

from admin.client import KeystileAdmin, KeystileError
from gateway.calls import CallRecord
from gateway.config import UpstreamSettings
from gateway.keyring import IssuedKey
from gateway.models import User
from gateway.sample_mcp import MCP_PATH, start_sample_server
from tests.browser import ARTIFACTS, NARROW, WIDE, chromium_browser  # noqa: F401  (the browser fixture)
from tests.support import (
    LOOPBACK,
    FaultyProxy,
    Keystile,
    Upstream,
    make_settings,
    start_keystile,
    wait_until,
)

STORAGE_KEY = "keystile.apiKey"
ADMIN_EMAIL = "ada@example.com"


# --- fixtures and helpers ---


@dataclass
class Ui:
    """One browser tab on the admin page, plus what it should never do."""

    page: Page
    ks: Keystile
    problems: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.ks.admin + "/admin/api-keys"

    async def open(self) -> None:
        await self.page.goto(self.url)

    async def sign_in(self, key: str) -> None:
        await self.page.get_by_label("API key", exact=True).fill(key)
        await self.page.get_by_role("button", name="Sign in").click()

    async def shot(self, name: str, *, full_page: bool = True) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        # Two animation frames: what a scroll just brought into view is painted first.
        await self.page.evaluate(
            "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
        )
        await self.page.screenshot(path=ARTIFACTS / f"admin-page-{name}.png", full_page=full_page)

    def row(self, name: str) -> Locator:
        """The keys table's row of the key with exactly this name."""
        exactly = re.compile(f"^{re.escape(name)}(this session's key)?$")
        rows = self.page.locator("#keys-table tbody tr")
        return rows.filter(has=self.page.locator(".key-name", has_text=exactly))

    def cell(self, row: Locator, column: str) -> Locator:
        return row.locator(f'td[data-label="{column}"]')

    def button(self, name: str) -> Locator:
        return self.page.get_by_role("button", name=name, exact=True)

    async def reveal_and_close(self) -> str:
        """Read the once-shown key from its dialog, close it, and check it left the page."""
        dialog = self.page.locator("#reveal-dialog")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text("cannot be shown again")
        key = await self.page.locator("#reveal-key").input_value()
        assert key.startswith("ks1-")
        await dialog.get_by_role("button", name="Done").click()
        await expect(dialog).to_be_hidden()
        await expect(self.page.locator("#reveal-key")).to_have_count(0)
        assert key not in await self.page.content()
        return key

    async def session_key(self) -> Any:
        return await self.page.evaluate(f"sessionStorage.getItem({json.dumps(STORAGE_KEY)})")

    async def focused_id(self) -> Any:
        return await self.page.evaluate("document.activeElement && document.activeElement.id")


@asynccontextmanager
async def watched_tab(keystile: Keystile, browser: Browser) -> AsyncIterator[Ui]:
    """A tab on the admin page of `keystile`, checked afterwards for what it should never do."""
    context = await browser.new_context(
        viewport=WIDE, permissions=["clipboard-read", "clipboard-write"]
    )
    context.set_default_timeout(10_000)
    page = await context.new_page()
    tab = Ui(page, keystile)

    def on_console(message: ConsoleMessage) -> None:
        # Chromium logs every 4xx fetch as "Failed to load resource"; those are expected here.
        if message.type == "error" and "Failed to load resource" not in message.text:
            tab.problems.append(f"console: {message.text}")

    def on_request(request: Request) -> None:
        if not request.url.startswith(keystile.admin + "/"):
            tab.problems.append(f"request off the admin plane: {request.url}")
        if STORAGE_KEY in request.url or "ks1-" in request.url:
            tab.problems.append(f"a key in a URL: {request.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda err: tab.problems.append(f"page error: {err}"))
    page.on("request", on_request)
    yield tab
    cookies = await context.cookies()
    await context.close()
    assert cookies == [], "the page never sets cookies"
    assert tab.problems == [], "CSP violations, script errors, or requests off the admin plane"


@pytest.fixture
async def ui(keystile: Keystile, browser: Browser) -> AsyncIterator[Ui]:
    async with watched_tab(keystile, browser) as tab:
        yield tab


async def admin_key(ks: Keystile) -> tuple[User, str]:
    boss = await ks.user(ADMIN_EMAIL, role="admin", servers=["*"])
    issued = await ks.key(boss, name="admin console", permissions=("admin", "keys", "mcp", "chat"))
    return boss, issued.key


async def data_plane_status(ks: Keystile, key: str, want: int, *, within: float = 5.0) -> int:
    """GET /api/me with the key until it answers `want` (changes reach the cache at once, but
    allow for the invalidation round trip); returns the last status seen."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status, _, _ = await ks.request("GET", "/api/me", key)
        if status == want or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.05)


def key_filter(page: Page, label: str) -> Locator:
    return page.get_by_role("form", name="Filter keys").get_by_label(label, exact=True)


def usage_filter(page: Page, label: str) -> Locator:
    return page.get_by_role("form", name="Filter usage").get_by_label(label, exact=True)


async def signed_in_as_admin(ui: Ui) -> tuple[User, str]:
    boss, key = await admin_key(ui.ks)
    await ui.open()
    await ui.sign_in(key)
    await expect(ui.page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()
    return boss, key


# --- the page itself ---


async def test_page_and_files_are_self_contained_with_a_strict_csp(keystile: Keystile) -> None:
    http = keystile.http
    async with http.get(keystile.admin + "/admin/api-keys") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        csp = resp.headers["Content-Security-Policy"]
        html = await resp.text()
    assert "default-src 'self'" in csp
    assert "form-action 'none'" in csp
    assert 'src="static/app.js"' in html
    for name, content_type in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        async with http.get(f"{keystile.admin}/admin/static/{name}") as resp:
            assert resp.status == 200, name
            assert resp.content_type == content_type
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Content-Security-Policy"] == csp
            text = await resp.text()
        if name != "favicon.svg":  # the SVG's xmlns is a name, not a fetch
            assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), name
    assert not re.search(r"https?://", html)
    for bad in ("api-keys.html", "nope.js", "..%2Fpage.py", "%2e%2e"):
        async with http.get(f"{keystile.admin}/admin/static/{bad}") as resp:
            assert resp.status == 404, bad
            assert (await resp.json())["error"] == "not_found"


async def test_sign_in_with_a_bad_key_then_an_admin_key_and_sign_out(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    _, key = await admin_key(ks)
    await ui.open()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await ui.shot("01-sign-in")

    # A bad key: the page shows the API's own message.
    with pytest.raises(KeystileError) as refused:
        async with KeystileAdmin(ks.admin, "x") as bad:
            await bad.keys.fetch_all()
    api_message = refused.value.message
    await ui.sign_in("ks1-not-a-real-key")
    await expect(page.locator("#sign-in-error")).to_have_text(api_message)
    await ui.shot("02-sign-in-bad-key")
    assert await ui.session_key() is None

    # An admin key: the admin view, with the User column and the Users tab.
    await ui.sign_in(key)
    await expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()
    await expect(page.locator("#whoami")).to_have_text(f"Signed in as {ADMIN_EMAIL} (admin)")
    await expect(page.get_by_role("columnheader", name="User")).to_be_visible()
    await expect(page.get_by_role("tab", name="Users")).to_be_visible()
    row = ui.row("admin console")
    await expect(ui.cell(row, "User")).to_have_text(ADMIN_EMAIL)
    await expect(row).to_contain_text("this session's key")
    await expect(ui.cell(row, "Servers")).to_have_text("All servers")
    await expect(ui.cell(row, "Status")).to_have_text("active")
    assert await ui.session_key() == key
    assert key not in page.url
    assert await page.get_by_label("API key", exact=True).input_value() == "", "left in the form"

    # The tab keeps the session across a reload...
    await page.reload()
    await expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()

    # ...until sign-out forgets it.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert await ui.session_key() is None
    assert await page.evaluate("sessionStorage.length") == 0
    await page.reload()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(page.locator("#app-view")).to_be_hidden()
    assert await ui.focused_id() == "sign-in-key"
    await page.set_viewport_size(NARROW)
    await ui.shot("03-sign-in-390")


# --- keys ---


async def test_create_a_key_copy_it_and_use_it(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    await signed_in_as_admin(ui)
    await ui.shot("04-keys-admin")

    # The dialog takes focus, and Escape closes it.
    await ui.button("Create API key").click()
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    assert await ui.focused_id() == "key-name"
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()

    await ui.button("Create API key").click()
    await page.get_by_label("Name", exact=True).fill("ci pipeline")
    await page.get_by_label("Description (optional)", exact=True).fill(
        "GitHub Actions, repo keystile"
    )
    await page.get_by_label("Expires", exact=True).select_option(label="In 30 days")
    await dialog.get_by_role("radio", name="Only these servers").check()
    await dialog.get_by_role("checkbox", name="github").check()
    await dialog.get_by_role("checkbox", name="chat").check()
    await ui.shot("05-create-dialog", full_page=False)
    await dialog.get_by_role("button", name="Create API key").click()

    # The full key, once, with a working Copy button.
    reveal = page.locator("#reveal-dialog")
    await expect(reveal).to_be_visible()
    assert await ui.focused_id() == "copy-key"
    shown = await page.locator("#reveal-key").input_value()
    await reveal.get_by_role("button", name="Copy").click()
    await expect(page.locator("#copy-status")).to_have_text("Copied to the clipboard.")
    assert await page.evaluate("navigator.clipboard.readText()") == shown
    await ui.shot("06-key-created", full_page=False)
    key = await ui.reveal_and_close()
    assert key == shown

    row = ui.row("ci pipeline")
    await expect(ui.cell(row, "Description")).to_have_text("GitHub Actions, repo keystile")
    await expect(ui.cell(row, "Servers")).to_contain_text("1 server")
    await expect(ui.cell(row, "Servers").locator("[title]")).to_have_attribute("title", "github")
    await expect(ui.cell(row, "Permissions")).to_have_text("mcp, chat")
    await expect(ui.cell(row, "Last used").locator(".when")).to_have_text("Never")
    await expect(ui.cell(row, "Expires")).not_to_have_text("Never")
    await expect(ui.cell(row, "Key")).to_have_text(key[: key.rindex("-") + 5] + "…")
    first = page.locator("#keys-table tbody tr").first
    await expect(first).to_contain_text("ci pipeline")  # newest first

    # The key works on the data plane, for what it was given.
    status, _, body = await ks.request("GET", "/api/me", key)
    assert status == 200
    assert body["key"]["name"] == "ci pipeline"
    assert body["key"]["servers"] == ["github"]
    assert (await ks.request("GET", "/mcp-connect/github/x", key))[0] == 200
    assert (await ks.request("GET", "/mcp-connect/gitlab/x", key))[0] == 403

    # Readable at phone width: stacked rows, and the dialog fits.
    await page.set_viewport_size(NARROW)
    await ui.shot("07-keys-390")
    await ui.button("Create API key").click()
    await expect(dialog).to_be_visible()
    box = await dialog.bounding_box()
    assert box is not None and box["width"] <= NARROW["width"]
    await ui.shot("08-create-dialog-390", full_page=False)
    await page.keyboard.press("Escape")
    widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], "no sideways scrolling at 390 px"


async def test_disable_enable_rotate_and_revoke(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    boss, _ = await signed_in_as_admin(ui)
    old = (await ks.key(boss, name="worker")).key
    await page.reload()  # the session survives; the list now has the new key
    row = ui.row("worker")
    await expect(row).to_be_visible()

    await ui.button("Disable worker").click()
    await expect(ui.cell(row, "Status")).to_have_text("disabled")
    await expect(page.locator("#notice")).to_have_text("Disabled “worker”.")
    # The re-rendered row's toggle keeps the keyboard focus.
    assert await page.evaluate("document.activeElement.ariaLabel") == "Enable worker"
    assert await data_plane_status(ks, old, 401) == 401

    await ui.button("Enable worker").click()
    await expect(ui.cell(row, "Status")).to_have_text("active")
    assert await data_plane_status(ks, old, 200) == 200

    # Rotate: the new key is shown once; the old one stops (no grace period).
    await ui.button("Rotate worker").click()
    rotate = page.locator("#rotate-dialog")
    await expect(rotate).to_be_visible()
    assert await ui.focused_id() == "rotate-grace"
    await ui.shot("09-rotate-dialog", full_page=False)
    await rotate.get_by_role("button", name="Rotate key").click()
    await expect(page.locator("#reveal-title")).to_have_text("New key for “worker”")
    # The copy fallback: no async clipboard, so the key is selected for Ctrl+C.
    await page.evaluate(
        "Object.defineProperty(navigator, 'clipboard', {value: {writeText: () =>"
        " Promise.reject(new Error('no clipboard here'))}})"
    )
    await page.get_by_role("button", name="Copy").click()
    selected = await page.evaluate(
        "(() => { const i = document.getElementById('reveal-key');"
        " return i.value.slice(i.selectionStart, i.selectionEnd); })()"
    )
    new = await ui.reveal_and_close()
    assert selected == new != old
    assert await page.evaluate("document.activeElement.ariaLabel") == "Rotate worker"
    assert await data_plane_status(ks, old, 401) == 401
    assert await data_plane_status(ks, new, 200) == 200

    # Revoke, after a confirmation that starts on Cancel.
    await ui.button("Revoke worker").click()
    confirm = page.locator("#confirm-dialog")
    await expect(confirm).to_contain_text("permanent")
    assert await ui.focused_id() == "confirm-cancel"
    await ui.shot("10-revoke-confirm", full_page=False)
    await confirm.get_by_role("button", name="Revoke key").click()
    await expect(confirm).to_be_hidden()
    await expect(row).to_have_count(0)
    await expect(page.locator("#notice")).to_have_text("Revoked “worker”.")
    assert await ui.focused_id() == "keys-title"  # the row, and its button, are gone
    assert await data_plane_status(ks, new, 401) == 401

    # Revoked keys show only when asked for.
    await page.get_by_label("Status", exact=True).select_option("revoked")
    await expect(ui.cell(row, "Status")).to_have_text("revoked")
    await expect(row.get_by_role("button")).to_have_count(0)
    await ui.shot("11-revoked-filter")


async def test_edit_a_key_and_see_api_errors(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    boss, _ = await signed_in_as_admin(ui)
    issued: IssuedKey = await ks.key(boss, name="laptop", servers=("*",))
    await page.reload()
    row = ui.row("laptop")
    await ui.button("Edit laptop").click()
    dialog = page.locator("#key-dialog")
    await expect(page.locator("#key-dialog-title")).to_have_text("Edit “laptop”")
    await page.get_by_label("Name", exact=True).fill("laptop mcp")
    await page.get_by_label("Description (optional)", exact=True).fill(
        "Claude Desktop on the work laptop"
    )
    await dialog.get_by_role("radio", name="Only these servers").check()
    await dialog.get_by_role("checkbox", name="gitlab").check()
    await page.get_by_label("Expires", exact=True).select_option(label="On a date…")
    await page.get_by_label("Expiry date", exact=True).fill("2031-05-17")
    await ui.shot("12-edit-dialog", full_page=False)
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_be_hidden()

    row = ui.row("laptop mcp")
    await expect(ui.cell(row, "Servers")).to_contain_text("1 server")
    await expect(ui.cell(row, "Description")).to_have_text("Claude Desktop on the work laptop")
    record = await ks.runtime.store.key(ks.actor.workspace_id, issued.record.id)
    assert record is not None
    assert record.name == "laptop mcp"
    assert record.servers == ("gitlab",)
    assert record.expires_at is not None and record.expires_at.year == 2031
    assert (await ks.request("GET", "/mcp-connect/github/x", issued.key))[0] == 403

    # A failure shows the API's message in the dialog, which stays open.
    await ui.button("Edit laptop mcp").click()
    await page.get_by_label("Name", exact=True).fill("admin console")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#key-error")).to_have_text(
        "A live key named 'admin console' already exists for this user."
    )
    await expect(dialog).to_be_visible()
    assert await ui.focused_id() == "key-name"
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()

    # Keyboard focus is visible.
    await ui.button("Edit laptop mcp").focus()
    await page.keyboard.press("Shift+Tab")
    await page.keyboard.press("Tab")
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"


# --- allowed origins (SPEC §4): the browser pages a key works from ---

DOCS, LOCAL = "https://docs.example.com", "http://127.0.0.1:3000"


async def origin_status(ks: Keystile, key: str, origin: str) -> tuple[int, Any]:
    """A data-plane request with this key, as a page on `origin` would make it."""
    status, _, body = await ks.request(
        "GET", "/mcp-connect/github/x", key, headers={"Origin": origin}
    )
    return status, body


async def test_a_keys_allowed_origins_are_set_shown_cleared_and_checked(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    _, admin = await signed_in_as_admin(ui)
    await ui.button("Create API key").click()
    dialog = page.locator("#key-dialog")
    origins = dialog.get_by_label("Allowed origins (one per line)", exact=True)
    await expect(origins).to_have_value("")
    await expect(origins).to_have_accessible_description(re.compile("Empty: any site"))
    await page.get_by_label("Name", exact=True).fill("docs widget")
    await origins.fill("HTTPS://Docs.Example.com:443\n\n  http://127.0.0.1:3000\n")
    await origins.scroll_into_view_if_needed()
    await ui.shot("37-create-dialog-origins", full_page=False)
    await dialog.get_by_role("button", name="Create API key").click()
    key = await ui.reveal_and_close()

    # The record holds both, as browsers send them.
    async with KeystileAdmin(ks.admin, admin) as client:
        listed = await client.keys.fetch_all(all=True)
    record = next(k for k in listed if k["name"] == "docs widget")
    assert record["allowed_origins"] == [DOCS, LOCAL]

    # The table: a count, with the origins on hover; a key without any: "Any".
    row = ui.row("docs widget")
    summary = ui.cell(row, "Origins").locator("[title]")
    await expect(summary).to_contain_text("2 origins")
    await summary.hover()
    await expect(summary).to_have_attribute("title", f"{DOCS}\n{LOCAL}")
    await expect(ui.cell(ui.row("admin console"), "Origins")).to_have_text("Any")
    wrap = page.locator("#keys-table").locator("xpath=..")
    scroll = await wrap.evaluate("w => [w.scrollWidth, w.clientWidth]")
    assert scroll[0] <= scroll[1], "every column, Actions included, in view at 1280 px"
    await ui.shot("38-keys-origins")
    await page.set_viewport_size(NARROW)
    await expect(ui.cell(row, "Origins")).to_contain_text("2 origins")
    widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], "no sideways scrolling at 390 px"
    await ui.shot("39-keys-origins-390")
    await page.set_viewport_size(WIDE)

    # The data plane: the key works from its pages (and outside a browser), not from others.
    assert (await origin_status(ks, key, DOCS))[0] == 200
    assert (await ks.request("GET", "/mcp-connect/github/x", key))[0] == 200
    status, body = await origin_status(ks, key, "https://copied.example")
    assert (status, body["error"]) == (403, "origin_not_allowed")

    # Edited: the origins as saved; a bad one gets the API's 422 in the dialog, on the field.
    await ui.button("Edit docs widget").click()
    await expect(origins).to_have_value(f"{DOCS}\n{LOCAL}")
    async with KeystileAdmin(ks.admin, admin) as client:
        with pytest.raises(KeystileError) as refusal:
            await client.keys.update(record["id"], allowed_origins=[DOCS, f"{DOCS}/chat"])
    expected = refusal.value
    assert expected.status == 422 and expected.field == "allowed_origins"
    await origins.fill(f"{DOCS}\n{DOCS}/chat")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#key-error")).to_have_text(expected.message)
    await expect(dialog).to_be_visible()
    await expect(origins).to_have_attribute("aria-invalid", "true")
    assert await ui.focused_id() == "key-origins"
    await ui.shot("40-edit-dialog-origins-error", full_page=False)
    async with KeystileAdmin(ks.admin, admin) as client:
        assert (await client.keys.fetch(record["id"]))["allowed_origins"] == [DOCS, LOCAL]

    # Emptied: any origin, which is null; the key now works from any page.
    await origins.fill("")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_be_hidden()
    await expect(ui.cell(row, "Origins")).to_have_text("Any")
    assert await page.evaluate("document.activeElement.ariaLabel") == "Edit docs widget"
    async with KeystileAdmin(ks.admin, admin) as client:
        assert (await client.keys.fetch(record["id"]))["allowed_origins"] is None

    async def served_anywhere() -> bool:
        return (await origin_status(ks, key, "https://copied.example"))[0] == 200

    await wait_until(served_anywhere, message="the key never worked from another origin")

    # An empty list (no browser page at all) shows as "None", and an edit of another field
    # leaves it so: the empty origins field does not turn it into null.
    async with KeystileAdmin(ks.admin, admin) as client:
        closed = await client.keys.create("server side only", ["github"], allowed_origins=[])
    await page.reload()
    none = ui.cell(ui.row("server side only"), "Origins").locator("[title]")
    await expect(none).to_have_text("None")
    await expect(none).to_have_attribute("title", "No browser page may use this key")
    await ui.button("Edit server side only").click()
    await expect(origins).to_have_value("")
    await page.get_by_label("Description (optional)", exact=True).fill("cron jobs")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_be_hidden()
    async with KeystileAdmin(ks.admin, admin) as client:
        kept = await client.keys.fetch(closed["id"])
    assert (kept["description"], kept["allowed_origins"]) == ("cron jobs", [])


# --- users ---


async def test_admin_manages_users(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    await signed_in_as_admin(ui)
    await page.get_by_role("tab", name="Users").click()
    users_panel = page.locator("#users-panel")
    await expect(users_panel).to_be_visible()
    await expect(users_panel).to_contain_text(ADMIN_EMAIL)

    # Add a user.
    await ui.button("Add user").click()
    dialog = page.locator("#user-dialog")
    assert await ui.focused_id() == "user-email"
    await dialog.get_by_label("Email", exact=True).fill("grace@example.com")
    await dialog.get_by_label("Display name (optional)", exact=True).fill("Grace Hopper")
    await dialog.get_by_label("Role", exact=True).select_option("member")
    await ui.shot("13-add-user-dialog", full_page=False)
    await dialog.get_by_role("button", name="Add user").click()
    await expect(dialog).to_be_hidden()
    row = page.locator("#users-table tbody tr", has_text="grace@example.com")
    await expect(row.locator('td[data-label="Role"] select')).to_have_value("member")
    await expect(row.locator('td[data-label="Server access"]')).to_have_text("None")
    users = {u.email: u for u in await ks.runtime.store.users(ks.actor.workspace_id)}
    grace = users["grace@example.com"]
    assert grace.display_name == "Grace Hopper"

    # The same email again: the API's message, in the dialog.
    await ui.button("Add user").click()
    await dialog.get_by_label("Email", exact=True).fill("grace@example.com")
    await dialog.get_by_role("button", name="Add user").click()
    await expect(page.locator("#user-error")).to_have_text(
        "A user with email 'grace@example.com' already exists."
    )
    await page.keyboard.press("Escape")

    # Change the role.
    await page.get_by_label("Role of grace@example.com", exact=True).select_option("admin")
    await expect(page.locator("#notice")).to_have_text("grace@example.com is now an admin.")
    refreshed = await ks.runtime.store.user(ks.actor.workspace_id, grace.id)
    assert refreshed is not None and refreshed.role == "admin"
    await page.get_by_label("Role of grace@example.com", exact=True).select_option("member")
    await expect(page.locator("#notice")).to_have_text("grace@example.com is now a member.")

    # Grant servers: a list of names, then every server.
    await ui.button("Server access grace@example.com").click()
    grants = page.locator("#grants-dialog")
    await grants.get_by_role("radio", name="Only these servers").check()
    await grants.get_by_role("checkbox", name="github").check()
    await grants.get_by_role("checkbox", name="tokened").check()
    await ui.shot("14-grants-dialog", full_page=False)
    await grants.get_by_role("button", name="Save access").click()
    await expect(row.locator('td[data-label="Server access"]')).to_have_text("github, tokened")
    refreshed = await ks.runtime.store.user(ks.actor.workspace_id, grace.id)
    assert refreshed is not None and refreshed.servers == ("github", "tokened")
    await ui.button("Server access grace@example.com").click()
    await grants.get_by_role("radio", name="All servers").check()
    await grants.get_by_role("button", name="Save access").click()
    await expect(row.locator('td[data-label="Server access"]')).to_have_text("All servers")

    # Disable (confirmed): her keys stop at once; enable brings them back.
    grace_key = (await ks.key(grace, name="grace's key")).key
    assert await data_plane_status(ks, grace_key, 200) == 200
    await ui.button("Disable grace@example.com").click()
    await page.locator("#confirm-dialog").get_by_role("button", name="Disable user").click()
    await expect(row.locator('td[data-label="Status"]')).to_have_text("disabled")
    assert await data_plane_status(ks, grace_key, 401) == 401
    await ui.shot("15-users")
    await ui.button("Enable grace@example.com").click()
    await expect(row.locator('td[data-label="Status"]')).to_have_text("active")
    assert await data_plane_status(ks, grace_key, 200) == 200

    # Her keys, from her row: the key list filtered to her.
    await ui.button("Keys grace@example.com").click()
    await expect(key_filter(page, "User")).to_have_value(grace.id)
    await expect(page.locator("#keys-table tbody tr")).to_have_count(1)
    await expect(ui.row("grace's key")).to_be_visible()
    await page.set_viewport_size(NARROW)
    await page.get_by_role("tab", name="Users").click()
    await ui.shot("16-users-390")


async def test_a_member_sees_only_their_own_keys(ui: Ui) -> None:
    page, ks = ui.page, ui.ks
    boss, _ = await admin_key(ks)
    await ks.key(boss, name="someone else's")
    member = await ks.user("mel@example.com", servers=["github"])
    key = (await ks.key(member, name="mel's console", permissions=("keys", "mcp"))).key
    await ks.key(member, name="mel's ci")
    await ui.open()
    await ui.sign_in(key)
    await expect(page.get_by_role("heading", name="Your API keys")).to_be_visible()
    await expect(page.locator("#whoami")).to_have_text("Signed in as mel@example.com")
    await expect(page.locator("#keys-table tbody tr")).to_have_count(2)
    await expect(ui.row("someone else's")).to_have_count(0)
    await expect(page.get_by_role("columnheader", name="User")).to_have_count(0)
    await expect(page.get_by_role("tab", name="Users")).to_be_hidden()
    await expect(page.locator("#users-panel")).to_be_hidden()
    await expect(key_filter(page, "User")).to_be_hidden()
    await ui.shot("17-member-keys")

    # The create dialog: no admin permission, and servers the member lacks are marked.
    await ui.button("Create API key").click()
    dialog = page.locator("#key-dialog")
    await expect(dialog.get_by_role("checkbox", name="admin")).to_be_hidden()
    await dialog.get_by_role("radio", name="Only these servers").check()
    await expect(dialog.locator(".server-list")).to_contain_text("gitlab (not granted to you)")
    await dialog.get_by_role("checkbox", name="github").check()
    await page.get_by_label("Name", exact=True).fill("mel's laptop")
    await dialog.get_by_role("button", name="Create API key").click()
    created = await ui.reveal_and_close()
    assert (await ks.request("GET", "/mcp-connect/github/x", created))[0] == 200
    await expect(page.locator("#keys-table tbody tr")).to_have_count(3)

    # An empty filter explains itself.
    await page.get_by_label("Status", exact=True).select_option("revoked")
    await expect(page.locator("#keys-empty")).to_contain_text("No revoked keys")


# --- tools (SPEC §6): picked from what a real MCP server lists, plus free patterns ---

TOOLS_LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream"}


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def with_tools(database_url: str) -> AsyncIterator[Keystile]:
    """Keystile in front of the bundled sample MCP server ("sample": echo, add, whoami) and of a
    server that cannot be reached ("offline": a closed port)."""
    runner, port = await start_sample_server(LOOPBACK)
    servers = {
        "sample": UpstreamSettings(url=f"http://{LOOPBACK}:{port}{MCP_PATH}"),
        "offline": UpstreamSettings(url=f"http://{LOOPBACK}:{closed_port()}{MCP_PATH}"),
    }
    try:
        async with start_keystile(
            replace(make_settings(), mcp_servers=servers), database_url
        ) as ks:
            yield ks
    finally:
        await runner.cleanup()


@pytest.fixture
async def tools_ui(with_tools: Keystile, browser: Browser) -> AsyncIterator[Ui]:
    async with watched_tab(with_tools, browser) as tab:
        yield tab


async def listed_tools(ks: Keystile, key: str) -> list[str]:
    """The sample server's tools/list, through the gateway, as this key sees it."""
    status, _, body = await ks.request(
        "POST", "/mcp-connect/sample", key, json=TOOLS_LIST, headers=MCP_ACCEPT
    )
    assert status == 200, body
    return [tool["name"] for tool in body["result"]["tools"]]


async def until_listed(ks: Keystile, key: str, names: list[str]) -> None:
    """Wait for a tools change to reach the gateway's cache (invalidation is a round trip)."""

    async def listed() -> bool:
        return await listed_tools(ks, key) == names

    await wait_until(listed, message=f"tools/list never gave {names}")


def tool_box(group: Locator, name: str) -> Locator:
    return group.get_by_role("checkbox", name=name, exact=True)


async def test_create_a_key_with_tools_of_a_real_server(tools_ui: Ui) -> None:
    ui = tools_ui
    page, ks = ui.page, ui.ks
    _, admin = await signed_in_as_admin(ui)
    await ui.button("Create API key").click()
    dialog = page.locator("#key-dialog")
    await page.get_by_label("Name", exact=True).fill("agent")
    tools = dialog.get_by_role("group", name="Tools", exact=True)
    everything = tools.get_by_role("radio", name="All tools")
    await expect(everything).to_be_checked()  # the default: tools null
    patterns = tools.get_by_label("Patterns (one per line)", exact=True)
    await expect(patterns).to_be_hidden()

    # By keyboard: the arrow key picks "Only these tools", which lists the tools of every
    # server the key may reach ("All servers" is picked: both servers).
    await everything.focus()
    await page.keyboard.press("ArrowDown")
    await expect(tools.get_by_role("radio", name="Only these tools")).to_be_checked()
    sample = tools.get_by_role("group", name="sample", exact=True)
    await expect(sample.get_by_role("checkbox")).to_have_count(3)
    for name in ("echo", "add", "whoami"):
        await expect(tool_box(sample, name)).not_to_be_checked()
    await expect(tool_box(sample, "add")).to_have_accessible_description("Add two numbers.")

    # The server that cannot be reached: a note instead of checkboxes; patterns still work.
    offline = tools.get_by_role("group", name="offline", exact=True)
    await expect(offline).to_contain_text("could not be listed")
    await expect(offline.get_by_role("checkbox")).to_have_count(0)

    await tool_box(sample, "echo").check()
    await tool_box(sample, "add").focus()
    await page.keyboard.press("Space")
    await expect(tool_box(sample, "add")).to_be_checked()
    await patterns.fill("offline/search")
    await tools.scroll_into_view_if_needed()
    await ui.shot("18-create-dialog-tools", full_page=False)
    await dialog.get_by_role("button", name="Create API key").click()
    key = await ui.reveal_and_close()

    # The record holds exactly the ticked tools and the pattern.
    async with KeystileAdmin(ks.admin, admin) as client:
        listed = await client.keys.fetch_all(all=True)
    record = next(k for k in listed if k["name"] == "agent")
    saved = record["tools"]
    assert saved is not None and sorted(saved) == ["offline/search", "sample/add", "sample/echo"]

    # The table: a count, with the names on hover.
    row = ui.row("agent")
    summary = ui.cell(row, "Tools").locator("[title]")
    await expect(summary).to_contain_text("3 tools")
    await summary.hover()
    await expect(summary).to_have_attribute("title", "\n".join(saved))
    await expect(ui.cell(ui.row("admin console"), "Tools")).to_have_text("All tools")
    await ui.shot("19-keys-tools")

    # The gateway lists only those tools to the key.
    assert await listed_tools(ks, key) == ["echo", "add"]

    # At phone width: the table stacks, and the dialog's tools fit without sideways scrolling.
    await page.set_viewport_size(NARROW)
    await ui.shot("20-keys-tools-390")
    await ui.button("Create API key").click()
    await tools.get_by_role("radio", name="Only these tools").check()
    await tool_box(sample, "whoami").check()
    await patterns.fill("!offline/delete_*")
    await expect(offline).to_contain_text("could not be listed")
    await sample.scroll_into_view_if_needed()
    await ui.shot("21-create-dialog-tools-390", full_page=False)
    box = await dialog.bounding_box()
    assert box is not None and box["width"] <= NARROW["width"]
    inner = await dialog.evaluate("d => [d.scrollWidth, d.clientWidth]")
    assert inner[0] <= inner[1], "nothing in the dialog overflows sideways"
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], "no sideways scrolling at 390 px"

    # Edited (still at phone width): its tools as saved, then "All tools", which is null.
    await ui.button("Edit agent").click()
    await expect(tool_box(sample, "echo")).to_be_checked()
    await expect(tool_box(sample, "add")).to_be_checked()
    await expect(tool_box(sample, "whoami")).not_to_be_checked()
    await expect(patterns).to_have_value("offline/search")
    await tools.get_by_role("radio", name="All tools").check()
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_be_hidden()
    await expect(ui.cell(row, "Tools")).to_have_text("All tools")
    async with KeystileAdmin(ks.admin, admin) as client:
        assert (await client.keys.fetch(record["id"]))["tools"] is None
    await until_listed(ks, key, ["echo", "add", "whoami"])


async def test_edit_a_keys_tools_and_see_the_apis_422(tools_ui: Ui) -> None:
    ui = tools_ui
    page, ks = ui.page, ui.ks
    _, admin = await signed_in_as_admin(ui)
    current = ["sample/echo", "offline/search", "sample/whoami", "sample/a*"]
    async with KeystileAdmin(ks.admin, admin) as client:
        made = await client.keys.create("bot", ["*"], tools=current)
    key_id, key = made["id"], made["key"]
    await page.reload()
    row = ui.row("bot")
    await expect(ui.cell(row, "Tools")).to_contain_text("4 patterns")

    # The key's tools: discovered names ticked, everything else in the patterns field.
    await ui.button("Edit bot").click()
    dialog = page.locator("#key-dialog")
    tools = dialog.get_by_role("group", name="Tools", exact=True)
    await expect(tools.get_by_role("radio", name="Only these tools")).to_be_checked()
    sample = tools.get_by_role("group", name="sample", exact=True)
    await expect(tool_box(sample, "echo")).to_be_checked()
    await expect(tool_box(sample, "whoami")).to_be_checked()
    await expect(tool_box(sample, "add")).not_to_be_checked()
    patterns = tools.get_by_label("Patterns (one per line)", exact=True)
    await expect(patterns).to_have_value("offline/search\nsample/a*")
    await tools.scroll_into_view_if_needed()
    await ui.shot("22-edit-dialog-tools", full_page=False)

    # A bad pattern: the API's 422 in the dialog, on the patterns field, which takes focus.
    async with KeystileAdmin(ks.admin, admin) as client:
        with pytest.raises(KeystileError) as refusal:
            await client.keys.update(key_id, tools=["x y"])
    expected = refusal.value
    assert expected.status == 422 and expected.field == "tools"
    await patterns.fill("offline/search\nx y")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#key-error")).to_have_text(expected.message)
    await expect(dialog).to_be_visible()
    await expect(patterns).to_have_attribute("aria-invalid", "true")
    assert await ui.focused_id() == "key-tool-patterns"
    await ui.shot("23-edit-dialog-tools-error", full_page=False)
    record = await ks.runtime.store.key(ks.actor.workspace_id, key_id)
    assert record is not None and list(record.tools or ()) == current  # nothing half-written

    # "All tools": the key's tools become null.
    await tools.get_by_role("radio", name="All tools").check()
    await expect(patterns).to_be_hidden()
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_be_hidden()
    await expect(ui.cell(row, "Tools")).to_have_text("All tools")
    record = await ks.runtime.store.key(ks.actor.workspace_id, key_id)
    assert record is not None and record.tools is None
    await until_listed(ks, key, ["echo", "add", "whoami"])

    # And back to one ticked tool.
    await ui.button("Edit bot").click()
    await tools.get_by_role("radio", name="Only these tools").check()
    await tool_box(sample, "whoami").check()
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_be_hidden()
    await expect(ui.cell(row, "Tools")).to_contain_text("1 tool")
    record = await ks.runtime.store.key(ks.actor.workspace_id, key_id)
    assert record is not None and record.tools == ("sample/whoami",)
    assert await page.evaluate("document.activeElement.ariaLabel") == "Edit bot"
    await until_listed(ks, key, ["whoami"])


async def test_admin_edits_a_members_tools_in_the_users_view(tools_ui: Ui) -> None:
    ui = tools_ui
    page, ks = ui.page, ui.ks
    await signed_in_as_admin(ui)
    grace = await ks.user("grace@example.com", servers=["sample"])
    grace_key = (await ks.key(grace, name="grace's key")).key
    await page.get_by_role("tab", name="Users").click()

    # Admins hold every tool: said so, and no editor.
    admin_row = page.locator("#users-table tbody tr", has_text=ADMIN_EMAIL)
    admin_tools = admin_row.locator('td[data-label="Tools"] [title]')
    await expect(admin_tools).to_contain_text("All tools (admin)")
    await expect(admin_tools).to_have_attribute("title", re.compile("Admins hold every tool"))
    await expect(admin_row.get_by_role("button", name=f"Tools {ADMIN_EMAIL}")).to_have_count(0)

    row = page.locator("#users-table tbody tr", has_text="grace@example.com")
    await expect(row.locator('td[data-label="Tools"]')).to_have_text("All tools")
    await ui.button("Tools grace@example.com").click()
    dialog = page.locator("#tools-dialog")
    await expect(dialog).to_be_visible()
    tools = dialog.get_by_role("group", name="Tools this user may call")
    assert await page.evaluate("document.activeElement.value") == "all"  # focus on the mode
    await page.keyboard.press("ArrowDown")
    # Only the servers she may reach.
    sample = tools.get_by_role("group", name="sample", exact=True)
    await expect(sample.get_by_role("checkbox")).to_have_count(3)
    await expect(tools.get_by_role("group", name="offline")).to_have_count(0)
    await tool_box(sample, "echo").check()
    await tools.get_by_label("Patterns (one per line)", exact=True).fill("!sample/whoami")
    await ui.shot("24-user-tools-dialog", full_page=False)
    await dialog.get_by_role("button", name="Save tools").click()
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#notice")).to_have_text(
        "grace@example.com may call: sample/echo, !sample/whoami."
    )
    summary = row.locator('td[data-label="Tools"] [title]')
    await expect(summary).to_contain_text("2 patterns")
    await expect(summary).to_have_attribute("title", "sample/echo\n!sample/whoami")
    assert await page.evaluate("document.activeElement.ariaLabel") == "Tools grace@example.com"
    refreshed = await ks.runtime.store.user(ks.actor.workspace_id, grace.id)
    assert refreshed is not None and refreshed.tools == ("sample/echo", "!sample/whoami")
    await until_listed(ks, grace_key, ["echo"])  # every key of hers, at once
    await ui.shot("25-users-tools")

    # Reopened: her tools as saved; then every tool again.
    await ui.button("Tools grace@example.com").click()
    await expect(tool_box(sample, "echo")).to_be_checked()
    await expect(tools.get_by_label("Patterns (one per line)", exact=True)).to_have_value(
        "!sample/whoami"
    )
    await tools.get_by_role("radio", name="All tools").check()
    await dialog.get_by_role("button", name="Save tools").click()
    await expect(row.locator('td[data-label="Tools"]')).to_have_text("All tools")
    refreshed = await ks.runtime.store.user(ks.actor.workspace_id, grace.id)
    assert refreshed is not None and refreshed.tools is None
    await until_listed(ks, grace_key, ["echo", "add", "whoami"])
    await page.set_viewport_size(NARROW)
    await ui.shot("26-users-tools-390")


# --- usage (SPEC §7): real traffic through the gateway, then the Usage view ---

USAGE_TOOLS = ("echo", "add", "whoami")


def tool_call(name: str, ident: int = 1) -> dict[str, Any]:
    arguments = {"echo": {"text": "hi"}, "add": {"a": 1, "b": 2}}.get(name, {})
    return {
        "jsonrpc": "2.0",
        "id": ident,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


@dataclass
class Traffic:
    """What `make_traffic` sent and recorded, by key name."""

    keys: dict[str, str]  # name -> key id
    users: dict[str, str]  # email -> user id
    admin_key: str
    member_key: str  # mel's "mel laptop", which may sign in (permission keys)


@pytest.fixture
async def with_sample(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    """Keystile in front of the echo upstream (github, gitlab, tokened, chat) and of the
    bundled sample MCP server ("sample": echo, add, whoami)."""
    runner, port = await start_sample_server(LOOPBACK)
    settings = make_settings(upstream)
    sample = UpstreamSettings(url=f"http://{LOOPBACK}:{port}{MCP_PATH}")
    settings = replace(settings, mcp_servers={**settings.mcp_servers, "sample": sample})
    try:
        async with start_keystile(settings, database_url) as ks:
            yield ks
    finally:
        await runner.cleanup()


@pytest.fixture
async def usage_ui(with_sample: Keystile, browser: Browser) -> AsyncIterator[Ui]:
    async with watched_tab(with_sample, browser) as tab:
        yield tab


async def sent(ks: Keystile, key: str, want: int, method: str, path: str, body: Any = None) -> None:
    """One data-plane request with this key, answered `want` (a tools/call that succeeds ran)."""
    status, _, answer = await ks.request(method, path, key, json=body, headers=MCP_ACCEPT)
    assert status == want, (path, answer)
    if want == 200 and isinstance(body, dict) and body.get("method") == "tools/call":
        assert "result" in answer, answer  # the sample server ran the tool


def utc_day(days_ago: int) -> date:
    return (datetime.now(UTC) - timedelta(days=days_ago)).date()


def backdated(ks: Keystile, issued: IssuedKey, days_ago: int, tool: str, status: int) -> None:
    """A call record of an earlier day, through the gateway's own recorder: the gateway only
    records requests as they happen, and the chart needs more than one day."""
    when = datetime.combine(utc_day(days_ago), time(12, 0), tzinfo=UTC)
    assert ks.runtime.calls is not None
    ks.runtime.calls.record(
        CallRecord(
            time=when.timestamp(),
            request_id=f"earlier-{days_ago}-{tool}-{status}",
            workspace_id=issued.record.workspace_id,
            user_id=issued.record.user_id,
            key_id=issued.record.id,
            route="mcp",
            server="sample",
            mcp_method="tools/call",
            tool=tool,
            status=status,
            duration_ms=12.5 if status < 400 else 250.0,
            bytes_in=90,
            bytes_out=120,
            client=LOOPBACK,
        )
    )


async def make_traffic(ks: Keystile) -> Traffic:
    """Today, through the gateway (sample server and echo upstream), by three keys of two users:

    - mel laptop (mel, servers sample): echo x4, add x2, tools/list, a 403 (github is not its
      server) and a 404 (add, on a path the sample server lacks): 9 requests, 2 errors
    - mel ci (mel): whoami x3, GET /api/me: 4 requests
    - ada agent (ada, admin): echo, add x7, a GET to gitlab, a 404 (echo): 10 requests, 1 error

    and earlier: mel ci whoami x40 three days ago (2 answered 500), ada agent echo x2 five days
    ago. In all 65 requests and 5 errors; tools add 10 (1 error), whoami 43 (2), echo 8 (1);
    keys mel ci 44 (2), ada agent 12 (1), mel laptop 9 (2).
    """
    ada = await ks.user(ADMIN_EMAIL, role="admin", servers=["*"])
    admin = await ks.key(ada, name="admin console", permissions=("admin", "keys", "mcp"))
    agent = await ks.key(ada, name="ada agent")
    mel = await ks.user("mel@example.com", servers=["sample", "github"])
    laptop = await ks.key(mel, name="mel laptop", servers=("sample",), permissions=("keys", "mcp"))
    ci = await ks.key(mel, name="mel ci")
    sample = "/mcp-connect/sample"
    for n in range(4):
        await sent(ks, laptop.key, 200, "POST", sample, tool_call("echo", n))
    for n in range(2):
        await sent(ks, laptop.key, 200, "POST", sample, tool_call("add", n))
    await sent(ks, laptop.key, 200, "POST", sample, TOOLS_LIST)
    await sent(ks, laptop.key, 403, "POST", "/mcp-connect/github/mcp", tool_call("search"))
    await sent(ks, laptop.key, 404, "POST", f"{sample}/nope", tool_call("add"))
    for n in range(3):
        await sent(ks, ci.key, 200, "POST", sample, tool_call("whoami", n))
    await sent(ks, ci.key, 200, "GET", "/api/me")
    await sent(ks, agent.key, 200, "POST", sample, tool_call("echo"))
    for n in range(7):
        await sent(ks, agent.key, 200, "POST", sample, tool_call("add", n))
    await sent(ks, agent.key, 200, "GET", "/mcp-connect/gitlab/projects")
    await sent(ks, agent.key, 404, "POST", f"{sample}/nope", tool_call("echo"))
    for n in range(40):
        backdated(ks, ci, 3, "whoami", 500 if n < 2 else 200)
    for _ in range(2):
        backdated(ks, agent, 5, "echo", 200)
    assert ks.runtime.calls is not None
    await ks.runtime.calls.flush()
    return Traffic(
        keys={k.record.name: k.record.id for k in (admin, agent, laptop, ci)},
        users={ADMIN_EMAIL: ada.id, "mel@example.com": mel.id},
        admin_key=admin.key,
        member_key=laptop.key,
    )


async def bars(page: Page) -> list[dict[str, Any]]:
    """The chart's groups as drawn: each bar's counts, rectangle heights and label."""
    result: list[dict[str, Any]] = await page.evaluate(
        """[...document.querySelectorAll('#usage-chart g.bar')].map((g) => {
            const ok = g.querySelector('rect.bar-ok'), bad = g.querySelector('rect.bar-error');
            const label = g.querySelector('text');
            return {
              bucket: g.dataset.bucket, requests: Number(g.dataset.requests),
              errors: Number(g.dataset.errors),
              ok: Number(ok.getAttribute('height')), bad: Number(bad.getAttribute('height')),
              okBottom: Number(ok.getAttribute('y')) + Number(ok.getAttribute('height')),
              badBottom: Number(bad.getAttribute('y')) + Number(bad.getAttribute('height')),
              title: g.querySelector('title').textContent,
              label: label ? label.textContent : null,
            };
        })"""
    )
    return result


def assert_proportional(drawn: list[dict[str, Any]]) -> None:
    """Each bar is as tall as its requests (OK below, errors on top), on one scale."""
    used = [b for b in drawn if b["requests"]]
    assert used, "no bar has requests"
    scale = (used[0]["ok"] + used[0]["bad"]) / used[0]["requests"]
    assert scale > 0
    for bar in drawn:
        assert bar["ok"] == pytest.approx((bar["requests"] - bar["errors"]) * scale), bar
        assert bar["bad"] == pytest.approx(bar["errors"] * scale), bar
        assert bar["okBottom"] == pytest.approx(drawn[0]["okBottom"]), "one baseline"
        assert bar["badBottom"] == pytest.approx(bar["okBottom"] - bar["ok"]), "errors on top"


async def table_rows(table: Locator) -> list[list[str]]:
    rows: list[list[str]] = await table.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"
    )
    return rows


def name_and_counts(rows: list[list[str]]) -> list[tuple[str, int, int]]:
    """(first line of the first cell, requests, errors) of each row."""
    return [(row[0].splitlines()[0], int(row[1]), int(row[2])) for row in rows]


async def totals(page: Page) -> dict[str, str]:
    found: dict[str, str] = await page.locator("#usage-totals").evaluate(
        "dl => Object.fromEntries([...dl.querySelectorAll('.stat')].map("
        "s => [s.querySelector('dt').textContent, s.querySelector('dd').textContent]))"
    )
    return found


async def open_usage(ui: Ui) -> None:
    await ui.page.get_by_role("tab", name="Usage").click()
    await expect(ui.page.locator("#usage-status")).to_have_text(re.compile("^Usage in"))


CSV_METRICS = ["requests", "errors", "p50_ms", "p95_ms", "bytes_in", "bytes_out"]


async def download_csv(ui: Ui) -> tuple[str, str]:
    """Click "Download CSV" and read the file the browser saved: its name and text."""
    async with ui.page.expect_download() as info:
        await ui.button("Download CSV").click()
    download = await info.value
    path = await download.path()
    return download.suggested_filename, await asyncio.to_thread(Path(path).read_text)


async def settled(page: Page) -> None:
    """The Usage view finished loading what was last asked for."""
    await expect(page.locator("#usage-panel")).not_to_have_attribute("aria-busy", "true")
    await expect(page.locator("#usage-status")).to_have_text(re.compile("^Usage in"))


async def api_usage(ks: Keystile, key: str, **params: str) -> dict[str, Any]:
    async with KeystileAdmin(ks.admin, key) as client:
        usage = await client.usage(
            from_=params.get("from"),
            group_by=params.get("group_by"),
            key_id=params.get("key_id"),
            user_id=params.get("user_id"),
            server=params.get("server"),
            tool=params.get("tool"),
        )
    return dict(usage)


def window_start(days: int) -> str:
    """The page's window: whole UTC days, today the last of them."""
    return f"{utc_day(days - 1).isoformat()}T00:00:00Z"


async def test_usage_view_draws_real_traffic(usage_ui: Ui) -> None:
    ui = usage_ui
    page, ks = ui.page, ui.ks
    traffic = await make_traffic(ks)
    await ui.open()
    await ui.sign_in(traffic.admin_key)
    await expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()

    # By keyboard: the arrow keys walk the tabs to Usage.
    await page.get_by_role("tab", name="API keys").focus()
    await page.keyboard.press("ArrowRight")
    await page.keyboard.press("ArrowRight")
    await expect(page.get_by_role("tab", name="Usage")).to_have_attribute("aria-selected", "true")
    await expect(page.get_by_role("tab", name="Usage")).to_be_focused()
    await settled(page)
    await expect(usage_filter(page, "Window")).to_have_value("7d")
    await ui.shot("27-usage", full_page=False)
    everything = await api_usage(ks, traffic.admin_key, **{"from": window_start(7)})
    [row] = everything["rows"]
    assert (row["requests"], row["errors"]) == (65, 5)
    shown = await totals(page)
    assert (shown["Requests"], shown["Errors"]) == ("65", "5 (7.7%)")
    for label, metric in [("Median duration", "p50_ms"), ("95th percentile", "p95_ms")]:
        assert float(shown[label].removesuffix(" ms")) == pytest.approx(row[metric], abs=0.051)

    # The chart: one group per UTC day of the window, as tall as its requests.
    chart = page.locator("#usage-chart")
    await expect(chart).to_have_attribute("role", "img")
    await expect(page.locator("#usage-chart-name")).to_have_text(
        "Requests per day, the last 7 days"
    )
    await expect(page.locator("#usage-chart-desc")).to_contain_text("65 requests")
    await expect(page.locator("#usage-chart-desc")).to_contain_text("5 errors")
    drawn = await bars(page)
    days = [utc_day(n).isoformat() for n in range(6, -1, -1)]
    assert [b["bucket"] for b in drawn] == days
    per_day = await api_usage(ks, traffic.admin_key, group_by="day", **{"from": window_start(7)})
    answered = {r["day"]: (r["requests"], r["errors"]) for r in per_day["rows"]}
    assert {b["bucket"]: (b["requests"], b["errors"]) for b in drawn if b["requests"]} == answered
    by_day = {b["bucket"]: b for b in drawn}
    assert (by_day[days[3]]["requests"], by_day[days[3]]["errors"]) == (40, 2)  # 3 days ago
    assert (by_day[days[1]]["requests"], by_day[days[1]]["errors"]) == (2, 0)  # 5 days ago
    assert sum(b["requests"] for b in drawn) == 65
    assert_proportional(drawn)
    assert by_day[days[3]]["ok"] + by_day[days[3]]["bad"] == pytest.approx(
        20 * (by_day[days[1]]["ok"] + by_day[days[1]]["bad"])
    )
    assert by_day[days[3]]["title"].endswith(": 40 requests, 2 errors")
    assert drawn[-1]["label"] is not None, "today is labelled"
    # ...and the same numbers as a table, for screen readers and keyboards.
    table = page.locator("#usage-series-table")
    await page.get_by_text("Requests per day as a table").click()
    await expect(table).to_be_visible()
    series = await table_rows(table)
    assert [[int(n) for n in r[1:]] for r in series] == [
        [b["requests"], b["requests"] - b["errors"], b["errors"]] for b in drawn
    ]

    # Top tools and top keys, busiest first, with the API's percentiles.
    tools = await table_rows(page.locator("#usage-tools-table"))
    assert name_and_counts(tools) == [("whoami", 43, 2), ("add", 10, 1), ("echo", 8, 1)]
    assert all(r[0].splitlines()[1] == "sample" for r in tools)
    keys = await table_rows(page.locator("#usage-keys-table"))
    assert name_and_counts(keys) == [("mel ci", 44, 2), ("ada agent", 12, 1), ("mel laptop", 9, 2)]
    assert keys[0][0].splitlines()[1] == "mel@example.com"
    per_key = await api_usage(ks, traffic.admin_key, group_by="key", **{"from": window_start(7)})
    percentiles = {r["key_id"]: (r["p50_ms"], r["p95_ms"]) for r in per_key["rows"]}
    p50, p95 = percentiles[traffic.keys["mel ci"]]
    assert float(keys[0][3]) == pytest.approx(p50, abs=0.051)
    assert float(keys[0][4]) == pytest.approx(p95, abs=0.051)

    # Recent calls: 50, then the rest with "Load more".
    calls = page.locator("#usage-calls-table tbody tr")
    await expect(calls).to_have_count(50)
    await ui.button("Load more").click()
    await expect(calls).to_have_count(65)
    await expect(ui.button("Load more")).to_be_hidden()
    column = page.locator("#usage-calls-table tbody td")
    statuses = await column.and_(page.locator('[data-label="Status"]')).all_text_contents()
    assert sorted(s for s in statuses if int(s) >= 400) == ["403", "404", "404", "500", "500"]
    called = await column.and_(page.locator('[data-label="Tool"]')).all_text_contents()
    assert {t: called.count(t) for t in USAGE_TOOLS} == {"echo": 8, "add": 10, "whoami": 43}

    await page.get_by_role("heading", name="Recent calls").scroll_into_view_if_needed()
    await ui.shot("28-usage-calls", full_page=False)

    # The CSV: the chart's rows, fetched with the key and saved from a Blob.
    name, text = await download_csv(ui)
    assert name == f"keystile-usage-{days[0]}-per-day.csv"
    await expect(page.locator("#notice")).to_have_text(f"Downloaded {name}.")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["day", *CSV_METRICS]
    assert {r["day"]: (int(r["requests"]), int(r["errors"])) for r in rows} == answered
    assert traffic.admin_key not in text

    # At phone width: no sideways scrolling, the chart redrawn to the width, text still 12 px.
    await page.set_viewport_size(NARROW)
    await expect(chart).to_have_attribute("viewBox", re.compile(r"^0 0 3\d\d "))
    width = await page.evaluate("document.getElementById('usage-chart-box').clientWidth")
    assert (await chart.get_attribute("viewBox") or "").split()[2] == str(width)
    box = await chart.bounding_box()
    assert box is not None and box["width"] == pytest.approx(width, abs=1)
    font = await page.evaluate(
        "getComputedStyle(document.querySelector('#usage-chart text.label')).fontSize"
    )
    assert font == "12px"
    assert_proportional(await bars(page))
    await page.evaluate("window.scrollTo(0, 0)")
    await ui.shot("29-usage-390", full_page=False)
    await page.get_by_role("heading", name="Requests per day").scroll_into_view_if_needed()
    await ui.shot("30-usage-390-chart", full_page=False)
    await page.get_by_role("heading", name="Top tools").scroll_into_view_if_needed()
    await ui.shot("31-usage-390-tops", full_page=False)
    await page.get_by_role("heading", name="Recent calls").scroll_into_view_if_needed()
    await ui.shot("32-usage-390-calls", full_page=False)
    overflowing = await page.evaluate(
        "[...document.querySelectorAll('#usage-panel *')].filter("
        "e => e.getBoundingClientRect().right > window.innerWidth + 0.5).map("
        "e => e.tagName + '#' + e.id + '.' + e.className.baseVal ?? e.className)"
    )
    assert overflowing == [], "no sideways scrolling at 390 px"


async def test_usage_filters_and_the_keys_tables_usage_links(usage_ui: Ui) -> None:
    ui = usage_ui
    page, ks = ui.page, ui.ks
    traffic = await make_traffic(ks)
    await ui.open()
    await ui.sign_in(traffic.admin_key)

    # A key's row links to its usage: the Usage view, filtered to that key.
    link = ui.row("mel laptop").get_by_role("link", name="Usage of mel laptop")
    await link.focus()
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("tab", name="Usage")).to_have_attribute("aria-selected", "true")
    await settled(page)
    await expect(page.locator("#usage-title")).to_be_focused()
    await expect(usage_filter(page, "Key")).to_have_value(traffic.keys["mel laptop"])
    assert (await totals(page))["Requests"] == "9"
    assert (await totals(page))["Errors"].startswith("2 ")
    tools = name_and_counts(await table_rows(page.locator("#usage-tools-table")))
    assert tools == [("echo", 4, 0), ("add", 3, 1)]
    keys = name_and_counts(await table_rows(page.locator("#usage-keys-table")))
    assert keys == [("mel laptop", 9, 2)]
    drawn = await bars(page)
    assert sum(b["requests"] for b in drawn) == 9
    assert_proportional(drawn)
    await expect(page.locator("#usage-calls-table tbody tr")).to_have_count(9)
    assert "?" not in page.url and "#" not in page.url, "the link changes no address"
    await ui.shot("33-usage-one-key", full_page=False)

    # Filters: a user, then a tool of hers, then a server.
    await usage_filter(page, "Key").select_option("")
    await usage_filter(page, "User").select_option(traffic.users["mel@example.com"])
    await settled(page)
    assert (await totals(page))["Requests"] == "53"
    keys = name_and_counts(await table_rows(page.locator("#usage-keys-table")))
    assert keys == [("mel ci", 44, 2), ("mel laptop", 9, 2)]
    # The key filter now lists only her keys.
    options = await usage_filter(page, "Key").locator("option").all_text_contents()
    assert options == ["All keys", "mel ci · mel@example.com", "mel laptop · mel@example.com"]
    await usage_filter(page, "Tool").select_option("whoami")
    await settled(page)
    assert (await totals(page))["Requests"] == "43"
    assert name_and_counts(await table_rows(page.locator("#usage-tools-table"))) == [
        ("whoami", 43, 2)
    ]
    await usage_filter(page, "Tool").select_option("")
    await usage_filter(page, "User").select_option("")
    await usage_filter(page, "Server").select_option("gitlab")
    await settled(page)
    assert (await totals(page))["Requests"] == "1"
    assert name_and_counts(await table_rows(page.locator("#usage-keys-table"))) == [
        ("ada agent", 1, 0)
    ]
    await expect(page.locator("#usage-tools-none")).to_be_visible()  # a GET calls no tool

    # A filter that matches nothing explains itself.
    await usage_filter(page, "Tool").select_option("echo")
    await settled(page)
    await expect(page.locator("#usage-empty")).to_contain_text(
        "No usage matches these filters in the last 7 days."
    )
    await expect(page.locator("#usage-content")).to_be_hidden()

    # The last 24 hours: one group per hour, today's traffic only; the last 30 days: 30 days.
    await usage_filter(page, "Tool").select_option("")
    await usage_filter(page, "Server").select_option("")
    await usage_filter(page, "Window").select_option("24h")
    await settled(page)
    await expect(page.locator("#usage-chart-title")).to_have_text("Requests per hour")
    drawn = await bars(page)
    assert len(drawn) == 24
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    assert drawn[-1]["bucket"] == hour.strftime("%Y-%m-%dT%H:00:00Z")
    assert sum(b["requests"] for b in drawn) == 23
    assert_proportional(drawn)
    assert (await totals(page))["Requests"] == "23"
    await usage_filter(page, "Window").select_option("30d")
    await settled(page)
    drawn = await bars(page)
    assert [b["bucket"] for b in drawn] == [utc_day(n).isoformat() for n in range(29, -1, -1)]
    assert sum(b["requests"] for b in drawn) == 65
    labels = [b["label"] for b in drawn if b["label"]]
    assert 3 <= len(labels) < 30, "labels thinned out so they do not overlap"


async def test_a_member_sees_only_her_own_usage(usage_ui: Ui) -> None:
    ui = usage_ui
    page, ks = ui.page, ui.ks
    traffic = await make_traffic(ks)
    await ui.open()
    await ui.sign_in(traffic.member_key)
    await expect(page.get_by_role("heading", name="Your API keys")).to_be_visible()
    await expect(page.get_by_role("tab", name="Users")).to_be_hidden()

    # The arrow keys skip the hidden Users tab.
    await page.get_by_role("tab", name="API keys").focus()
    await page.keyboard.press("ArrowRight")
    await expect(page.get_by_role("tab", name="Usage")).to_be_focused()
    await settled(page)
    await expect(page.locator("#usage-lead")).to_contain_text("your keys")
    await expect(usage_filter(page, "User")).to_be_hidden()
    options = await usage_filter(page, "Key").locator("option").all_text_contents()
    assert options == ["All keys", "mel ci", "mel laptop"]
    assert (await totals(page))["Requests"] == "53"
    keys = name_and_counts(await table_rows(page.locator("#usage-keys-table")))
    assert keys == [("mel ci", 44, 2), ("mel laptop", 9, 2)]
    tools = name_and_counts(await table_rows(page.locator("#usage-tools-table")))
    assert tools == [("whoami", 43, 2), ("echo", 4, 0), ("add", 3, 1)]
    drawn = await bars(page)
    assert sum(b["requests"] for b in drawn) == 53
    assert_proportional(drawn)
    # "Load more" by keyboard: the last page in, focus moves to its first call.
    await ui.button("Load more").focus()
    await page.keyboard.press("Enter")
    calls = page.locator("#usage-calls-table tbody tr")
    await expect(calls).to_have_count(53)
    await expect(ui.button("Load more")).to_be_hidden()
    await expect(calls.nth(50).locator("time")).to_be_focused()
    shown_keys = await page.locator('#usage-calls-table td[data-label="Key"]').all_text_contents()
    assert set(shown_keys) == {"mel ci", "mel laptop"}
    await page.evaluate("window.scrollTo(0, 0)")
    await ui.shot("34-usage-member", full_page=False)

    # Her key's link; and her CSV holds her numbers only.
    await page.get_by_role("tab", name="API keys").click()
    await ui.row("mel ci").get_by_role("link", name="Usage of mel ci").click()
    await settled(page)
    await expect(usage_filter(page, "Key")).to_have_value(traffic.keys["mel ci"])
    assert (await totals(page))["Requests"] == "44"
    _, text = await download_csv(ui)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert sum(int(r["requests"]) for r in rows) == 44
    assert {r["day"]: int(r["errors"]) for r in rows if int(r["errors"])} == {
        utc_day(3).isoformat(): 2
    }


async def test_usage_empty_then_an_api_error(database_url: str, browser: Browser) -> None:
    """No usage yet: the empty state. Then the database out of reach (through a proxy that is
    cut): the API's own message where the page shows errors, and the view back once it is."""
    proxy = FaultyProxy(urlsplit(database_url).port or 5432)
    await proxy.start()
    try:
        async with (
            start_keystile(make_settings(), proxy.url_for(database_url)) as ks,
            watched_tab(ks, browser) as ui,
        ):
            page = ui.page
            _, key = await signed_in_as_admin(ui)
            await open_usage(ui)
            await settled(page)
            await expect(page.locator("#usage-empty-title")).to_have_text(
                "No usage in the last 7 days yet."
            )
            await expect(page.locator("#usage-empty")).to_contain_text("a few seconds after")
            await expect(page.locator("#usage-content")).to_be_hidden()
            await expect(page.locator("#usage-calls")).to_be_hidden()
            await ui.shot("35-usage-empty")

            await proxy.cut()
            async with KeystileAdmin(ks.admin, key) as client:
                with pytest.raises(KeystileError) as outage:
                    await client.usage(group_by="day")
            assert outage.value.status == 503
            await usage_filter(page, "Window").select_option("30d")
            await expect(page.locator("#page-error")).to_have_text(outage.value.message)
            await expect(page.locator("#usage-panel")).not_to_have_attribute("aria-busy", "true")
            await expect(page.locator("#usage-empty")).to_be_hidden()
            await ui.shot("36-usage-error")

            await proxy.restore()
            await usage_filter(page, "Window").select_option("24h")
            await settled(page)
            await expect(page.locator("#page-error")).to_be_empty()
            await expect(page.locator("#usage-empty-title")).to_have_text(
                "No usage in the last 24 hours yet."
            )
    finally:
        await proxy.cut()
