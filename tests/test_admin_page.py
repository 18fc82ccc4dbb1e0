"""The admin web page at GET /admin/api-keys, driven in Debian's headless Chromium.

Each test gets a fresh Keystile (the `keystile` fixture) and its own Chromium, launched in the
test's event loop with Playwright's async API: the page and the server share that loop, and a
launch costs about half a second. Screenshots of the main states go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from gateway.config import UpstreamSettings
from gateway.keyring import IssuedKey
from gateway.models import User
from gateway.sample_mcp import MCP_PATH, start_sample_server
from tests.support import (
    LOOPBACK,
    Keystile,
    admin_call,
    make_settings,
    start_keystile,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium); these tests never download one",
        allow_module_level=True,
    )
pytest.importorskip("playwright.async_api", reason="playwright for Python is not installed")

from playwright.async_api import (  # noqa: E402  (only once Chromium is known to be there)
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Request,
    ViewportSize,
    async_playwright,
    expect,
)

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDE: ViewportSize = {"width": 1280, "height": 860}
NARROW: ViewportSize = {"width": 390, "height": 844}
STORAGE_KEY = "keystile.apiKey"
ADMIN_EMAIL = "ada@example.com"


# --- fixtures and helpers ---


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


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
    async with ks.http.get(ks.admin + "/api/keys", headers={"Authorization": "Bearer x"}) as r:
        api_message = (await r.json())["message"]
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
    reply = await admin_call(ks, "GET", "/api/keys?all=true", admin)
    record = next(k for k in reply.body if k["name"] == "agent")
    assert sorted(record["tools"]) == ["offline/search", "sample/add", "sample/echo"]

    # The table: a count, with the names on hover.
    row = ui.row("agent")
    summary = ui.cell(row, "Tools").locator("[title]")
    await expect(summary).to_contain_text("3 tools")
    await summary.hover()
    await expect(summary).to_have_attribute("title", "\n".join(record["tools"]))
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
    reply = await admin_call(ks, "GET", f"/api/keys/{record['id']}", admin)
    assert reply.body["tools"] is None
    await until_listed(ks, key, ["echo", "add", "whoami"])


async def test_edit_a_keys_tools_and_see_the_apis_422(tools_ui: Ui) -> None:
    ui = tools_ui
    page, ks = ui.page, ui.ks
    _, admin = await signed_in_as_admin(ui)
    current = ["sample/echo", "offline/search", "sample/whoami", "sample/a*"]
    made = await admin_call(
        ks, "POST", "/api/keys", admin, {"name": "bot", "servers": ["*"], "tools": current}
    )
    assert made.status == 201, made.text
    key_id, key = made.body["id"], made.body["key"]
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
    expected = await admin_call(ks, "PATCH", f"/api/keys/{key_id}", admin, {"tools": ["x y"]})
    assert expected.status == 422 and expected.body["field"] == "tools"
    await patterns.fill("offline/search\nx y")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(page.locator("#key-error")).to_have_text(expected.body["message"])
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
