"""The admin API's OpenAPI document: valid OpenAPI 3.1, the same routes as the admin app, and
answers that match it — every documented operation is called on a running admin plane and its
response checked against the schema the document gives for that status."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from openapi_schema_validator import OAS31Validator, oas31_format_checker
from openapi_spec_validator import validate as validate_spec

from admin import compat
from admin.api import create_admin_app
from admin.openapi import openapi_document
from admin.service import (
    KEY_CREATE_FIELDS,
    KEY_PATCH_FIELDS,
    KEY_STATUSES,
    ROTATE_FIELDS,
    USER_CREATE_FIELDS,
    USER_PATCH_FIELDS,
)
from admin.usage import CALLS_PARAMETERS, GROUP_FIELDS, METRICS, USAGE_PARAMETERS
from gateway.calls import CallRecord
from gateway.config import UpstreamSettings
from gateway.models import PERMISSIONS
from gateway.runtime import Runtime
from gateway.sample_mcp import MCP_PATH, start_sample_server
from gateway.usage_store import CALL_COLUMNS, write_calls
from tests.support import LOOPBACK, Keystile, Upstream, make_settings, start_keystile

HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
Operation = tuple[str, str]  # (METHOD, path template)


def _router_operations() -> set[Operation]:
    """(method, path) of every route create_admin_app registers; built without a database."""
    # create_admin_app reads only settings and keyring.store while wiring; no handler runs here.
    runtime = SimpleNamespace(settings=make_settings(), keyring=SimpleNamespace(store=None))
    app = create_admin_app(cast(Runtime, runtime))
    routes: set[Operation] = set()
    for route in app.router.routes():
        assert route.resource is not None
        routes.add((route.method, route.resource.canonical))
    # aiohttp answers HEAD for every GET route; the document leaves HEAD implicit.
    heads = {(m, p) for m, p in routes if m == "HEAD"}
    assert heads == {("HEAD", p) for m, p in routes if m == "GET"}
    return routes - heads


def _document_operations(doc: dict[str, Any]) -> set[Operation]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    schema = doc["components"]["schemas"][name]
    assert isinstance(schema, dict)
    return schema


# --- the document itself ---


def test_document_is_valid_openapi_3_1() -> None:
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1.")
    validate_spec(doc)
    json.dumps(doc)  # serialisable as the handler sends it


def test_document_routes_match_the_admin_app() -> None:
    router = _router_operations()
    documented = _document_operations(openapi_document())
    assert documented - router == set(), "documented but not routed"
    assert router - documented == set(), "routed but not documented"
    # A guard against both sides being empty or losing a family of routes together.
    assert ("GET", "/api/audit") in router
    assert ("PUT", "/{workspace}/admin/api-keys/{id}") in router
    assert ("POST", "/api/auth/api-key/delete") in router
    assert ("GET", "/admin/api-keys") in router
    assert ("GET", "/api/usage") in router
    assert ("GET", "/api/calls") in router
    assert len(router) == 33


def test_operation_ids_are_unique_and_statuses_have_schemas() -> None:
    doc = openapi_document()
    ids = [
        op["operationId"]
        for item in doc["paths"].values()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]
    assert len(ids) == len(set(ids))
    public = {
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/admin/api-keys"),
        ("GET", "/admin/static/{name}"),
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            statuses = set(op["responses"])
            if (method.upper(), path) in public:
                assert op["security"] == []
                assert statuses == {"200"}
            else:
                assert "security" not in op  # the document-wide bearer / X-API-Key applies
                assert {"401", "403"} <= statuses
            if "requestBody" in op:
                assert {"400", "422"} <= statuses


def test_request_bodies_accept_exactly_the_service_fields() -> None:
    doc = openapi_document()
    expected = {
        "KeyCreate": KEY_CREATE_FIELDS,
        "KeyUpdate": KEY_PATCH_FIELDS,
        "KeyRotate": ROTATE_FIELDS,
        "UserCreate": USER_CREATE_FIELDS,
        "UserUpdate": USER_PATCH_FIELDS,
        "UserServers": frozenset({"servers"}),
        "CmsKeyCreate": compat._CMS_FIELDS,
        "CmsKeyUpdate": compat._CMS_FIELDS,
        "AuthKeyCreate": frozenset({"name", "expiresIn", "permissions"}),
        "AuthKeyDelete": frozenset({"keyId"}),
    }
    for name, fields in expected.items():
        schema = _schema(doc, name)
        assert set(schema["properties"]) == set(fields), name
        assert schema["additionalProperties"] is False, name
    assert _schema(doc, "Permission")["enum"] == list(PERMISSIONS)
    assert set(_schema(doc, "KeyStatus")["enum"]) == KEY_STATUSES
    assert _schema(doc, "Role")["enum"] == ["admin", "member"]


def test_usage_routes_document_exactly_the_parameters_they_take() -> None:
    doc = openapi_document()
    for path, taken in (("/api/usage", USAGE_PARAMETERS), ("/api/calls", CALLS_PARAMETERS)):
        documented = {p["name"] for p in doc["paths"][path]["get"]["parameters"]}
        assert documented == taken, path
    row = _schema(doc, "UsageRow")
    assert set(row["properties"]) == {*GROUP_FIELDS, *METRICS}
    assert set(row["required"]) == set(METRICS)
    assert set(_schema(doc, "Call")["properties"]) == {"id", *CALL_COLUMNS}


def test_each_call_gets_its_own_copy() -> None:
    first = openapi_document()
    first["paths"].clear()
    first["components"]["schemas"]["ApiKey"]["properties"].clear()
    second = openapi_document()
    assert second["paths"]
    assert "prefix" in second["components"]["schemas"]["ApiKey"]["properties"]


# --- the document against a running admin plane ---


class Checker:
    """Calls the admin plane and checks every answer against the document."""

    def __init__(self, ks: Keystile, doc: dict[str, Any]) -> None:
        self.ks = ks
        self.doc = doc
        self.called: set[Operation] = set()

    def _response_schema(self, method: str, template: str, status: int) -> dict[str, Any] | None:
        op = self.doc["paths"][template][method.lower()]
        response = op["responses"].get(str(status))
        assert response is not None, f"{method} {template} answered undocumented {status}"
        if "$ref" in response:
            response = self.doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
        content = response.get("content")
        if content is None:
            return None
        assert "application/json" in content, f"{method} {template} {status}: not JSON"
        schema = content["application/json"]["schema"]
        assert isinstance(schema, dict)
        return schema

    def _validate(self, schema: dict[str, Any], instance: Any) -> None:
        # The schema's refs point into the document, so resolve them against a root holding it.
        root = {**schema, "components": self.doc["components"]}
        OAS31Validator(root, format_checker=oas31_format_checker).validate(instance)

    def check_request(self, method: str, template: str, body: Any) -> None:
        request_body = self.doc["paths"][template][method.lower()]["requestBody"]
        self._validate(request_body["content"]["application/json"]["schema"], body)

    async def call(
        self,
        method: str,
        template: str,
        status: int,
        key: str | None,
        *,
        body: Any = None,
        raw: bytes | None = None,
        query: str = "",
        **params: str,
    ) -> Any:
        path = template.format(**params)
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = self.ks.admin + path + (f"?{query}" if query else "")
        async with self.ks.http.request(method, url, headers=headers, data=data) as resp:
            text = await resp.text()
            assert resp.status == status, f"{method} {path}: {resp.status} {text}"
            content_type = resp.content_type
        if status < 400:
            self.called.add((method, template))
        schema = self._response_schema(method, template, status)
        if schema is None:
            assert text == ""
            return None
        assert content_type == "application/json"
        decoded = json.loads(text)
        self._validate(schema, decoded)
        return decoded


async def test_openapi_json_is_served_without_a_key(keystile: Keystile) -> None:
    async with keystile.http.get(keystile.admin + "/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        served = await resp.json()
    assert served == openapi_document()
    validate_spec(served)


@pytest.fixture
async def with_sample(database_url: str, upstream: Upstream) -> AsyncIterator[Keystile]:
    """Keystile with, beside the echo servers, the bundled sample MCP server as "sample"."""
    runner, port = await start_sample_server(LOOPBACK)
    settings = make_settings(upstream)
    sample = UpstreamSettings(url=f"http://{LOOPBACK}:{port}{MCP_PATH}")
    settings = replace(settings, mcp_servers={**settings.mcp_servers, "sample": sample})
    try:
        async with start_keystile(settings, database_url) as ks:
            yield ks
    finally:
        await runner.cleanup()


async def test_every_operation_answers_as_documented(with_sample: Keystile) -> None:
    ks = with_sample
    doc = openapi_document()
    c = Checker(ks, doc)
    boss = await ks.user("boss@example.com", role="admin", servers=["*"])
    admin_issued = await ks.key(boss, name="admin", permissions=("admin", "keys", "mcp", "chat"))
    admin = admin_issued.key
    member = await ks.user("member@example.com", servers=["github"])
    self_issued = await ks.key(member, name="self", permissions=("keys", "mcp"))
    self_service = self_issued.key
    mcp_only = (await ks.key(member, name="mcp only", permissions=("mcp",))).key

    # Plumbing, with no key.
    assert await c.call("GET", "/healthz", 200, None) == {"status": "ok"}
    async with ks.http.get(ks.admin + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
    c.called.add(("GET", "/metrics"))
    await c.call("GET", "/openapi.json", 200, None)
    for path, template, media in [
        ("/admin/api-keys", "/admin/api-keys", "text/html"),
        ("/admin/static/app.js", "/admin/static/{name}", "text/javascript"),
    ]:
        async with ks.http.get(ks.admin + path) as resp:
            assert resp.status == 200
            assert resp.content_type == media
        responses = doc["paths"][template]["get"]["responses"]
        assert media in responses["200"]["content"]
        c.called.add(("GET", template))

    # Keys.
    await c.call("GET", "/api/keys", 401, None)
    create = {
        "name": "ci",
        "description": "for CI",
        "servers": ["github"],
        "permissions": ["mcp", "chat"],
        "valid_from": None,
        "expires_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        "user_id": member.id,
        "rate_limit": {"requests": 10, "per_seconds": 60},
        "allowed_cidrs": ["10.0.0.0/8"],
        "is_active": True,
    }
    c.check_request("POST", "/api/keys", create)
    made = await c.call("POST", "/api/keys", 201, admin, body=create)
    key_id = made["id"]
    await c.call("POST", "/api/keys", 409, admin, body=create)
    await c.call("POST", "/api/keys", 400, admin, raw=b"{not json")
    await c.call("POST", "/api/keys", 422, admin, body={"name": "x", "servers": [], "nope": 1})
    await c.call("POST", "/api/keys", 403, self_service, body={**create, "user_id": boss.id})
    listed = await c.call("GET", "/api/keys", 200, admin, query="all=true")
    assert key_id in {k["id"] for k in listed}
    await c.call("GET", "/api/keys", 403, self_service, query="all=true")
    await c.call("GET", "/api/keys", 422, admin, query="status=bogus")
    await c.call("GET", "/api/keys/{id}", 200, admin, id=key_id)
    await c.call("GET", "/api/keys/{id}", 404, admin, id="nosuchkey")
    await c.call("PATCH", "/api/keys/{id}", 200, admin, body={"description": "x"}, id=key_id)
    await c.call("POST", "/api/keys/{id}/disable", 200, admin, id=key_id)
    await c.call("POST", "/api/keys/{id}/enable", 200, admin, id=key_id)
    await c.call("POST", "/api/keys/{id}/rotate", 200, admin, body={"grace_seconds": 60}, id=key_id)
    await c.call("DELETE", "/api/keys/{id}", 204, admin, id=key_id)
    await c.call("PATCH", "/api/keys/{id}", 409, admin, body={"name": "again"}, id=key_id)
    revoked = await c.call("GET", "/api/keys", 200, admin, query="all=1&status=revoked")
    assert [k["status"] for k in revoked] == ["revoked"]

    # Users, servers, audit.
    await c.call("GET", "/api/users", 403, self_service)
    await c.call("GET", "/api/users", 200, admin)
    new_user = {"email": "new@example.com", "display_name": "New", "role": "member"}
    c.check_request("POST", "/api/users", new_user)
    user_id = (await c.call("POST", "/api/users", 201, admin, body=new_user))["id"]
    await c.call("POST", "/api/users", 409, admin, body=new_user)
    await c.call("GET", "/api/users/{id}", 200, admin, id=user_id)
    await c.call(
        "PATCH", "/api/users/{id}", 200, admin, body={"display_name": "Renamed"}, id=user_id
    )
    await c.call("PATCH", "/api/users/{id}", 409, admin, body={"role": "member"}, id=boss.id)
    await c.call(
        "PUT", "/api/users/{id}/servers", 200, admin, body={"servers": ["gitlab"]}, id=user_id
    )
    tools = {"tools": ["gitlab/*", "!gitlab/delete_*"]}
    assert (await c.call("PUT", "/api/users/{id}/tools", 200, admin, body=tools, id=user_id))[
        "tools"
    ] == tools["tools"]
    await c.call("PUT", "/api/users/{id}/tools", 422, admin, body=tools, id=boss.id)
    await c.call("PUT", "/api/users/{id}/tools", 422, admin, body={"tools": ["x"]}, id=user_id)
    listed = await c.call("GET", "/api/servers/{name}/tools", 200, admin, name="sample")
    assert {t["name"] for t in listed["tools"]} >= {"echo", "add", "whoami"}
    await c.call("GET", "/api/servers/{name}/tools", 502, admin, name="github")  # not MCP
    await c.call("GET", "/api/servers/{name}/tools", 404, admin, name="nope")
    await c.call("GET", "/api/servers/{name}/tools", 404, self_service, name="gitlab")
    await c.call("DELETE", "/api/users/{id}", 204, admin, id=user_id)
    await c.call("GET", "/api/users/{id}", 404, admin, id=user_id)
    servers = await c.call("GET", "/api/servers", 200, self_service)
    assert {s["name"]: s["granted"] for s in servers}["github"] is True
    page = await c.call("GET", "/api/audit", 200, admin, query="limit=2")
    assert page["next_before"] == page["events"][-1]["id"]
    await c.call("GET", "/api/audit", 200, admin, query=f"before={page['next_before']}")
    await c.call("GET", "/api/audit", 422, admin, query="limit=0")
    await c.call("GET", "/api/audit", 403, self_service)

    # Usage and call records, from records written through the store.
    now = datetime.now(UTC).timestamp()
    await write_calls(
        ks.runtime.pool,
        [
            CallRecord(
                time=now - n * 600,
                request_id=f"req-{n}",
                workspace_id=ks.actor.workspace_id,
                user_id=owner.record.user_id,
                key_id=owner.record.id,
                route="mcp" if n % 4 else "chat",
                server="github" if n % 4 else None,
                mcp_method="tools/call" if n % 4 else None,
                tool="=search" if n % 4 else None,  # a formula-like name, quoted in CSV
                status=200 if n % 3 else 502,
                duration_ms=3.5 * n,
                bytes_in=100,
                bytes_out=1000 + n,
                client="127.0.0.1",
            )
            for n in range(12)
            for owner in (admin_issued, self_issued)
        ],
    )
    total = await c.call("GET", "/api/usage", 200, admin)
    assert [row["requests"] for row in total["rows"]] == [24]
    await c.call("GET", "/api/usage", 200, self_service, query="group_by=day")
    by_tool = await c.call(
        "GET",
        "/api/usage",
        200,
        admin,
        query=f"group_by=tool,status&server=github&key_id={self_issued.record.id}",
    )
    assert {row["tool"] for row in by_tool["rows"]} == {"=search"}
    window = "from=2030-01-01T10:20:00Z&to=2030-01-02T00:00:00Z&group_by=hour,key"
    assert (await c.call("GET", "/api/usage", 200, admin, query=window))["rows"] == []
    async with ks.http.get(
        ks.admin + "/api/usage?format=csv&group_by=tool",
        headers={"Authorization": f"Bearer {admin}"},
    ) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/csv"
        lines = (await resp.text()).split("\r\n")
    assert lines[0] == "tool,requests,errors,p50_ms,p95_ms,bytes_in,bytes_out"
    assert "text/csv" in doc["paths"]["/api/usage"]["get"]["responses"]["200"]["content"]
    for query in (
        "group_by=tool,status,day",
        "group_by=week",
        "from=yesterday",
        "from=2030-01-02T00:00:00Z&to=2030-01-01T00:00:00Z",
        "format=xml",
        "nope=1",
    ):
        await c.call("GET", "/api/usage", 422, admin, query=query)
    await c.call("GET", "/api/usage", 404, self_service, query=f"key_id={admin_issued.record.id}")
    await c.call("GET", "/api/usage", 401, None)
    await c.call("GET", "/api/usage", 403, mcp_only)
    page = await c.call("GET", "/api/calls", 200, admin, query="limit=5")
    assert len(page["calls"]) == 5 and page["next_before"] == page["calls"][-1]["id"]
    rest = await c.call(
        "GET", "/api/calls", 200, admin, query=f"before={page['next_before']}&limit=500"
    )
    assert len(rest["calls"]) == 19 and rest["next_before"] is None
    mine = await c.call("GET", "/api/calls", 200, self_service, query="status=502&tool==search")
    assert {call["key_id"] for call in mine["calls"]} == {self_issued.record.id}
    for query in ("status=99", "limit=501", "before=0", "limit=x", "key_id=", "verbose=1"):
        await c.call("GET", "/api/calls", 422, admin, query=query)
    await c.call("GET", "/api/calls", 404, self_service, query=f"user_id={boss.id}")
    await c.call("GET", "/api/calls", 403, mcp_only)

    # better-auth compatible routes.
    await c.call("GET", "/api/auth/api-key/list", 200, self_service)
    auth_create = {"name": "from better-auth", "expiresIn": 3600, "permissions": ["mcp"]}
    c.check_request("POST", "/api/auth/api-key/create", auth_create)
    auth_key = await c.call("POST", "/api/auth/api-key/create", 200, self_service, body=auth_create)
    await c.call("POST", "/api/auth/api-key/create", 409, self_service, body=auth_create)
    await c.call(
        "POST", "/api/auth/api-key/delete", 200, self_service, body={"keyId": auth_key["id"]}
    )
    await c.call("POST", "/api/auth/api-key/delete", 404, self_service, body={"keyId": "nokey"})

    # CMS compatible routes.
    cms = "/{workspace}/admin/api-keys"
    cms_one = cms + "/{id}"
    await c.call("GET", cms, 200, admin, workspace="default")
    await c.call("GET", cms, 404, admin, workspace="elsewhere")
    cms_create = {"name": "from cms", "isActive": True, "validFrom": None, "permissions": ["mcp"]}
    c.check_request("POST", cms, cms_create)
    await c.call("POST", cms, 200, admin, body=cms_create, workspace="default")
    await c.call(
        "POST",
        cms,
        422,
        admin,
        body={"name": "late", "validTo": "2001-01-01T00:00:00Z"},
        workspace="default",
    )
    cms_id = next(
        k["id"]
        for k in await c.call("GET", cms, 200, admin, workspace="default")
        if k["name"] == "from cms"
    )
    await c.call("GET", cms_one, 200, admin, workspace="default", id=cms_id)
    await c.call(
        "PUT", cms_one, 200, admin, body={"isActive": False}, workspace="default", id=cms_id
    )
    await c.call("DELETE", cms_one, 204, admin, workspace="default", id=cms_id)
    await c.call("PUT", cms_one, 409, admin, body={"name": "x"}, workspace="default", id=cms_id)

    assert c.called == _document_operations(doc), "every documented operation was exercised"
