"""The official MCP SDK's OAuth client through Keystile, with a person on the consent page.

Keystile (`gateway.public_url` = its own data-plane address) sits in front of two SDK servers
on loopback. The SDK's `OAuthClientProvider` meets Keystile's 401, discovers the documents,
registers, and hands the authorization URL to its redirect handler; here that handler is
Debian's headless Chromium (Playwright, launched by tests/browser.py),
which pastes a key into "API key", picks tools and clicks Allow (or Deny). The consent page
then sends the browser to the client's loopback redirect URI, a tiny HTTP listener of this
test, whose query the SDK's callback handler returns. The SDK exchanges the code and calls
tools; then refresh, revocation, and a token carried to another server.

Screenshots of the consent page (1280 and 390 px wide) go to tests/artifacts/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qs, urlsplit

import httpx2
import pytest
from aiohttp import web
from mcp import ClientSession
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, TextContent
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    ViewportSize,
    expect,
)

from gateway.app import bound_port
from gateway.config import UpstreamSettings
from gateway.keyring import IssuedKey
from tests.browser import ARTIFACTS, NARROW, WIDE, chromium_browser  # noqa: F401  (the browser fixture)
from tests.mcp_servers import LOOPBACK, RunningServer, catalog_app, serve, streamable_app
from tests.oauth_flow import Approved, Flow, oauth_settings, pkce, start_oauth_keystile
from tests.support import admin_call

CLIENT_NAME = "SDK test client"


class ConsentRefused(Exception):
    """The redirect came back with an error instead of a code."""

    def __init__(self, answer: dict[str, str]) -> None:
        super().__init__(answer.get("error", "no code"))
        self.answer = answer


# --- the client side: storage, loopback listener, the person in Chromium --------------------


class MemoryStorage:
    """The SDK's TokenStorage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class Callback:
    """The client's loopback redirect URI: an HTTP listener that hands each query over."""

    runner: web.AppRunner
    port: int
    answers: asyncio.Queue[dict[str, str]] = field(default_factory=asyncio.Queue)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/callback"

    async def result(self) -> AuthorizationCodeResult:
        """The SDK's callback handler: the code and state the browser brought back."""
        answer = await self.answers.get()
        if "code" not in answer:
            raise ConsentRefused(answer)
        return AuthorizationCodeResult(
            code=answer["code"], state=answer.get("state"), iss=answer.get("iss")
        )


@asynccontextmanager
async def callback_listener() -> AsyncIterator[Callback]:
    answers: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    async def arrived(request: web.Request) -> web.Response:
        await answers.put({k: v for k, v in request.query.items()})
        return web.Response(text="You may close this window.", content_type="text/html")

    app = web.Application()
    app.router.add_get("/callback", arrived)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOOPBACK, 0).start()
    try:
        yield Callback(runner, bound_port(runner), answers)
    finally:
        await runner.cleanup()


@dataclass
class Person:
    """Someone at the consent page in Chromium, deciding as told; also the watchdog of what
    the page must never do (script errors, CSP violations, requests off the data plane)."""

    browser: Browser
    gateway: str
    callback: Callback
    key: str
    decision: str = "allow"
    tools: list[str] | None = None  # None: every tool the key allows
    viewport: ViewportSize = field(default_factory=lambda: dict(WIDE))  # type: ignore[assignment]
    shots: str = ""  # a screenshot name prefix; "" takes none
    problems: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)  # the authorization URLs it was sent to

    async def __call__(self, authorization_url: str) -> None:
        """The SDK's redirect handler."""
        self.urls.append(authorization_url)
        context = await self.browser.new_context(viewport=self.viewport)
        context.set_default_timeout(15_000)
        page = await context.new_page()
        self._watch(page)
        try:
            await page.goto(authorization_url)
            await expect(page.get_by_role("heading", level=1)).to_contain_text(CLIENT_NAME)
            await self.shot(page, "1-sign-in")
            if self.decision == "deny":
                await page.get_by_role("button", name="Deny").first.click()
            else:
                await self._allow(page)
            await page.wait_for_url(self.callback.url + "?*")
            assert await context.cookies() == [], "the consent page never sets cookies"
        finally:
            await context.close()

    async def _allow(self, page: Page) -> None:
        await page.get_by_label("API key", exact=True).fill(self.key)
        await page.get_by_role("button", name="Continue").click()
        await expect(page.locator("#decide")).to_be_visible()
        if self.tools is not None:
            await page.get_by_label("Only the tools I choose").check()
            for tool in self.tools:
                await page.get_by_label(tool, exact=True).check()
        await self.shot(page, "2-tools")
        await page.get_by_role("button", name="Allow").click()

    async def shot(self, page: Page, name: str) -> None:
        if self.shots:
            ARTIFACTS.mkdir(exist_ok=True)
            path = ARTIFACTS / f"oauth-consent-{self.shots}-{name}.png"
            await page.screenshot(path=path, full_page=True)

    def _watch(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            # Chromium logs every 4xx fetch as "Failed to load resource": a refused key is one.
            if message.type == "error" and "Failed to load resource" not in message.text:
                self.problems.append(f"console: {message.text}")

        def on_request(request: Request) -> None:
            url = request.url
            # The one request off the data plane is the client's own redirect, as OAuth has it.
            if not url.startswith(self.gateway + "/") and not url.startswith(self.callback.url):
                self.problems.append(f"request off the data plane: {url}")
            if self.key in url or "ks1-" in url:
                self.problems.append(f"a key in a URL: {url}")

        page.on("console", on_console)
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        page.on("request", on_request)


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Stack:
    flow: Flow
    sdk: RunningServer
    catalog: RunningServer
    callback: Callback
    person_key: IssuedKey

    @property
    def gateway(self) -> str:
        return self.flow.ks.gateway

    def url(self, server: str) -> str:
        return f"{self.gateway}/mcp-connect/{server}"

    def provider(self, person: Person, storage: MemoryStorage) -> OAuthClientProvider:
        metadata = OAuthClientMetadata(
            client_name=CLIENT_NAME,
            redirect_uris=[self.callback.url],  # type: ignore[list-item]
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
        )
        return OAuthClientProvider(
            server_url=self.url("sdk"),
            client_metadata=metadata,
            storage=storage,
            redirect_handler=person,
            callback_handler=self.callback.result,
        )


@pytest.fixture
async def stack(database_url: str) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exits:
        sdk, catalog = await exits.enter_async_context(serve(streamable_app(), catalog_app()))
        callback = await exits.enter_async_context(callback_listener())
        settings = replace(
            oauth_settings(gateway={"shutdown_timeout": 1.0}),
            mcp_servers={
                "sdk": UpstreamSettings(url=f"{sdk.origin}/mcp"),
                "catalog": UpstreamSettings(url=f"{catalog.origin}/mcp"),
            },
        )
        flow = await exits.enter_async_context(start_oauth_keystile(settings, database_url))
        ks = flow.ks
        person = await ks.user("person@example.com", servers=["*"])
        key = await ks.runtime.keyring.create_key(
            ks.actor, user_id=person.id, name="laptop", permissions=("keys", "mcp")
        )
        yield Stack(flow, sdk, catalog, callback, key)


@asynccontextmanager
async def sdk_session(stack: Stack, provider: OAuthClientProvider) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(30.0)) as http,
        streamable_http_client(stack.url("sdk"), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def text(result: CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


async def raw_status(stack: Stack, server: str, access: str) -> tuple[int, str]:
    """A plain GET on an MCP route with the token: the status and WWW-Authenticate."""
    headers = {"Authorization": f"Bearer {access}"}
    async with stack.flow.ks.http.get(stack.url(server) + "/", headers=headers) as resp:
        return resp.status, resp.headers.get("WWW-Authenticate", "")


# --- tests ----------------------------------------------------------------------------------


async def test_the_sdk_connects_through_consent_refreshes_and_is_revoked(
    stack: Stack, browser: Browser
) -> None:
    storage = MemoryStorage()
    person = Person(
        browser,
        stack.gateway,
        stack.callback,
        stack.person_key.key,
        tools=["echo", "add"],
        shots="1280",
    )
    provider = stack.provider(person, storage)
    async with sdk_session(stack, provider) as session:
        assert {t.name for t in (await session.list_tools()).tools} == {"echo", "add"}
        assert text(await session.call_tool("echo", {"text": "via oauth"})) == "via oauth"
        with pytest.raises(MCPError) as denied:
            await session.call_tool("whoami", {})
        assert denied.value.error.code == -32602  # the grant's tools: echo and add only
    assert person.problems == []
    assert len(person.urls) == 1  # one consent
    client = storage.client_info
    tokens = storage.tokens
    assert client is not None and tokens is not None and tokens.refresh_token is not None
    assert client.token_endpoint_auth_method == "none" and client.client_secret is None
    grant_id = tokens.access_token.split("-")[2]

    # The grant is one of the person's keys, named after the client.
    listed = await admin_call(stack.flow.ks, "GET", "/api/keys", stack.person_key.key)
    [grant] = [k for k in listed.body if k["kind"] == "oauth"]
    assert (grant["id"], grant["name"]) == (grant_id, CLIENT_NAME)
    assert grant["tools"] == ["sdk/echo", "sdk/add"] and grant["servers"] == ["sdk"]
    seen = [e.header("x-keystile-key-id") for e in stack.sdk.exchanges]
    assert grant_id in seen and stack.person_key.record.id not in seen

    # Refresh: the access token is made to look expired to the SDK, which refreshes it.
    provider.context.token_expiry_time = time.time() - 1
    async with sdk_session(stack, provider) as session:
        assert text(await session.call_tool("add", {"a": 1, "b": 2})) == "3.0"
    refreshed = storage.tokens
    assert refreshed is not None and refreshed.refresh_token is not None
    assert refreshed.access_token != tokens.access_token
    assert refreshed.refresh_token != tokens.refresh_token  # rotated
    assert refreshed.access_token.split("-")[2] == grant_id  # the same grant
    assert len(person.urls) == 1  # no second consent

    # The token on another server: 401, never 403 (which would send the SDK to consent).
    status, challenge = await raw_status(stack, "catalog", refreshed.access_token)
    assert status == 401 and 'resource_metadata="' in challenge
    # On its own server the gateway lets it through (the SDK server answers a bare GET 400).
    assert (await raw_status(stack, "sdk", refreshed.access_token))[0] not in (401, 403)

    # Revocation (RFC 7009): the next call is refused.
    revoked = await stack.flow.call(
        "POST",
        "/oauth/revoke",
        form={"token": refreshed.refresh_token, "client_id": client.client_id},
    )
    assert revoked.status == 200
    status, challenge = await raw_status(stack, "sdk", refreshed.access_token)
    assert status == 401
    assert challenge.endswith(
        f'resource_metadata="{stack.flow.public_url}/.well-known/oauth-protected-resource/mcp-connect/sdk"'
    )


async def test_a_revoked_grant_sends_the_sdk_back_to_consent_and_deny_refuses(
    stack: Stack, browser: Browser
) -> None:
    storage = MemoryStorage()
    person = Person(browser, stack.gateway, stack.callback, stack.person_key.key)
    provider = stack.provider(person, storage)
    async with sdk_session(stack, provider) as session:
        assert len((await session.list_tools()).tools) == 6  # every tool the key allows
    assert storage.tokens is not None
    grant_id = storage.tokens.access_token.split("-")[2]
    deleted = await admin_call(
        stack.flow.ks, "DELETE", f"/api/keys/{grant_id}", stack.person_key.key
    )
    assert deleted.status == 204

    # The SDK's next request gets 401 and goes through consent again; this time: Deny.
    person.decision = "deny"
    # The SDK may wrap what the callback handler raised: the refusal is looked for inside.
    with pytest.raises(Exception) as refused:
        async with sdk_session(stack, provider):
            pass
    answer = _refusal(refused.value)
    assert answer["error"] == "access_denied"
    sent_state = parse_qs(urlsplit(person.urls[-1]).query)["state"][0]
    assert answer["state"] == sent_state  # the client's state came back with the refusal
    assert answer["iss"] == stack.flow.public_url
    assert len(person.urls) == 2 and person.problems == []


def _refusal(error: BaseException) -> dict[str, str]:
    """The ConsentRefused somewhere inside what the SDK raised (it may wrap it in groups)."""
    if isinstance(error, ConsentRefused):
        return error.answer
    inner: list[BaseException] = list(getattr(error, "exceptions", ()))
    if error.__cause__ is not None:
        inner.append(error.__cause__)
    if error.__context__ is not None:
        inner.append(error.__context__)
    for candidate in inner:
        try:
            return _refusal(candidate)
        except AssertionError:
            continue
    raise AssertionError(f"no ConsentRefused in {error!r}")


async def test_the_consent_page_by_keyboard_at_phone_width(stack: Stack, browser: Browser) -> None:
    flow = stack.flow
    client_id = await flow.client(stack.callback.url, CLIENT_NAME)
    verifier, challenge = pkce()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": stack.callback.url,
        "state": "phone-state",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "resource": flow.resource("sdk"),
    }
    url = str(httpx2.URL(f"{stack.gateway}/oauth/authorize", params=params))
    person = Person(browser, stack.gateway, stack.callback, stack.person_key.key)
    context = await browser.new_context(viewport=NARROW)
    context.set_default_timeout(15_000)
    page = await context.new_page()
    person._watch(page)
    try:
        await page.goto(url)
        await expect(page.locator("#redirect-host")).to_have_text(
            f"127.0.0.1:{stack.callback.port}"
        )
        await expect(page.locator("#server")).to_have_text("sdk")
        await _no_horizontal_scroll(page)
        await _shot(page, "390-1-sign-in")
        # A wrong key first: the page says why, and stays usable.
        await _tab_to(page, "api-key")
        await page.keyboard.type("ks1-wrong")
        await page.keyboard.press("Enter")
        await expect(page.locator("#error")).to_contain_text("API key")
        await _shot(page, "390-2-bad-key")
        await page.locator("#api-key").fill("")
        await _tab_to(page, "api-key")
        await page.keyboard.type(stack.person_key.key)
        await page.keyboard.press("Enter")
        await expect(page.locator("#decide")).to_be_visible()
        await expect(page.locator("#signed-in")).to_have_text("Approving as person@example.com.")
        # Only the tools I choose: the radio by arrow key, then one tool by Space.
        await _tab_to(page, "scope-all")
        await page.keyboard.press("ArrowDown")
        await expect(page.locator("#tool-list")).to_be_visible()
        await _tab_to(page, "tool-echo")
        await page.keyboard.press("Space")
        await expect(page.locator("#tool-echo")).to_be_checked()
        await _no_horizontal_scroll(page)
        await _shot(page, "390-3-tools")
        await _tab_to(page, "allow")
        await page.keyboard.press("Enter")
        await page.wait_for_url(stack.callback.url + "?*")
    finally:
        await context.close()
    answer = await stack.callback.answers.get()
    assert answer["state"] == "phone-state" and answer["code"]
    assert person.problems == []
    # The code the keyboard obtained is a good one, for that tool only.
    approved = Approved(answer["code"], verifier, client_id, stack.callback.url, "phone-state")
    reply = await flow.exchange(approved)
    assert reply.status == 200, reply.text
    grant = await admin_call(
        flow.ks,
        "GET",
        f"/api/keys/{reply.body['access_token'].split('-')[2]}",
        stack.person_key.key,
    )
    assert grant.body["tools"] == ["sdk/echo"]


async def _tab_to(page: Page, element_id: str) -> None:
    """Tab (only the keyboard) until the element has focus."""
    for _ in range(40):
        if await page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} is not reachable by Tab")


async def _no_horizontal_scroll(page: Page) -> None:
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"


async def _shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / f"oauth-consent-{name}.png", full_page=True)
