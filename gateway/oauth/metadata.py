"""The discovery documents and the URLs in them (RFC 9728, RFC 8414), and `resource` (RFC 8707).

Every URL is built from `gateway.public_url`, which configuration keeps as an origin spelt the
way clients canonicalise it (gateway.config): `issuer` is exactly that string, and equals
`authorization_servers[0]` of every protected-resource document character for character (the
MCP SDK compares them as strings).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gateway.config import SERVER_NAME
from gateway.paths import MCP_PREFIX

AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"  # noqa: S105 - a path
REGISTER_PATH = "/oauth/register"
REVOKE_PATH = "/oauth/revoke"
PROTECTED_RESOURCE_PATH = "/.well-known/oauth-protected-resource"


def resource_url(public_url: str, server: str) -> str:
    """The protected resource a server is: `<public_url>/mcp-connect/{server}`."""
    return f"{public_url}/{MCP_PREFIX}/{server}"


def resource_metadata_url(public_url: str, server: str) -> str:
    """Where the server's protected-resource document is; a 401 on its routes names it."""
    return f"{public_url}{PROTECTED_RESOURCE_PATH}/{MCP_PREFIX}/{server}"


def protected_resource(public_url: str, server: str) -> dict[str, Any]:
    """RFC 9728 §2, for one server (and, as routed, for any path under it)."""
    return {
        "resource": resource_url(public_url, server),
        "authorization_servers": [public_url],
        "bearer_methods_supported": ["header"],
    }


def authorization_server(public_url: str) -> dict[str, Any]:
    """RFC 8414 §2. No `scopes_supported`: scope is optional everywhere and unused (what a
    grant may do is chosen on the consent page, not by scope strings)."""
    return {
        "issuer": public_url,
        "authorization_endpoint": public_url + AUTHORIZE_PATH,
        "token_endpoint": public_url + TOKEN_PATH,
        "registration_endpoint": public_url + REGISTER_PATH,
        "revocation_endpoint": public_url + REVOKE_PATH,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        # The redirect carries `iss` (RFC 9207), so a client talking to several authorization
        # servers can tell which one answered.
        "authorization_response_iss_parameter_supported": True,
    }


def server_of(public_url: str, resource: str) -> str | None:
    """The server a `resource` names, or None: it must be `<public_url>/mcp-connect/{server}`
    or a path under it, with no query, fragment, encoded characters or dot segments (which
    could make a URL under one server name another)."""
    origin = urlsplit(public_url)
    try:
        parts = urlsplit(resource)
    except ValueError:
        return None
    if (parts.scheme.lower(), parts.netloc.lower()) != (origin.scheme, origin.netloc):
        return None
    if parts.query or parts.fragment or "#" in resource or "?" in resource:
        return None
    if "%" in parts.path or "\\" in parts.path:
        return None
    segments = parts.path.split("/")
    if len(segments) < 3 or segments[0] or segments[1] != MCP_PREFIX:
        return None
    if any(s in (".", "..") for s in segments[2:]):
        return None
    server = segments[2]
    return server if SERVER_NAME.fullmatch(server) else None
