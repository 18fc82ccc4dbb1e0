"""The authorization endpoint: GET /oauth/authorize shows the consent page, POST decides.

Decisions (SPEC §9, RFC 6749 §4.1, RFC 9700):
- Until the client and its redirect URI are known good, a problem is shown as an HTML error
  page and never redirected: an unknown client, or a redirect URI it did not register (exact
  match; a loopback URI's port may differ), must not turn Keystile into an open redirector.
- Past that point, a bad request goes back to the client: `error=` with its `state`
  (`unsupported_response_type`, `invalid_request` for PKCE, `invalid_target` for `resource`).
- PKCE with S256 only (`plain`, or no method, is refused), and `resource` (RFC 8707) is
  required: the URL of one server, `<public_url>/mcp-connect/{server}` or a path under it.
  Whether the approving key may reach that server is known only once a key is pasted; an
  unknown server name is refused then exactly as an unreachable one, so names do not leak.
- The page carries a random token bound to a server-side pending request (CSRF): the decision
  reads the client, redirect URI and state from that row, never from the form, and one
  decision ends the request. The script posts JSON (a cross-site form cannot), with the key in
  the body; the answer is the URL to follow, carrying only the code (or the error) and state.
"""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from gateway.config import OAuthSettings
from gateway.errors import ApiError
from gateway.keys import token_hash
from gateway.oauth import registration
from gateway.oauth.approval import Approvals, grant_tools, tools_json
from gateway.oauth.errors import NO_STORE, OAuthError, json_answer
from gateway.oauth.metadata import server_of
from gateway.oauth.page import Pages
from gateway.oauth.store import Client, OAuthStore, PendingRequest
from gateway.oauth.wire import params

# RFC 7636 §4.1: 43-128 unreserved characters (an S256 challenge is 43).
CODE_CHALLENGE = re.compile(r"[A-Za-z0-9._~-]{43,128}")
MAX_STATE = 1024
MAX_CLIENT_ID = 64
MAX_REQUEST_TOKEN = 100


class Refusal(Exception):
    """A bad authorization request that goes back to the client (RFC 6749 §4.1.2.1)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def request_expired() -> ApiError:
    return ApiError(
        400,
        "request_expired",
        "This authorization request has expired or was already decided; "
        "start again from the application.",
    )


class Authorizer:
    def __init__(
        self,
        *,
        public_url: str,
        settings: OAuthSettings,
        store: OAuthStore,
        pages: Pages,
        approvals: Approvals,
        configured: frozenset[str],
    ) -> None:
        self._public_url = public_url
        self._settings = settings
        self._store = store
        self._pages = pages
        self._approvals = approvals
        self._configured = configured

    # --- GET: the consent page ---

    async def show(self, query: str) -> web.Response:
        try:
            given = params(query)
        except OAuthError as exc:
            return self._error_page(exc.description)
        client = await self._client(given.get("client_id"))
        if client is None:
            return self._error_page("The application is not registered with this gateway.")
        redirect_uri = _redirect_uri(client, given.get("redirect_uri"))
        if redirect_uri is None:
            return self._error_page(
                "The application asked to send you to an address it did not register."
            )
        state = given.get("state")
        if state is not None and len(state) > MAX_STATE:
            return self._error_page("The application's state parameter is too long.")
        try:
            challenge, server = self._check(given)
        except Refusal as refused:
            answer = {"error": refused.error, "error_description": refused.description}
            return _redirect(self._back(redirect_uri, answer, state))
        page_token = secrets.token_urlsafe(32)
        pending = PendingRequest(client.id, client.name, redirect_uri, state, challenge, server)
        await self._store.open_request(
            token_hash(page_token), pending, ttl_seconds=self._settings.consent_ttl_seconds
        )
        return self._pages.consent(
            client_name=client.name,
            redirect_host=registration.display_host(redirect_uri),
            loopback=registration.is_loopback(redirect_uri),
            server=server,
            request=page_token,
        )

    async def _client(self, client_id: str | None) -> Client | None:
        if client_id is None or len(client_id) > MAX_CLIENT_ID:
            return None
        return await self._store.client(client_id)

    def _check(self, given: dict[str, str]) -> tuple[str, str]:
        """The PKCE challenge and the server, or Refusal."""
        if given.get("response_type") != "code":
            raise Refusal("unsupported_response_type", "Only response_type=code is supported.")
        challenge = given.get("code_challenge")
        if challenge is None:
            raise Refusal("invalid_request", "code_challenge is required (PKCE).")
        if given.get("code_challenge_method") != "S256":
            raise Refusal("invalid_request", "code_challenge_method must be S256.")
        if not CODE_CHALLENGE.fullmatch(challenge):
            raise Refusal("invalid_request", "code_challenge is malformed.")
        resource = given.get("resource")
        if resource is None:
            raise Refusal("invalid_target", "resource is required: the MCP server's URL.")
        server = server_of(self._public_url, resource)
        if server is None:
            raise Refusal("invalid_target", "resource must name one MCP server of this gateway.")
        return challenge, server

    def _error_page(self, message: str) -> web.Response:
        return self._pages.error(400, "This request cannot be authorized", message)

    def _back(self, redirect_uri: str, answer: dict[str, str], state: str | None) -> str:
        """The client's redirect URI with the answer, its state and our issuer (RFC 9207)."""
        extra = {**answer, **({"state": state} if state is not None else {})}
        extra["iss"] = self._public_url
        parts = urlsplit(redirect_uri)
        query = "&".join(q for q in (parts.query, urlencode(extra)) if q)
        return urlunsplit(parts._replace(query=query))

    # --- POST: the decision ---

    async def decide(self, data: dict[str, Any], client: str) -> web.Response:
        page_token = data.get("request")
        if (
            not isinstance(page_token, str)
            or not page_token.isascii()
            or len(page_token) > MAX_REQUEST_TOKEN
        ):
            raise request_expired()
        id_hash = token_hash(page_token)
        action = data.get("action")
        if action == "deny":
            return await self._deny(id_hash)
        if action not in ("sign_in", "allow"):
            raise ApiError(400, "invalid_request", "action: expected sign_in, allow or deny.")
        pending = await self._store.pending(id_hash)
        if pending is None:
            raise request_expired()
        approver = await self._approvals.approver(data.get("key"), client, pending.server)
        if action == "sign_in":
            offered = await self._approvals.offered_tools(approver, pending.server)
            return json_answer(
                {
                    "user": approver.user.email,
                    "server": pending.server,
                    "tools": tools_json(offered) if offered is not None else None,
                }
            )
        tools = grant_tools(approver.key, pending.server, data.get("tools"), self._configured)
        code = secrets.token_urlsafe(32)
        approved = await self._store.approve(
            id_hash,
            code_hash=token_hash(code),
            approving_key_id=approver.key.id,
            tools=tools,
            code_ttl_seconds=self._settings.code_ttl_seconds,
        )
        if approved is None:
            raise request_expired()
        answer = {"code": code}
        return json_answer({"redirect": self._back(approved.redirect_uri, answer, approved.state)})

    async def _deny(self, id_hash: bytes) -> web.Response:
        denied = await self._store.deny(id_hash)
        if denied is None:
            raise request_expired()
        answer = {"error": "access_denied", "error_description": "The person refused access."}
        return json_answer({"redirect": self._back(denied.redirect_uri, answer, denied.state)})


def _redirect_uri(client: Client, given: str | None) -> str | None:
    """The redirect URI to use: the one given if registered (RFC 8252 port rule), or the only
    one registered when none is given."""
    if given is None:
        return client.redirect_uris[0] if len(client.redirect_uris) == 1 else None
    return given if registration.redirect_matches(client.redirect_uris, given) else None


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location, **NO_STORE})
