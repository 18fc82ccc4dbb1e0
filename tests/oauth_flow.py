"""Driving Keystile's OAuth flow over HTTP, as a client and a consenting person would.

Keystile runs with `gateway.public_url` set to its own data-plane address, so the documents it
serves name URLs a client on this machine can follow. Nothing is mocked: every step is a real
request to the running gateway.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway.config import Address, Settings
from tests.processes import free_port
from tests.support import LOOPBACK, Keystile, Reply, Upstream, make_settings, start_keystile

CALLBACK = "http://127.0.0.1:9/callback"  # a loopback redirect URI: never actually visited
ALL_TOOLS = object()  # "every tool this key allows" (the consent page's default)
_PAGE_TOKEN = re.compile(r'id="request" value="([^"]+)"')


def oauth_settings(upstream: Upstream | None = None, **sections: Any) -> Settings:
    """make_settings, with the data plane on a free port that public_url names. The echo
    upstream is no MCP server: asking it for its tools (the consent page does) fails, and a
    short discovery bound keeps that failure from holding every sign-in up for 10 s."""
    port = free_port()
    sections.setdefault("mcp", {"discovery_timeout_seconds": 2.0})
    settings = make_settings(upstream, **sections)
    gateway = replace(
        settings.gateway, listen=Address(LOOPBACK, port), public_url=f"http://{LOOPBACK}:{port}"
    )
    return replace(settings, gateway=gateway)


@asynccontextmanager
async def start_oauth_keystile(settings: Settings, database_url: str) -> AsyncIterator[Flow]:
    async with start_keystile(settings, database_url) as ks:
        yield Flow(ks)


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def query_of(location: str) -> dict[str, str]:
    """A redirect's query parameters (each once)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class Approved:
    """A code the person approved, with what its exchange needs."""

    code: str
    verifier: str
    client_id: str
    redirect_uri: str
    state: str


@dataclass
class Tokens:
    access: str
    refresh: str
    client_id: str
    expires_in: int

    @property
    def grant_id(self) -> str:
        return self.access.split("-")[2]

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


@dataclass
class Flow:
    ks: Keystile

    @property
    def public_url(self) -> str:
        return self.ks.runtime.settings.gateway.public_url

    def resource(self, server: str, rest: str = "") -> str:
        return f"{self.public_url}/mcp-connect/{server}{rest}"

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        """One request to the data plane, redirects not followed."""
        sent: dict[str, str] = dict(headers or {})
        data: Any = raw
        if json_body is not None:
            data = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        elif form is not None:
            data = dict(form)
        async with self.ks.http.request(
            method, self.ks.gateway + path, data=data, headers=sent, allow_redirects=False
        ) as resp:
            text = await resp.text()
            try:
                body: Any = json.loads(text)
            except ValueError:
                body = text
            return Reply(resp.status, dict(resp.headers), body, text)

    async def register(
        self, redirect_uris: Sequence[str] = (CALLBACK,), name: str = "Test client", **extra: Any
    ) -> Reply:
        body = {"redirect_uris": list(redirect_uris), "client_name": name, **extra}
        return await self.call("POST", "/oauth/register", json_body=body)

    async def client(self, redirect_uri: str = CALLBACK, name: str = "Test client") -> str:
        reply = await self.register([redirect_uri], name)
        assert reply.status == 201, reply.text
        return str(reply.body["client_id"])

    async def authorize(
        self,
        client_id: str,
        *,
        redirect_uri: str | None = CALLBACK,
        server: str = "github",
        state: str = "st-1",
        challenge: str | None = None,
        **overrides: str | None,
    ) -> Reply:
        """GET /oauth/authorize; `overrides` replace (or, with None, drop) parameters."""
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge or pkce()[1],
            "code_challenge_method": "S256",
            "resource": self.resource(server),
            **overrides,
        }
        kept = {k: v for k, v in params.items() if v is not None}
        async with self.ks.http.get(
            self.ks.gateway + "/oauth/authorize", params=kept, allow_redirects=False
        ) as resp:
            text = await resp.text()
            return Reply(resp.status, dict(resp.headers), text, text)

    @staticmethod
    def page_token(page: Reply) -> str:
        assert page.status == 200, page.text
        found = _PAGE_TOKEN.search(page.text)
        assert found is not None, "the consent page carries its request's token"
        return found.group(1)

    async def decide(
        self, token: str, action: str, key: str | None = None, tools: Any = ALL_TOOLS
    ) -> Reply:
        body: dict[str, Any] = {"request": token, "action": action}
        if key is not None:
            body["key"] = key
        if tools is not ALL_TOOLS:
            body["tools"] = tools
        elif action == "allow":
            body["tools"] = None
        return await self.call("POST", "/oauth/authorize", json_body=body)

    async def approve(
        self,
        key: str,
        *,
        server: str = "github",
        tools: Any = ALL_TOOLS,
        client_id: str | None = None,
        redirect_uri: str = CALLBACK,
    ) -> Approved:
        """Register (unless given a client), open the consent page, sign in and allow."""
        client_id = client_id or await self.client(redirect_uri)
        verifier, challenge = pkce()
        state = secrets.token_urlsafe(8)
        page = await self.authorize(
            client_id, redirect_uri=redirect_uri, server=server, state=state, challenge=challenge
        )
        token = self.page_token(page)
        signed_in = await self.decide(token, "sign_in", key)
        assert signed_in.status == 200, signed_in.text
        allowed = await self.decide(token, "allow", key, tools)
        assert allowed.status == 200, allowed.text
        back = query_of(allowed.body["redirect"])
        assert back["state"] == state and back["iss"] == self.public_url
        return Approved(back["code"], verifier, client_id, redirect_uri, state)

    async def exchange(self, approved: Approved, **overrides: str | None) -> Reply:
        form: dict[str, str | None] = {
            "grant_type": "authorization_code",
            "code": approved.code,
            "redirect_uri": approved.redirect_uri,
            "client_id": approved.client_id,
            "code_verifier": approved.verifier,
            **overrides,
        }
        return await self.token_call({k: v for k, v in form.items() if v is not None})

    async def token_call(self, form: Mapping[str, str]) -> Reply:
        return await self.call("POST", "/oauth/token", form=form)

    async def connect(self, key: str, *, server: str = "github", tools: Any = ALL_TOOLS) -> Tokens:
        """The whole flow: a new client approved by `key`, its code exchanged for tokens."""
        approved = await self.approve(key, server=server, tools=tools)
        reply = await self.exchange(approved)
        assert reply.status == 200, reply.text
        return tokens_of(reply, approved.client_id)

    async def refresh(self, tokens: Tokens, **extra: str) -> Reply:
        form = {
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh,
            "client_id": tokens.client_id,
            **extra,
        }
        return await self.token_call(form)

    async def mcp(self, tokens: Tokens | str, server: str = "github", rest: str = "/") -> int:
        """The status of a GET on an MCP route with the access token."""
        access = tokens.access if isinstance(tokens, Tokens) else tokens
        status, _, _ = await self.ks.request("GET", f"/mcp-connect/{server}{rest}", access)
        return status


def tokens_of(reply: Reply, client_id: str) -> Tokens:
    body = reply.body
    assert body["token_type"] == "Bearer"
    return Tokens(body["access_token"], body["refresh_token"], client_id, body["expires_in"])
