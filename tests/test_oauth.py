"""OAuth 2.1 for MCP clients (SPEC §9), end to end over HTTP against a real Keystile.

Keystile's data plane listens on a free port that `gateway.public_url` names; every step (the
documents, registration, the consent page's decisions, the token and revocation endpoints,
MCP calls with the tokens, the admin API) is a real request, answered from a real PostgreSQL.
A browser drives the consent page in tests/test_oauth_sdk.py; here its script's requests are
made directly.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.accesslog import BUFFER
from gateway.config import Address
from gateway.keyring import IssuedKey
from gateway.models import User
from tests.oauth_flow import (
    CALLBACK,
    Flow,
    Tokens,
    oauth_settings,
    query_of,
    start_oauth_keystile,
    tokens_of,
)
from tests.support import (
    LOOPBACK,
    Keystile,
    Upstream,
    admin_call,
    make_admin,
    start_keystile,
    wait_until,
)

AS_FIELDS = {
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "registration_endpoint",
    "revocation_endpoint",
    "response_types_supported",
    "response_modes_supported",
    "grant_types_supported",
    "code_challenge_methods_supported",
    "token_endpoint_auth_methods_supported",
    "revocation_endpoint_auth_methods_supported",
    "authorization_response_iss_parameter_supported",
}
TOOLS_CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}


@pytest.fixture
async def flow(database_url: str, upstream: Upstream) -> AsyncIterator[Flow]:
    async with start_oauth_keystile(oauth_settings(upstream), database_url) as started:
        yield started


async def approver(
    ks: Keystile,
    email: str = "ada@example.com",
    *,
    grants: tuple[str, ...] = ("*",),
    **fields: Any,
) -> tuple[User, IssuedKey]:
    """A member and a key of theirs that may approve grants (`keys` and `mcp`)."""
    user = await ks.user(email, servers=grants)
    values: dict[str, Any] = {"name": "laptop", "permissions": ("keys", "mcp"), **fields}
    return user, await ks.runtime.keyring.create_key(ks.actor, user_id=user.id, **values)


async def audit_rows(database_url: str, action: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch("SELECT * FROM audit_events WHERE action = $1 ORDER BY id", action)
    finally:
        await conn.close()


async def sql(database_url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


def tools_call(name: str) -> bytes:
    return json.dumps({**TOOLS_CALL, "params": {"name": name, "arguments": {}}}).encode()


async def call_tool(flow: Flow, tokens: Tokens, name: str) -> tuple[int, Any]:
    headers = {
        **tokens.bearer(),
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    status, _, body = await flow.ks.request(
        "POST", "/mcp-connect/github/mcp", headers=headers, data=tools_call(name)
    )
    return status, body


# --- discovery ----------------------------------------------------------------------------


async def test_discovery_documents_have_the_exact_fields(flow: Flow) -> None:
    base = flow.public_url
    assert not base.endswith("/")
    doc = await flow.call("GET", "/.well-known/oauth-authorization-server")
    assert doc.status == 200 and doc.headers["Content-Type"].startswith("application/json")
    assert set(doc.body) == AS_FIELDS
    assert doc.body["issuer"] == base
    assert doc.body["authorization_endpoint"] == f"{base}/oauth/authorize"
    assert doc.body["token_endpoint"] == f"{base}/oauth/token"
    assert doc.body["registration_endpoint"] == f"{base}/oauth/register"
    assert doc.body["revocation_endpoint"] == f"{base}/oauth/revoke"
    assert doc.body["response_types_supported"] == ["code"]
    assert doc.body["code_challenge_methods_supported"] == ["S256"]
    assert doc.body["grant_types_supported"] == ["authorization_code", "refresh_token"]
    assert doc.body["token_endpoint_auth_methods_supported"] == ["none"]

    # The resource document for a server and for any path under it (clients ask for the
    # document of the URL they were given).
    for path in ("", "/", "/mcp", "/mcp/deeper/still"):
        prm = await flow.call(
            "GET", f"/.well-known/oauth-protected-resource/mcp-connect/github{path}"
        )
        assert prm.status == 200, path
        assert prm.body == {
            "resource": f"{base}/mcp-connect/github",
            "authorization_servers": [base],
            "bearer_methods_supported": ["header"],
        }
        # character for character, as the MCP SDK compares them
        assert prm.body["authorization_servers"][0] == doc.body["issuer"]

    # Names do not leak: a server that is not configured gets a document too (whether a key
    # may reach it is decided on the consent page, as for any server it may not reach).
    unknown = await flow.call("GET", "/.well-known/oauth-protected-resource/mcp-connect/nope")
    assert unknown.status == 200
    for path in (
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-authorization-server/x",
    ):
        assert (await flow.call("GET", path)).status == 404, path
    wrong = await flow.call("POST", "/.well-known/oauth-authorization-server")
    assert wrong.status == 405 and wrong.headers["Allow"] == "GET, HEAD"


async def test_401_on_an_mcp_route_names_the_resource_metadata(flow: Flow) -> None:
    base = flow.public_url
    for key in (None, "ks1-nope", "kso1-nope"):
        status, headers, body = await flow.ks.request("GET", "/mcp-connect/gitlab/mcp", key)
        assert status == 401 and body["error"] == "invalid_api_key"
        assert headers["WWW-Authenticate"] == (
            'Bearer realm="keystile", error="invalid_token", '
            f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp-connect/gitlab"'
        )
    # Not on other routes: they are not OAuth protected resources.
    status, headers, _ = await flow.ks.request("GET", "/api/me")
    assert status == 401 and "resource_metadata" not in headers["WWW-Authenticate"]


async def test_without_public_url_there_is_no_oauth(keystile: Keystile) -> None:
    for method, path in [
        ("GET", "/.well-known/oauth-authorization-server"),
        ("GET", "/.well-known/oauth-protected-resource/mcp-connect/github"),
        ("POST", "/oauth/register"),
        ("GET", "/oauth/authorize"),
        ("POST", "/oauth/token"),
        ("POST", "/oauth/revoke"),
        ("GET", "/oauth/static/consent.js"),
    ]:
        status, _, body = await keystile.request(method, path)
        assert (status, body["error"]) == (404, "not_found"), path
    status, headers, _ = await keystile.request("GET", "/mcp-connect/github/")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="keystile", error="invalid_token"'


# --- registration -------------------------------------------------------------------------


async def test_registration_of_public_clients(flow: Flow) -> None:
    uris = [
        "http://127.0.0.1:33418/callback",
        "http://localhost/cb",
        "http://[::1]:8765/oauth/cb?app=1",
        "https://claude.example/api/mcp/auth_callback",
    ]
    reply = await flow.register(
        uris, "Claude", application_type="native", software_id="x", logo_uri="https://l/x.png"
    )
    assert reply.status == 201, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    body = reply.body
    assert set(body) == {
        "client_id",
        "client_id_issued_at",
        "client_name",
        "redirect_uris",
        "grant_types",
        "response_types",
        "token_endpoint_auth_method",
    }
    assert body["redirect_uris"] == uris and body["client_name"] == "Claude"
    assert body["token_endpoint_auth_method"] == "none"  # public clients: no secret, ever
    assert body["grant_types"] == ["authorization_code", "refresh_token"]
    # A client asking for a secret gets a public registration (RFC 7591 lets us replace it).
    asked = await flow.register(uris, token_endpoint_auth_method="client_secret_basic")
    assert asked.status == 201 and asked.body["token_endpoint_auth_method"] == "none"
    assert "client_secret" not in asked.body
    # Names are cleaned: no controls or direction overrides to disguise them; no name, a label.
    spoof = await flow.register(uris, "Good\u202eevil\u0007 app")
    assert spoof.body["client_name"] == "Good evil app"
    anonymous = await flow.call("POST", "/oauth/register", json_body={"redirect_uris": uris})
    assert anonymous.body["client_name"] == "Unnamed client"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"redirect_uris": ["http://example.com/cb"]}, "invalid_redirect_uri"),  # not loopback
        ({"redirect_uris": ["http://10.0.0.1/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://app.example/cb#frag"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["com.example.app:/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["/relative/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": ["https://user:pw@app.example/cb"]}, "invalid_redirect_uri"),
        ({"redirect_uris": []}, "invalid_redirect_uri"),
        ({"redirect_uris": "https://app.example/cb"}, "invalid_redirect_uri"),
        ({"client_name": "no uris"}, "invalid_redirect_uri"),
        (
            {"redirect_uris": ["https://a.example/cb"], "grant_types": ["client_credentials"]},
            "invalid_client_metadata",
        ),
        (
            {"redirect_uris": ["https://a.example/cb"], "response_types": ["token"]},
            "invalid_client_metadata",
        ),
    ],
)
async def test_registration_refusals(flow: Flow, body: dict[str, Any], error: str) -> None:
    reply = await flow.call("POST", "/oauth/register", json_body=body)
    assert reply.status == 400, reply.text
    assert reply.body["error"] == error and reply.body["error_description"]


async def test_registration_needs_a_json_object(flow: Flow) -> None:
    form = await flow.call("POST", "/oauth/register", form={"redirect_uris": CALLBACK})
    assert form.status == 415
    broken = await flow.call(
        "POST", "/oauth/register", raw=b"[1,", headers={"Content-Type": "application/json"}
    )
    assert broken.status == 400 and broken.body["error"] == "invalid_request"


# --- the authorization endpoint ----------------------------------------------------------


async def test_unknown_clients_and_unregistered_redirects_get_a_page_never_a_redirect(
    flow: Flow,
) -> None:
    client_id = await flow.client("https://app.example/cb")
    cases = [
        await flow.authorize("nosuchclient", redirect_uri="https://app.example/cb"),
        await flow.authorize(client_id, redirect_uri="https://evil.example/cb"),
        await flow.authorize(client_id, redirect_uri="https://app.example/cb/more"),
        await flow.authorize(client_id, redirect_uri="https://app.example/cb?x=1"),
        await flow.authorize(client_id, redirect_uri="https://app.example:8443/cb"),
        await flow.authorize(client_id, redirect_uri="http://app.example/cb"),
        # a bad redirect and a bad PKCE: the redirect is judged first, so still a page
        await flow.authorize(
            client_id, redirect_uri="https://evil.example/cb", response_type="token"
        ),
    ]
    for reply in cases:
        assert reply.status == 400, reply.text
        assert "Location" not in reply.headers
        assert reply.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in reply.headers["Content-Security-Policy"]


async def test_loopback_redirects_match_on_any_port_only(flow: Flow) -> None:
    client_id = await flow.client("http://127.0.0.1:5000/callback")
    ok = await flow.authorize(client_id, redirect_uri="http://127.0.0.1:61234/callback")
    assert ok.status == 200 and flow.page_token(ok)
    no_port = await flow.authorize(client_id, redirect_uri="http://127.0.0.1/callback")
    assert no_port.status == 200
    for other in ("http://localhost:5000/callback", "http://127.0.0.1:5000/other"):
        assert (await flow.authorize(client_id, redirect_uri=other)).status == 400, other
    # one registered URI: it may be left out
    implied = await flow.authorize(client_id, redirect_uri=None)
    assert implied.status == 200


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": None}, "unsupported_response_type"),
        ({"code_challenge": None}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": None}, "invalid_request"),
        ({"code_challenge": "short"}, "invalid_request"),
        ({"resource": None}, "invalid_target"),
        ({"resource": "http://127.0.0.1:1/mcp-connect/github"}, "invalid_target"),
        ({"resource": "RESOURCE/api/v1/chat"}, "invalid_target"),
        ({"resource": "RESOURCE/mcp-connect/github?x=1"}, "invalid_target"),
        ({"resource": "RESOURCE/mcp-connect/github/../gitlab"}, "invalid_target"),
    ],
)
async def test_bad_requests_go_back_with_their_state(
    flow: Flow, overrides: dict[str, Any], error: str
) -> None:
    client_id = await flow.client()
    if overrides.get("resource"):
        overrides["resource"] = str(overrides["resource"]).replace("RESOURCE", flow.public_url)
    reply = await flow.authorize(client_id, state="keep me", **overrides)
    assert reply.status == 302, reply.text
    location = reply.headers["Location"]
    assert location.startswith(CALLBACK + "?")
    back = query_of(location)
    assert back["error"] == error and back["state"] == "keep me"
    assert back["iss"] == flow.public_url
    assert "code" not in back


async def test_resource_may_name_a_path_under_the_server(flow: Flow) -> None:
    client_id = await flow.client()
    for resource in ("/mcp-connect/github/", "/mcp-connect/github/mcp"):
        reply = await flow.authorize(client_id, resource=flow.public_url + resource)
        assert reply.status == 200, resource


async def test_consent_page_shows_the_client_and_redirect_host_escaped(flow: Flow) -> None:
    client_id = await flow.client("https://app.example:8443/cb", '<img src=x onerror="x()">')
    page = await flow.authorize(client_id, redirect_uri="https://app.example:8443/cb")
    assert page.status == 200
    assert page.headers["Cache-Control"] == "no-store"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "<img src=x" not in page.text
    assert "&lt;img src=x onerror=&quot;x()&quot;&gt;" in page.text
    assert "app.example:8443" in page.text and ">github<" in page.text
    assert '<label for="api-key">API key</label>' in page.text
    for asset in ("consent.js", "consent.css", "favicon.svg"):
        got = await flow.call("GET", f"/oauth/static/{asset}")
        assert got.status == 200 and got.headers["X-Content-Type-Options"] == "nosniff"
    assert (await flow.call("GET", "/oauth/static/nope.js")).status == 404


# --- the consent decision -----------------------------------------------------------------


async def test_deny_goes_back_with_access_denied_and_ends_the_request(flow: Flow) -> None:
    client_id = await flow.client()
    token = flow.page_token(await flow.authorize(client_id, state="s-9"))
    denied = await flow.decide(token, "deny")
    assert denied.status == 200, denied.text
    back = query_of(denied.body["redirect"])
    assert back == {
        "error": "access_denied",
        "error_description": "The person refused access.",
        "state": "s-9",
        "iss": flow.public_url,
    }
    _, key = await approver(flow.ks)
    again = await flow.decide(token, "allow", key.key)
    assert again.status == 400 and again.body["error"] == "request_expired"


async def test_the_decision_is_bound_to_its_page(flow: Flow) -> None:
    _, key = await approver(flow.ks)
    wrong = await flow.decide("made-up", "allow", key.key)
    assert wrong.status == 400 and wrong.body["error"] == "request_expired"
    client_id = await flow.client()
    token = flow.page_token(await flow.authorize(client_id))
    # A cross-site form cannot post JSON: a form body is refused outright.
    form = await flow.call(
        "POST", "/oauth/authorize", form={"request": token, "action": "allow", "key": key.key}
    )
    assert form.status == 415
    # The redirect and state come from the server's record, whatever the body says.
    allowed = await flow.decide(token, "allow", key.key)
    assert allowed.status == 200
    assert allowed.body["redirect"].startswith(CALLBACK + "?code=")
    # one decision per page
    assert (await flow.decide(token, "allow", key.key)).status == 400
    assert (await flow.decide(token, "deny")).status == 400


async def test_who_may_approve(flow: Flow, database_url: str) -> None:
    ks = flow.ks
    _, no_keys = await approver(ks, "a@x", permissions=("mcp",))
    _, no_mcp = await approver(ks, "b@x", permissions=("keys",))
    _, other_server = await approver(ks, "c@x", servers=("gitlab",))
    _, ungranted = await approver(ks, "d@x", grants=("gitlab",))
    _, good = await approver(ks, "e@x")
    client_id = await flow.client()
    token = flow.page_token(await flow.authorize(client_id))
    for bad, status in [
        (no_keys.key, 403),
        (no_mcp.key, 403),
        (other_server.key, 403),
        (ungranted.key, 403),
        ("ks1-not-a-key", 401),
    ]:
        reply = await flow.decide(token, "sign_in", bad)
        assert reply.status == status, reply.text
    # An unknown server is refused exactly as one the key may not reach.
    unknown = flow.page_token(await flow.authorize(client_id, server="nosuch"))
    reply = await flow.decide(unknown, "sign_in", good.key)
    assert (reply.status, reply.body["message"]) == (403, "This API key may not reach this server.")
    # An access token cannot approve anything: only keys can.
    tokens = await flow.connect(good.key)
    assert (await flow.decide(token, "sign_in", tokens.access)).status == 401
    # A key used from outside its networks cannot either.
    _, fenced = await approver(ks, "f@x", allowed_cidrs=["10.0.0.0/8"])
    assert (await flow.decide(token, "sign_in", fenced.key)).status == 403
    signed_in = await flow.decide(token, "sign_in", good.key)
    assert signed_in.status == 200
    # The echo upstream is no MCP server: its tools cannot be listed, so none are offered.
    assert signed_in.body == {"user": "e@x", "server": "github", "tools": None}


# --- the token endpoint -------------------------------------------------------------------


async def test_the_flow_gives_a_token_bound_to_its_server(flow: Flow, upstream: Upstream) -> None:
    ks = flow.ks
    user, key = await approver(ks)
    approved = await flow.approve(key.key)
    reply = await flow.exchange(approved)
    assert reply.status == 200, reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    assert set(reply.body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert reply.body["expires_in"] == 3600
    tokens = tokens_of(reply, approved.client_id)
    assert tokens.access.startswith(f"kso1-{user.id}-")
    assert tokens.refresh.startswith(f"ksr1-{user.id}-{tokens.grant_id}-")

    assert await flow.mcp(tokens) == 200
    seen = upstream.seen[-1]
    assert seen["headers"]["x-keystile-key-id"] == tokens.grant_id
    assert seen["headers"]["x-keystile-user-id"] == user.id
    assert "authorization" not in seen["headers"]
    # Anywhere else: 401, never 403 (an OAuth client would loop through consent).
    for path in ("/mcp-connect/gitlab/", "/mcp-connect/tokened/", "/mcp-connect/nosuch/"):
        status, _, body = await ks.request("GET", path, tokens.access)
        assert (status, body["error"]) == (401, "invalid_api_key"), path
    for path in ("/api/me", "/api/v1/chat/completions"):
        assert (await ks.request("GET", path, tokens.access))[0] == 401, path
    assert (await admin_call(ks, "GET", "/api/keys", tokens.access)).status == 401
    # A refresh token is no bearer credential.
    assert await flow.mcp(tokens.refresh) == 401


async def test_a_code_is_used_once_and_a_second_use_revokes_the_grant(
    flow: Flow, database_url: str
) -> None:
    _, key = await approver(flow.ks)
    approved = await flow.approve(key.key)
    first = await flow.exchange(approved)
    assert first.status == 200
    tokens = tokens_of(first, approved.client_id)
    assert await flow.mcp(tokens) == 200
    second = await flow.exchange(approved)
    assert (second.status, second.body["error"]) == (400, "invalid_grant")
    assert await flow.mcp(tokens) == 401
    assert (await flow.refresh(tokens)).body["error"] == "invalid_grant"
    [row] = await audit_rows(database_url, "oauth.revoke")
    assert row["target_id"] == tokens.grant_id
    assert json.loads(row["changes"]) == {"reason": "code_reuse"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"code_verifier": "x" * 43},  # another verifier
        {"code_verifier": None},
        {"client_id": "someoneelse"},  # unknown client
        {"redirect_uri": "http://127.0.0.1:10/callback"},
        {"redirect_uri": None},
        {"code": "made-up"},
        {"resource": "RESOURCE/mcp-connect/gitlab"},
    ],
)
async def test_code_exchange_refusals(flow: Flow, overrides: dict[str, str | None]) -> None:
    _, key = await approver(flow.ks)
    approved = await flow.approve(key.key)
    if overrides.get("resource"):
        overrides["resource"] = str(overrides["resource"]).replace("RESOURCE", flow.public_url)
    reply = await flow.exchange(approved, **overrides)
    assert reply.status in (400, 401), reply.text
    assert reply.body["error"] in {
        "invalid_grant",
        "invalid_request",
        "invalid_client",
        "invalid_target",
    }
    assert reply.headers["Cache-Control"] == "no-store"
    assert "access_token" not in reply.body


async def test_a_failed_exchange_burns_the_code(flow: Flow) -> None:
    _, key = await approver(flow.ks)
    approved = await flow.approve(key.key)
    assert (await flow.exchange(approved, code_verifier="y" * 43)).body["error"] == "invalid_grant"
    assert (await flow.exchange(approved)).body["error"] == "invalid_grant"


async def test_a_code_of_another_client_is_refused(flow: Flow) -> None:
    _, key = await approver(flow.ks)
    approved = await flow.approve(key.key)
    other = await flow.client()
    reply = await flow.exchange(approved, client_id=other)
    assert reply.body["error"] == "invalid_grant"


async def test_a_code_expires(flow: Flow, database_url: str) -> None:
    _, key = await approver(flow.ks)
    approved = await flow.approve(key.key)
    # Sixty seconds are not waited for: the code is aged in the database.
    await sql(database_url, "UPDATE oauth_codes SET expires_at = now() - interval '1 second'")
    reply = await flow.exchange(approved)
    assert (reply.body["error"], reply.body["error_description"]) == (
        "invalid_grant",
        "The code has expired.",
    )


async def test_resource_at_the_token_endpoint(flow: Flow) -> None:
    _, key = await approver(flow.ks)
    for resource in (
        None,
        "/mcp-connect/github",
        "/mcp-connect/github/mcp",
        "/mcp-connect/github/",
    ):
        approved = await flow.approve(key.key)
        given = flow.public_url + resource if resource else None
        reply = await flow.exchange(approved, resource=given)
        assert reply.status == 200, (resource, reply.text)
    approved = await flow.approve(key.key)
    reply = await flow.exchange(approved, resource=flow.public_url + "/mcp-connect/gitlab")
    assert reply.body["error"] == "invalid_target"


async def test_token_endpoint_shape_errors(flow: Flow) -> None:
    assert (await flow.token_call({})).body["error"] == "invalid_request"
    reply = await flow.token_call({"grant_type": "client_credentials"})
    assert reply.body["error"] == "unsupported_grant_type"
    json_body = await flow.call("POST", "/oauth/token", json_body={"grant_type": "refresh_token"})
    assert json_body.body["error"] == "invalid_request"
    repeated = await flow.call(
        "POST",
        "/oauth/token",
        raw=b"grant_type=refresh_token&grant_type=authorization_code",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert repeated.body["error"] == "invalid_request"
    assert (await flow.call("GET", "/oauth/token")).status == 405


# --- refresh ------------------------------------------------------------------------------


async def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_grant(
    flow: Flow, database_url: str
) -> None:
    _, key = await approver(flow.ks)
    first = await flow.connect(key.key)
    reply = await flow.refresh(first, resource=flow.resource("github"))
    assert reply.status == 200, reply.text
    second = tokens_of(reply, first.client_id)
    assert second.refresh != first.refresh and second.access != first.access
    assert second.grant_id == first.grant_id
    assert await flow.mcp(second) == 200
    assert await flow.mcp(first) == 200  # an access token lives out its own short life
    third = tokens_of(await flow.refresh(second), first.client_id)
    assert await flow.mcp(third) == 200

    # The first refresh token again: reuse. The grant ends, every token of it with it.
    reused = await flow.refresh(first)
    assert (reused.status, reused.body["error"]) == (400, "invalid_grant")
    for tokens in (first, second, third):
        assert await flow.mcp(tokens) == 401
    assert (await flow.refresh(third)).body["error"] == "invalid_grant"
    [row] = await audit_rows(database_url, "oauth.refresh_reuse")
    assert row["target_id"] == first.grant_id and row["actor_key_id"] == first.grant_id


async def test_refresh_refusals(flow: Flow) -> None:
    _, key = await approver(flow.ks)
    tokens = await flow.connect(key.key)
    other_client = await flow.client()
    assert (await flow.refresh(tokens, client_id=other_client)).body["error"] == "invalid_grant"
    wrong_resource = await flow.refresh(tokens, resource=flow.resource("gitlab"))
    assert wrong_resource.body["error"] == "invalid_target"
    as_access = Tokens(tokens.access, tokens.access, tokens.client_id, 0)
    assert (await flow.refresh(as_access)).body["error"] == "invalid_grant"
    # none of those used the refresh token up
    assert (await flow.refresh(tokens)).status == 200


async def test_an_expired_access_token_is_refused(flow: Flow, database_url: str) -> None:
    _, key = await approver(flow.ks)
    tokens = await flow.connect(key.key)
    assert await flow.mcp(tokens) == 200
    await sql(
        database_url,
        "UPDATE oauth_tokens SET expires_at = now() - interval '1 second' WHERE kind = 'access'",
    )
    # A cached token expires at the time it was cached with; the test cannot wait an hour,
    # so it drops the cache and lets the store judge.
    flow.ks.runtime.cache.clear()
    assert await flow.mcp(tokens) == 401


# --- revocation ---------------------------------------------------------------------------


async def test_revoke_endpoint(flow: Flow, database_url: str) -> None:
    _, key = await approver(flow.ks)
    by_access = await flow.connect(key.key)
    by_refresh = await flow.connect(key.key)
    for tokens, token in ((by_access, by_access.access), (by_refresh, by_refresh.refresh)):
        assert await flow.mcp(tokens) == 200
        reply = await flow.call(
            "POST", "/oauth/revoke", form={"token": token, "client_id": tokens.client_id}
        )
        assert reply.status == 200, reply.text
        assert await flow.mcp(tokens) == 401
        assert (await flow.refresh(tokens)).body["error"] == "invalid_grant"
    rows = await audit_rows(database_url, "oauth.revoke")
    assert [r["target_id"] for r in rows] == [by_access.grant_id, by_refresh.grant_id]
    # 200 whatever the token; a key is not revoked here.
    for token in (by_access.access, "kso1-a-b-c", "garbage", key.key):
        assert (await flow.call("POST", "/oauth/revoke", form={"token": token})).status == 200
    assert (await flow.ks.request("GET", "/mcp-connect/github/", key.key))[0] == 200
    assert (await flow.call("POST", "/oauth/revoke", form={})).status == 400


async def test_grants_are_keys_listed_with_their_client_and_revocable(flow: Flow) -> None:
    ks = flow.ks
    user, key = await approver(ks)
    approved = await flow.approve(key.key, tools=["search_repos"])
    tokens = tokens_of(await flow.exchange(approved), approved.client_id)
    listed = await admin_call(ks, "GET", "/api/keys", key.key)
    assert listed.status == 200
    grants = [k for k in listed.body if k["kind"] == "oauth"]
    assert [k["kind"] for k in listed.body if k["id"] == key.record.id] == ["key"]
    [grant] = grants
    assert grant["id"] == tokens.grant_id
    assert grant["name"] == grant["client_name"] == "Test client"
    assert grant["client_id"] == approved.client_id
    assert grant["servers"] == ["github"] and grant["permissions"] == ["mcp"]
    assert grant["tools"] == ["github/search_repos"]
    assert grant["prefix"] == f"kso1-{user.id}-{tokens.grant_id}-…"
    assert grant["status"] == "active" and grant["user"]["id"] == user.id
    # What was approved stays; the rest changes as for any key.
    patched = await admin_call(ks, "PATCH", f"/api/keys/{grant['id']}", key.key, {"servers": ["*"]})
    assert (patched.status, patched.body["field"]) == (422, "servers")
    rotate = await admin_call(ks, "POST", f"/api/keys/{grant['id']}/rotate", key.key, {})
    assert (rotate.status, rotate.body["error"]) == (409, "oauth_grant")
    disabled = await admin_call(ks, "POST", f"/api/keys/{grant['id']}/disable", key.key)
    assert disabled.status == 200
    assert await flow.mcp(tokens) == 401
    assert (await admin_call(ks, "POST", f"/api/keys/{grant['id']}/enable", key.key)).status == 200
    assert await flow.mcp(tokens) == 200
    deleted = await admin_call(ks, "DELETE", f"/api/keys/{grant['id']}", key.key)
    assert deleted.status == 204
    assert await flow.mcp(tokens) == 401
    assert (await flow.refresh(tokens)).body["error"] == "invalid_grant"
    # Two grants of one client live side by side (names are unique among keys only).
    await flow.approve(key.key, client_id=approved.client_id)
    await flow.approve(key.key, client_id=approved.client_id)


async def test_disabling_the_user_stops_the_grant(flow: Flow) -> None:
    ks = flow.ks
    _, admin_key = await make_admin(ks)
    user, key = await approver(ks)
    tokens = await flow.connect(key.key)
    assert await flow.mcp(tokens) == 200
    reply = await admin_call(
        ks, "PATCH", f"/api/users/{user.id}", admin_key.key, {"is_active": False}
    )
    assert reply.status == 200
    assert await flow.mcp(tokens) == 401
    assert (await flow.refresh(tokens)).body["error"] == "invalid_grant"


async def test_a_user_who_loses_the_server_gets_401_not_403(flow: Flow) -> None:
    ks = flow.ks
    _, admin_key = await make_admin(ks)
    user, key = await approver(ks, grants=("github", "gitlab"))
    tokens = await flow.connect(key.key)
    assert await flow.mcp(tokens) == 200
    path = f"/api/users/{user.id}/servers"
    assert (await admin_call(ks, "PUT", path, admin_key.key, {"servers": ["gitlab"]})).status == 200
    status, headers, body = await ks.request("GET", "/mcp-connect/github/", tokens.access)
    assert (status, body["error"]) == (401, "invalid_api_key")
    assert "resource_metadata=" in headers["WWW-Authenticate"]
    refused = await flow.refresh(tokens)
    assert refused.body["error_description"] == "The grant's user may no longer reach this server."


async def test_revocation_reaches_another_instance(
    flow: Flow, database_url: str, upstream: Upstream
) -> None:
    """Two instances on one database: a grant revoked on one stops on the other at once
    (the NOTIFY of the grant's key id), although the other has its token cached."""
    # The second instance serves the same public URL (behind one load balancer, say).
    mine = flow.ks.runtime.settings
    other_settings = replace(mine, gateway=replace(mine.gateway, listen=Address(LOOPBACK, 0)))
    async with start_keystile(other_settings, database_url) as other:
        await wait_until(lambda: other.runtime.listener.connected)
        _, key = await approver(flow.ks)
        for revoke_with in ("oauth", "admin"):
            tokens = await flow.connect(key.key)
            assert (await other.request("GET", "/mcp-connect/github/", tokens.access))[0] == 200
            assert other.runtime.cache.get(tokens.grant_id) is not None
            if revoke_with == "oauth":
                form = {"token": tokens.access}
                assert (await flow.call("POST", "/oauth/revoke", form=form)).status == 200
            else:
                path = f"/api/keys/{tokens.grant_id}"
                assert (await admin_call(flow.ks, "DELETE", path, key.key)).status == 204

            async def refused(access: str = tokens.access) -> bool:
                return (await other.request("GET", "/mcp-connect/github/", access))[0] == 401

            await wait_until(refused, message=f"revoked through {revoke_with}, still accepted")


# --- a grant is never broader than its approving key --------------------------------------


async def test_a_grant_is_never_broader_than_the_key_that_approved_it(flow: Flow) -> None:
    ks = flow.ks
    expires = datetime.now(UTC) + timedelta(days=2)
    limits: dict[str, Any] = {
        "servers": ("github",),
        "tools": ("github/search_*", "!github/search_secrets"),
        "expires_at": expires,
        "rate_limit": {"requests": 50, "per_seconds": 60},
        "allowed_cidrs": ("127.0.0.0/8",),
    }
    _, key = await approver(ks, **limits)
    client_id = await flow.client()
    # servers: only within the key's
    gitlab = flow.page_token(await flow.authorize(client_id, server="gitlab"))
    assert (await flow.decide(gitlab, "sign_in", key.key)).status == 403
    # tools: only within the key's
    token = flow.page_token(await flow.authorize(client_id))
    refused = await flow.decide(token, "allow", key.key, ["delete_repo"])
    assert (refused.status, refused.body["field"]) == (422, "tools")
    for bad in ([], ["search_*"], ["!x"], "search_repos", [7]):
        assert (await flow.decide(token, "allow", key.key, bad)).status == 422, bad
    narrowed = await flow.approve(key.key, tools=["search_repos", "search_issues"])
    everything = await flow.approve(key.key)
    grants = {}
    for approved in (narrowed, everything):
        tokens = tokens_of(await flow.exchange(approved), approved.client_id)
        grants[approved.code] = tokens
    listed = await admin_call(ks, "GET", "/api/keys", key.key)
    by_id = {k["id"]: k for k in listed.body}
    small = by_id[grants[narrowed.code].grant_id]
    assert small["tools"] == [
        "github/search_repos",
        "github/search_issues",
        "!github/search_secrets",
    ]
    big = by_id[grants[everything.code].grant_id]
    assert big["tools"] == list(limits["tools"])  # "every tool this key allows"
    for grant in (small, big):
        assert grant["servers"] == ["github"] and grant["permissions"] == ["mcp"]
        assert datetime.fromisoformat(grant["expires_at"]) <= expires  # not the 30 days
        assert grant["rate_limit"] == limits["rate_limit"]
        assert grant["allowed_cidrs"] == ["127.0.0.0/8"]
    # The tool policy holds for the grant's calls, as for a key.
    tokens = grants[narrowed.code]
    assert (await call_tool(flow, tokens, "search_repos"))[0] == 200
    status, body = await call_tool(flow, tokens, "delete_repo")
    assert status == 200 and body["error"]["code"] == -32602  # denied by the gateway
    status, body = await call_tool(flow, tokens, "search_secrets")
    assert body["error"]["message"] == "Tool 'search_secrets' is not available with this API key."


async def test_a_key_narrowed_before_the_exchange_bounds_the_grant_then(flow: Flow) -> None:
    ks = flow.ks
    _, admin_key = await make_admin(ks)
    _, key = await approver(ks)
    approved = await flow.approve(key.key)
    # Between consent and exchange the approving key loses the server: no grant.
    patch = await admin_call(
        ks, "PATCH", f"/api/keys/{key.record.id}", admin_key.key, {"servers": ["gitlab"]}
    )
    assert patch.status == 200
    reply = await flow.exchange(approved)
    assert reply.body["error"] == "invalid_grant"
    # And a revoked approving key approves nothing more either.
    approved = await flow.approve(key.key, server="gitlab")
    assert (
        await admin_call(ks, "DELETE", f"/api/keys/{key.record.id}", admin_key.key)
    ).status == 204
    assert (await flow.exchange(approved)).body["error"] == "invalid_grant"


async def test_an_admin_key_approves_for_its_own_user_only(flow: Flow) -> None:
    ks = flow.ks
    admin, admin_key = await make_admin(ks)
    tokens = await flow.connect(admin_key.key, server="tokened")
    assert await flow.mcp(tokens, "tokened") == 200
    listed = await admin_call(ks, "GET", f"/api/keys/{tokens.grant_id}", admin_key.key)
    assert listed.body["user_id"] == admin.id
    assert listed.body["permissions"] == ["mcp"]  # never `admin` or `keys`, whoever approved


# --- audit, usage, logs and throttles ------------------------------------------------------


async def test_a_tokens_requests_are_the_grants_calls(flow: Flow) -> None:
    """Call records, last-used and the rest name the grant's key id, as for any key."""
    ks = flow.ks
    _, key = await approver(ks)
    tokens = await flow.connect(key.key)
    assert (await call_tool(flow, tokens, "search_repos"))[0] == 200

    async def recorded() -> list[dict[str, Any]]:
        reply = await admin_call(ks, "GET", f"/api/calls?key_id={tokens.grant_id}", key.key)
        calls: list[dict[str, Any]] = reply.body["calls"]
        return calls

    [call] = await wait_until(recorded, message="the token's call was never recorded")
    assert (call["key_id"], call["route"], call["server"]) == (tokens.grant_id, "mcp", "github")
    assert call["tool"] == "search_repos" and call["status"] == 200

    async def used() -> bool:
        grant = await admin_call(ks, "GET", f"/api/keys/{tokens.grant_id}", key.key)
        return grant.body["last_used_at"] is not None

    await wait_until(used, message="the grant's last_used_at was never written")


async def test_long_expired_oauth_rows_are_pruned(flow: Flow, database_url: str) -> None:
    _, key = await approver(flow.ks)
    tokens = await flow.connect(key.key)
    await flow.approve(key.key)  # a code never exchanged
    await flow.authorize(await flow.client())  # a consent page never decided
    for table in ("oauth_requests", "oauth_codes", "oauth_tokens"):
        await sql(database_url, f"UPDATE {table} SET expires_at = now() - interval '2 days'")
    store = flow.ks.runtime.oauth
    assert store is not None
    assert await store.prune() >= 6  # 2+ requests, 2 codes, an access and a refresh token
    conn = await asyncpg.connect(database_url)
    try:
        for table in ("oauth_requests", "oauth_codes", "oauth_tokens"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
    finally:
        await conn.close()
    assert await flow.mcp(tokens) == 401  # its token went with it


async def test_grants_are_audited(flow: Flow, database_url: str) -> None:
    user, key = await approver(flow.ks)
    approved = await flow.approve(key.key, tools=["search_repos"])
    tokens = tokens_of(await flow.exchange(approved), approved.client_id)
    [row] = await audit_rows(database_url, "oauth.grant")
    assert (row["target_type"], row["target_id"]) == ("key", tokens.grant_id)
    assert (row["actor_user_id"], row["actor_key_id"]) == (user.id, key.record.id)
    changes = json.loads(row["changes"])
    assert changes["client_id"] == approved.client_id
    assert changes["server"] == "github" and changes["tools"] == ["github/search_repos"]
    assert changes["approved_with"] == key.record.id
    text = json.dumps([dict(r) for r in await audit_rows(database_url, "oauth.grant")], default=str)
    assert tokens.access not in text and approved.code not in text


async def test_tokens_never_reach_the_access_log(database_url: str, upstream: Upstream) -> None:
    settings = oauth_settings(upstream)
    for log_format in ("text", "json"):
        gateway = replace(settings.gateway, access_log=True, access_log_format=log_format)
        captured = io.StringIO()
        BUFFER.redirect(captured)
        try:
            async with start_oauth_keystile(replace(settings, gateway=gateway), database_url) as f:
                _, key = await approver(f.ks, f"{log_format}@x")
                approved = await f.approve(key.key)
                # A careless client puts the code in a URL: still redacted.
                await f.call("GET", f"/mcp-connect/github/?code={approved.code}")
                tokens = tokens_of(await f.exchange(approved), approved.client_id)
                await f.mcp(tokens, rest=f"/?token={tokens.access}&x={tokens.refresh}")
                tokens = tokens_of(await f.refresh(tokens), approved.client_id)
                assert await f.mcp(tokens) == 200
                await f.call("POST", "/oauth/revoke", form={"token": tokens.refresh})
                page = await f.authorize(approved.client_id)
                page_token = f.page_token(page)
        finally:
            BUFFER.redirect(None)
        log = captured.getvalue()
        assert "/oauth/token" in log and "/mcp-connect/github/" in log, log
        for secret in (approved.code, tokens.access, tokens.refresh, page_token, key.key):
            assert secret not in log, log_format
        assert approved.verifier not in log


async def test_registration_and_token_endpoints_are_throttled_per_address(
    database_url: str, upstream: Upstream
) -> None:
    limits = {"register_requests_per_client": 3, "token_requests_per_client": 4}
    settings = oauth_settings(upstream, oauth=limits)
    async with start_oauth_keystile(settings, database_url) as f:
        for _ in range(3):
            assert (await f.register()).status == 201
        refused = await f.register()
        assert refused.status == 429 and refused.body["error"] == "too_many_requests"
        assert int(refused.headers["Retry-After"]) >= 1
        for _ in range(4):
            assert (await f.token_call({"grant_type": "refresh_token"})).status == 400
        throttled = await f.token_call({"grant_type": "refresh_token"})
        assert throttled.status == 429 and "Retry-After" in throttled.headers
        # A different budget per endpoint: discovery is not throttled at all.
        assert (await f.call("GET", "/.well-known/oauth-authorization-server")).status == 200


async def test_default_throttles_allow_a_normal_clients_calls(flow: Flow) -> None:
    """A few dozen calls a minute from one address (an office behind one NAT)."""
    _, key = await approver(flow.ks)
    for _ in range(12):  # each: register, page, sign in, allow, exchange, refresh
        tokens = await flow.connect(key.key)
        assert (await flow.refresh(tokens)).status == 200
