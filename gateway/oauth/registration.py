"""Dynamic client registration (RFC 7591) for public clients, and the redirect URI rules.

Decisions:
- Public clients only: no secret is issued, and `token_endpoint_auth_method` is "none" whatever
  was asked (RFC 7591 §3.2.1 lets the server replace requested values; a client asking for a
  secret gets a record that says it has none). PKCE is what binds a code to its client.
- Redirect URIs are https (any host), or http on a loopback host (`localhost`, `127.0.0.1`,
  `[::1]`; RFC 8252 §7.3) — never a fragment, user info, another scheme (`javascript:`, custom
  app schemes) or a relative URI.
- Matching at /oauth/authorize is exact, character for character, except that a loopback
  URI's port may differ from the registered one (RFC 8252 §7.3: native apps take any free port).
- Unknown fields (e.g. `application_type`) are ignored; `client_name` is cleaned (no control
  or formatting characters, such as bidirectional overrides that could disguise it on the
  consent page), shortened to CLIENT_NAME_LENGTH, and "Unnamed client" when missing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MAX_REDIRECT_URIS = 10
MAX_REDIRECT_URI_LENGTH = 2000
CLIENT_NAME_LENGTH = 100
UNNAMED = "Unnamed client"
GRANT_TYPES = ("authorization_code", "refresh_token")


class RegistrationError(Exception):
    """RFC 7591 §3.2.2: `invalid_redirect_uri` or `invalid_client_metadata`, and why."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


@dataclass(frozen=True, slots=True)
class Registration:
    client_name: str
    redirect_uris: tuple[str, ...]


def parse_registration(data: dict[str, Any]) -> Registration:
    """The registration a request body asks for, or RegistrationError."""
    uris = data.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise RegistrationError("invalid_redirect_uri", "redirect_uris: a non-empty list needed")
    if len(uris) > MAX_REDIRECT_URIS:
        raise RegistrationError(
            "invalid_redirect_uri", f"redirect_uris: at most {MAX_REDIRECT_URIS}"
        )
    for uri in uris:
        problem = redirect_uri_problem(uri)
        if problem is not None:
            raise RegistrationError("invalid_redirect_uri", f"redirect_uris: {problem}")
    _require_code_flow(data)
    return Registration(client_name(data.get("client_name")), tuple(dict.fromkeys(uris)))


def _require_code_flow(data: dict[str, Any]) -> None:
    """A client that names its grant or response types must want the code flow."""
    grants = data.get("grant_types")
    if grants is not None and (not isinstance(grants, list) or "authorization_code" not in grants):
        raise RegistrationError(
            "invalid_client_metadata", "grant_types: must include authorization_code"
        )
    responses = data.get("response_types")
    if responses is not None and (not isinstance(responses, list) or "code" not in responses):
        raise RegistrationError("invalid_client_metadata", "response_types: must include code")


def redirect_uri_problem(uri: object) -> str | None:
    """Why `uri` cannot be a redirect URI, or None when it can."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_REDIRECT_URI_LENGTH:
        return "each must be a URI of at most 2000 characters"
    if any(c.isspace() or unicodedata.category(c) == "Cc" for c in uri):
        return f"{uri!r} holds whitespace or control characters"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"{uri!r} is not a valid URI"
    if "#" in uri:
        return f"{uri!r} has a fragment"
    if parts.username is not None or parts.password is not None:
        return f"{uri!r} has user info"
    if parts.scheme == "https" and parts.hostname:
        return None
    if parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS:
        return None
    return f"{uri!r}: https, or http on localhost, 127.0.0.1 or [::1]"


def is_loopback(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS


def redirect_matches(registered: Sequence[str], requested: str) -> bool:
    """Exact match, or a loopback URI that differs from a registered one only in its port."""
    if requested in registered:
        return True
    if redirect_uri_problem(requested) is not None or not is_loopback(requested):
        return False
    wanted = _without_port(urlsplit(requested))
    return any(is_loopback(r) and _without_port(urlsplit(r)) == wanted for r in registered)


def _without_port(parts: SplitResult) -> tuple[str, str | None, str, str]:
    return (parts.scheme, parts.hostname, parts.path, parts.query)


def display_host(uri: str) -> str:
    """The redirect URI's host as the consent page shows it (with its port, if any)."""
    parts = urlsplit(uri)
    return parts.netloc.rpartition("@")[2]


def client_name(value: object) -> str:
    """A name fit to show: printable, one line, short."""
    if not isinstance(value, str):
        return UNNAMED
    kept = "".join(c if not unicodedata.category(c).startswith("C") else " " for c in value)
    name = " ".join(kept.split())
    if len(name) > CLIENT_NAME_LENGTH:
        name = name[: CLIENT_NAME_LENGTH - 1] + "…"
    return name or UNNAMED


def registration_answer(
    client_id: str, issued_at: int, registration: Registration
) -> dict[str, Any]:
    """RFC 7591 §3.2.1: the client's record as registered."""
    return {
        "client_id": client_id,
        "client_id_issued_at": issued_at,
        "client_name": registration.client_name,
        "redirect_uris": list(registration.redirect_uris),
        "grant_types": list(GRANT_TYPES),
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
