"""The token endpoint: the authorization code exchange (with PKCE) and refresh (with rotation).

Decisions (RFC 6749 §4.1.3, §6, §10.4; RFC 7636; RFC 9700 §4.14):
- A code is single use and short-lived (`oauth.code_ttl_seconds`, 60 s). It is marked used
  before anything else is checked, so a failed attempt burns it too. A second use answers
  `invalid_grant` and revokes the grant the first use obtained: the rightful client uses a
  code once, so a code seen twice has leaked, and whoever was first may be the thief.
- `client_id` and `redirect_uri` must equal the code's (redirect_uri is required: MCP clients
  send it, and OAuth 2.1 clients may, so requiring it costs none of them anything), and the
  verifier must hash (S256) to the code's challenge.
- `resource` is optional here; given, it must be the grant's server or a path under it.
- A refresh token is used once: each use returns a new access and a new refresh token. One
  presented again (used) revokes the grant, with an `oauth.refresh_reuse` audit row: either
  the client or a thief holds a stale copy, and the grant cannot tell which.
- A grant whose key is revoked, disabled or expired, or whose user is disabled or lost the
  server, refreshes no more (`invalid_grant`): the client has to ask the person again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway import keys, policy
from gateway.cache import KeyCache
from gateway.config import OAuthSettings
from gateway.errors import ApiError
from gateway.models import Principal
from gateway.oauth.approval import plan_grant
from gateway.oauth.errors import (
    OAuthError,
    invalid_client,
    invalid_grant,
    invalid_request,
    invalid_target,
)
from gateway.oauth.metadata import server_of
from gateway.oauth.store import Code, CodeReused, NewToken, OAuthStore
from gateway.store import Store

CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1


@dataclass(frozen=True, slots=True)
class Minted:
    """A grant's new access and refresh tokens, and when each expires."""

    access: keys.ParsedKey
    access_expires: datetime
    refresh: keys.ParsedKey
    refresh_expires: datetime

    def stored(self) -> list[NewToken]:
        return [
            NewToken(keys.token_hash(self.access.full), "access", self.access_expires),
            NewToken(keys.token_hash(self.refresh.full), "refresh", self.refresh_expires),
        ]

    def answer(self, now: datetime) -> dict[str, Any]:
        """RFC 6749 §5.1; no `scope`: the grant's reach is what the person chose."""
        return {
            "access_token": self.access.full,
            "token_type": "Bearer",
            "expires_in": max(1, int((self.access_expires - now).total_seconds())),
            "refresh_token": self.refresh.full,
        }


class TokenEndpoint:
    def __init__(
        self,
        *,
        public_url: str,
        settings: OAuthSettings,
        store: OAuthStore,
        keys_store: Store,
        cache: KeyCache,
        configured: Collection[str],
    ) -> None:
        self._public_url = public_url
        self._settings = settings
        self._store = store
        self._keys = keys_store
        self._cache = cache
        self._configured = frozenset(configured)

    async def answer(self, form: dict[str, str]) -> dict[str, Any]:
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return await self._exchange(form)
        if grant_type == "refresh_token":
            return await self._refresh(form)
        if grant_type is None:
            raise invalid_request("grant_type is required.")
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported.")

    # --- authorization_code ---

    async def _exchange(self, form: dict[str, str]) -> dict[str, Any]:
        code_text, client_id = _required(form, "code"), _required(form, "client_id")
        redirect_uri, verifier = _required(form, "redirect_uri"), _required(form, "code_verifier")
        client = await self._store.client(client_id) if len(client_id) <= 64 else None
        if client is None:
            raise invalid_client("Unknown client_id.")
        code_hash = keys.token_hash(code_text) if code_text.isascii() else b""
        consumed = await self._store.consume_code(code_hash)
        if isinstance(consumed, CodeReused):
            if consumed.grant_id is not None:
                self._cache.evict_key(consumed.grant_id)
            raise invalid_grant("The code was already used; its grant is revoked.")
        if consumed is None:
            raise invalid_grant("The code is not valid.")
        self._check_code(consumed, client_id, redirect_uri, verifier, form.get("resource"))
        approver = await self._keys.load_principal(consumed.approving_key_id)
        if approver is None:
            raise invalid_grant("The approving key no longer exists.")
        now = datetime.now(UTC)
        try:
            plan = plan_grant(approver[0], client, consumed, self._settings, self._configured, now)
        except ApiError as refused:
            message = f"The approving key may no longer grant this: {refused.message}"
            raise invalid_grant(message) from None
        minted = self._mint(approver[0].user.id, plan.grant_id, plan.expires_at, now)
        await self._store.create_grant(plan, code_hash, minted.stored())
        return minted.answer(now)

    def _check_code(
        self, code: Code, client_id: str, redirect_uri: str, verifier: str, resource: str | None
    ) -> None:
        if not code.live:
            raise invalid_grant("The code has expired.")
        if not hmac.compare_digest(code.client_id, client_id):
            raise invalid_grant("The code was issued to another client.")
        if not hmac.compare_digest(code.redirect_uri.encode(), redirect_uri.encode()):
            raise invalid_grant("redirect_uri does not match the authorization request's.")
        if not CODE_VERIFIER.fullmatch(verifier) or not _pkce_matches(verifier, code):
            raise invalid_grant("code_verifier does not match the code_challenge.")
        self._check_resource(resource, code.server)

    def _check_resource(self, resource: str | None, server: str) -> None:
        if resource is not None and server_of(self._public_url, resource) != server:
            raise invalid_target("resource must be the granted MCP server or a path under it.")

    # --- refresh_token ---

    async def _refresh(self, form: dict[str, str]) -> dict[str, Any]:
        text, client_id = _required(form, "refresh_token"), _required(form, "client_id")
        parsed = keys.parse(text)
        if parsed is None or parsed.kind != "refresh":
            raise invalid_grant("The refresh token is not valid.")
        token_hash = keys.token_hash(parsed.full)
        state = await self._store.refresh_state(token_hash)
        if state is None or state.principal.key.id != parsed.key_id:
            raise invalid_grant("The refresh token is not valid.")
        grant = state.principal.key
        if state.used:
            await self._store.revoke_for_reuse(grant.id)
            self._cache.evict_key(grant.id)
            raise invalid_grant("The refresh token was already used; the grant is revoked.")
        if not state.live:
            raise invalid_grant("The refresh token has expired.")
        if grant.client_id is None or not hmac.compare_digest(grant.client_id, client_id):
            raise invalid_grant("The refresh token was issued to another client.")
        self._check_resource(form.get("resource"), state.server)
        self._require_live(state.principal, state.server)
        now = datetime.now(UTC)
        assert grant.expires_at is not None  # every grant has an expiry (approval.plan_grant)
        minted = self._mint(grant.user_id, grant.id, grant.expires_at, now)
        if not await self._store.rotate(token_hash, grant.id, state.server, minted.stored()):
            self._cache.evict_key(grant.id)
            raise invalid_grant("The refresh token was already used; the grant is revoked.")
        return minted.answer(now)

    def _require_live(self, principal: Principal, server: str) -> None:
        """The grant may still be used: its status, its user, its user's reach."""
        try:
            policy.check_usable(principal, datetime.now(UTC))
        except ApiError as refused:
            raise invalid_grant(f"The grant cannot be refreshed: {refused.message}") from None
        if not policy.may_reach(principal, server, self._configured):
            raise invalid_grant("The grant's user may no longer reach this server.")

    def _mint(self, user_id: str, grant_id: str, grant_expires: datetime, now: datetime) -> Minted:
        """A new access and refresh token; neither outlives the grant."""
        access_ttl = timedelta(seconds=self._settings.access_token_ttl_seconds)
        return Minted(
            access=keys.generate(user_id, grant_id, "oauth"),
            access_expires=min(now + access_ttl, grant_expires),
            refresh=keys.generate(user_id, grant_id, "refresh"),
            refresh_expires=grant_expires,
        )


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if value is None:
        raise invalid_request(f"{name} is required.")
    return value


def _pkce_matches(verifier: str, code: Code) -> bool:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    return hmac.compare_digest(challenge, code.code_challenge)
