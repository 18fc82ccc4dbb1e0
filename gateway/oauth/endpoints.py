"""The data plane's OAuth routes (gateway.paths kind "oauth"), answered before any key is
looked at: the discovery documents, registration, the consent page and its files, the token
and revocation endpoints. Built only when `gateway.public_url` is set; otherwise the data
plane answers these paths 404, as any unknown path.

Registration, consent and the token endpoints are throttled per client address (429 with
Retry-After): anyone may call them, and each call writes to or reads the database. A pasted
key on the consent page is also counted like any failed authentication (gateway.throttle).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass

from aiohttp import web

from gateway import keys
from gateway.auth import Authenticator
from gateway.cache import KeyCache
from gateway.config import OAuthSettings
from gateway.errors import ApiError, not_found
from gateway.mcp.discovery import ToolDiscovery
from gateway.oauth import metadata, registration
from gateway.oauth.approval import Approvals
from gateway.oauth.authorize import Authorizer
from gateway.oauth.errors import OAuthError, json_answer, too_many_requests
from gateway.oauth.page import Pages
from gateway.oauth.revoke import revoke
from gateway.oauth.store import OAuthStore
from gateway.oauth.token import TokenEndpoint
from gateway.oauth.wire import form, json_object, read_body
from gateway.paths import Route
from gateway.store import Store
from gateway.throttle import AddressThrottle, FailureThrottle, KeyRateLimiter
from gateway.usage import LastUsedRecorder

PRUNE_EVERY = 600.0  # seconds between prunes of long-expired requests, codes and tokens
# The discovery documents change only with configuration: clients may keep them a while.
DOCUMENT_HEADERS = {"Cache-Control": "public, max-age=300"}
_GET = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class KeyUse:
    """What verifying and using a key needs, shared with the rest of the data plane."""

    authenticator: Authenticator
    throttle: FailureThrottle
    limiter: KeyRateLimiter
    usage: LastUsedRecorder
    cache: KeyCache


class OAuthEndpoints:
    def __init__(
        self,
        *,
        public_url: str,
        settings: OAuthSettings,
        max_tracked: int,
        body_timeout: float,
        store: OAuthStore,
        keys_store: Store,
        key_use: KeyUse,
        discovery: ToolDiscovery,
        configured: Collection[str],
    ) -> None:
        self.public_url = public_url
        self._store = store
        self._cache = key_use.cache
        self._body_timeout = body_timeout
        self._pages = Pages()
        self._as_document = json.dumps(metadata.authorization_server(public_url)).encode()
        self._throttles = {
            name: AddressThrottle(
                limit=limit, window_seconds=settings.window_seconds, max_tracked=max_tracked
            )
            for name, limit in (
                ("register", settings.register_requests_per_client),
                ("authorize", settings.authorize_requests_per_client),
                ("token", settings.token_requests_per_client),
            )
        }
        servers = frozenset(configured)
        approvals = Approvals(
            authenticator=key_use.authenticator,
            throttle=key_use.throttle,
            limiter=key_use.limiter,
            usage=key_use.usage,
            discovery=discovery,
            configured=servers,
        )
        self._authorizer = Authorizer(
            public_url=public_url,
            settings=settings,
            store=store,
            pages=self._pages,
            approvals=approvals,
            configured=servers,
        )
        self._tokens = TokenEndpoint(
            public_url=public_url,
            settings=settings,
            store=store,
            keys_store=keys_store,
            cache=key_use.cache,
            configured=servers,
        )
        self._next_prune = 0.0

    def resource_metadata_url(self, server: str) -> str:
        return metadata.resource_metadata_url(self.public_url, server)

    async def handle(self, request: web.BaseRequest, route: Route, client: str) -> web.Response:
        try:
            return await self._dispatch(request, route, client)
        except OAuthError as err:
            return err.response()

    async def _dispatch(self, request: web.BaseRequest, route: Route, client: str) -> web.Response:
        endpoint, method = route.endpoint, request.method
        if endpoint == "authorization-server":
            _allow(method, _GET)
            return _document(self._as_document)
        if endpoint == "protected-resource":
            _allow(method, _GET)
            found = metadata.protected_resource(self.public_url, route.server)
            return _document(json.dumps(found).encode())
        if endpoint.startswith("static/"):
            _allow(method, _GET)
            asset = self._pages.asset(endpoint.removeprefix("static/"))
            if asset is None:
                raise not_found()
            return asset
        if endpoint == "authorize":
            return await self._authorize(request, route, client)
        _allow(method, ("POST",))
        if endpoint == "register":
            self._take("register", client)
            return await self._register(request, client)
        self._take("token", client)
        body = form(request, await read_body(request, stall_seconds=self._body_timeout))
        if endpoint == "token":
            return json_answer(await self._tokens.answer(body))
        await revoke(body, self._store, self._cache)
        return json_answer({})

    async def _authorize(self, request: web.BaseRequest, route: Route, client: str) -> web.Response:
        _allow(request.method, (*_GET, "POST"))
        if request.method == "POST":
            self._take("authorize", client)
            body = await read_body(request, stall_seconds=self._body_timeout)
            return await self._authorizer.decide(json_object(request, body), client)
        try:
            self._take("authorize", client)
        except OAuthError as err:
            page = self._pages.error(429, "Too many requests", err.description)
            page.headers.update(err.headers)
            return page
        await self._prune()
        return await self._authorizer.show(route.query)

    async def _register(self, request: web.BaseRequest, client: str) -> web.Response:
        body = json_object(request, await read_body(request, stall_seconds=self._body_timeout))
        try:
            asked = registration.parse_registration(body)
        except registration.RegistrationError as refused:
            raise OAuthError(refused.error, refused.description) from None
        client_id = keys.new_id()
        await self._store.register_client(client_id, asked.client_name, asked.redirect_uris, client)
        await self._prune()
        answer = registration.registration_answer(client_id, int(time.time()), asked)
        return json_answer(answer, status=201)

    def _take(self, throttle: str, client: str) -> None:
        retry_after = self._throttles[throttle].take(client)
        if retry_after is not None:
            raise too_many_requests(retry_after)

    async def _prune(self) -> None:
        """Now and then, on an unauthenticated write path (never the token endpoint's), drop
        a bounded batch of long-expired rows, so nothing accumulates without a timer task."""
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            await self._store.prune()


def _allow(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            f"Use {' or '.join(allowed)} here.",
            headers={"Allow": ", ".join(allowed)},
        )


def _document(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json", headers=DOCUMENT_HEADERS)
