"""The OpenAPI 3.1 document of the admin API, served at `GET /openapi.json`.

Built from small pieces: field schemas shared by requests and responses, component schemas for
what the API returns, one reusable response per error status, and one table of routes per family
(keys, users, servers and audit, plumbing, compatibility). The request bodies take their field
lists from admin.service, so a field added there without a schema here fails at once.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Collection, Iterable
from typing import Any

from admin import usage, validate
from admin.service import (
    KEY_CREATE_FIELDS,
    KEY_PATCH_FIELDS,
    KEY_STATUSES,
    ROTATE_FIELDS,
    USER_CREATE_FIELDS,
    USER_PATCH_FIELDS,
)
from gateway.calls import DURATION_BUCKETS_MS
from gateway.models import ALL_SERVERS, PERMISSIONS
from gateway.usage_store import MAX_GROUPS

Schema = dict[str, Any]

JSON = "application/json"
AUTH_MAX_EXPIRES_IN = validate.MAX_EXPIRES_IN
RATE_LIMIT_MAX = validate.MAX_RATE_LIMIT
MAX_EMAIL = validate.MAX_EMAIL
MAX_DISPLAY_NAME = validate.MAX_DISPLAY_NAME
AUDIT_MAX_LIMIT = validate.AUDIT_MAX_LIMIT
AUDIT_DEFAULT_LIMIT = validate.AUDIT_DEFAULT_LIMIT
AUDIT_MAX_BEFORE = 2**62

# --- small builders ---


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    """The schema, or JSON null."""
    if isinstance(schema.get("type"), str) and "enum" not in schema:
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _object(
    properties: dict[str, Schema],
    *,
    required: Iterable[str] = (),
    closed: bool = False,
    description: str | None = None,
) -> Schema:
    schema: Schema = {"type": "object"}
    if description is not None:
        schema["description"] = description
    schema["properties"] = properties
    names = list(required)
    if names:
        schema["required"] = names
    if closed:
        schema["additionalProperties"] = False
    return schema


def _record(properties: dict[str, Schema], *, description: str | None = None) -> Schema:
    """A response object that always carries every one of its properties."""
    return _object(properties, required=properties, description=description)


def _pick(fields: dict[str, Schema], names: Collection[str]) -> dict[str, Schema]:
    """Exactly these fields' schemas, in the order `fields` lists them."""
    missing = sorted(set(names) - set(fields))
    if missing:
        raise KeyError(f"no schema for request field(s) {', '.join(missing)}")
    return {name: schema for name, schema in fields.items() if name in names}


def _body(schema_name: str) -> Schema:
    return {"required": True, "content": {JSON: {"schema": _ref(schema_name)}}}


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


# --- field schemas (requests and responses share them) ---

STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
SERVERS: Schema = _array(
    STRING,
    description=(
        f'["{ALL_SERVERS}"] alone (every server the user can reach, including servers added '
        "later), or names of configured servers (see GET /api/servers)."
    ),
    examples=[[ALL_SERVERS], ["github", "gitlab"]],
)
PERMISSION_LIST: Schema = _array(_ref("Permission"))
TOOLS: Schema = _nullable(
    _array(
        STRING,
        description=(
            'Tool patterns "<server>/<tool>": `*` matches any run of characters (`/` included), '
            "a leading `!` excludes. A list of only exclusions starts from every tool; an empty "
            "list allows none. null: every tool of the servers in scope."
        ),
        examples=[["github/search_*", "!github/delete_*"]],
    )
)
WINDOW_NOTE = (
    "ISO 8601; a trailing Z is fine and a timestamp without an offset is taken as UTC. "
    "null: no bound."
)

KEY_FIELD_SCHEMAS: dict[str, Schema] = {
    "name": {
        "type": "string",
        "minLength": 1,
        "maxLength": validate.MAX_NAME,
        "description": "Unique among the user's live keys; surrounding whitespace is trimmed.",
    },
    "description": {"type": "string", "maxLength": validate.MAX_DESCRIPTION},
    "servers": SERVERS,
    "permissions": {**PERMISSION_LIST, "description": 'Default ["mcp"].'},
    "valid_from": {**_nullable(TIMESTAMP), "description": "Not usable before. " + WINDOW_NOTE},
    "expires_at": {
        **_nullable(TIMESTAMP),
        "description": "Not usable from; must be in the future. " + WINDOW_NOTE,
    },
    "user_id": {
        **_nullable(STRING),
        "description": "Whose key (admins only for another user); default: the caller's user.",
    },
    "rate_limit": _nullable(_ref("RateLimit")),
    "allowed_cidrs": _nullable(_array(STRING, examples=[["10.0.0.0/8", "2001:db8::/32"]])),
    "allowed_origins": {
        **_nullable(_array(STRING, examples=[["https://app.example.com"]])),
        "description": "Browser origins the key may be used from (a request with another "
        "Origin gets 403 origin_not_allowed; requests without Origin are not affected). "
        "null: any.",
    },
    "is_active": {**BOOLEAN, "description": "false: disabled (reversible). Default true."},
    "tools": {
        **TOOLS,
        "description": "Which tools the key may call (SPEC §6). " + str(TOOLS["description"]),
    },
}

USER_FIELD_SCHEMAS: dict[str, Schema] = {
    "email": {
        "type": "string",
        "maxLength": MAX_EMAIL,
        "pattern": r"^[^@\s]{1,64}@[^@\s]{1,255}$",
        "description": "Unique in the workspace.",
    },
    "display_name": {"type": "string", "maxLength": MAX_DISPLAY_NAME},
    "role": {**_ref("Role"), "description": 'Default "member".'},
    "servers": {**SERVERS, "description": "The user's server grants; default [] (none)."},
    "is_active": {**BOOLEAN, "description": "false stops every key of the user at once."},
    "tools": {
        **TOOLS,
        "description": "Which tools the user's keys may call; must stay null for an admin. "
        + str(TOOLS["description"]),
    },
}

ROTATE_FIELD_SCHEMAS: dict[str, Schema] = {
    "grace_seconds": {
        "type": "number",
        "minimum": 0,
        "maximum": validate.MAX_GRACE_SECONDS,
        "default": 0,
        "description": "How long the old secret keeps working.",
    },
}

CMS_FIELD_SCHEMAS: dict[str, Schema] = {
    "name": KEY_FIELD_SCHEMAS["name"],
    "isActive": BOOLEAN,
    "validFrom": _nullable(TIMESTAMP),
    "validTo": _nullable(TIMESTAMP),
    "permissions": PERMISSION_LIST,
}

# --- component schemas ---


def _value_schemas() -> dict[str, Schema]:
    return {
        "Permission": {"type": "string", "enum": list(PERMISSIONS)},
        "Role": {"type": "string", "enum": ["admin", "member"]},
        "KeyStatus": {
            "type": "string",
            "enum": sorted(KEY_STATUSES),
            "description": "Derived: revoked, else disabled, else expired, else pending "
            "(before valid_from), else active.",
        },
        "RateLimit": _object(
            {
                "requests": {"type": "integer", "minimum": 1, "maximum": RATE_LIMIT_MAX},
                "per_seconds": {"type": "integer", "minimum": 1, "maximum": RATE_LIMIT_MAX},
            },
            required=["requests", "per_seconds"],
            closed=True,
        ),
        "Error": _object(
            {
                "error": {
                    "type": "string",
                    "description": "Machine code, e.g. invalid_api_key, forbidden, not_found, "
                    "invalid_json, invalid_request, conflict, key_revoked, last_admin, "
                    "store_unavailable, internal_error.",
                },
                "message": {"type": "string", "description": "A human sentence."},
                "field": {"type": "string", "description": "The offending request field."},
            },
            required=["error", "message"],
        ),
    }


def _response_schemas() -> dict[str, Schema]:
    return {
        "KeyOwner": _object(
            {"id": STRING, "email": STRING, "display_name": STRING},
            required=["id"],
            description="The key's user; only the id once the user is deleted.",
        ),
        "ApiKey": _record(
            {
                "id": STRING,
                "user_id": STRING,
                "workspace_id": STRING,
                "name": STRING,
                "description": STRING,
                "prefix": {
                    "type": "string",
                    "description": "ks1-<userId>-<keyId>- plus the secret's first 4 characters "
                    "and an ellipsis; the full key is shown only once. An OAuth grant's is "
                    "kso1-<userId>-<grantId>-…",
                },
                "servers": SERVERS,
                "permissions": PERMISSION_LIST,
                "valid_from": _nullable(TIMESTAMP),
                "expires_at": _nullable(TIMESTAMP),
                "is_active": BOOLEAN,
                "status": _ref("KeyStatus"),
                "created_at": TIMESTAMP,
                "updated_at": TIMESTAMP,
                "last_used_at": _nullable(TIMESTAMP),
                "revoked_at": _nullable(TIMESTAMP),
                "rate_limit": _nullable(_ref("RateLimit")),
                "allowed_cidrs": _nullable(_array(STRING)),
                "allowed_origins": _nullable(_array(STRING)),
                "tools": TOOLS,
                "kind": {
                    "type": "string",
                    "enum": ["key", "oauth"],
                    "description": "key: an API key. oauth: a grant an MCP client holds "
                    "through the OAuth flow (its name is the client's; one server, permission "
                    "mcp, never broader than the key that approved it); revoke it with DELETE. "
                    "Its prefix starts kso1-; its servers and permissions cannot change, and it "
                    "cannot be rotated (409 oauth_grant).",
                },
                "client_id": _nullable(
                    {"type": "string", "description": "An OAuth grant's registered client."}
                ),
                "client_name": _nullable(
                    {
                        "type": "string",
                        "description": "An OAuth grant's client, by the name it registered "
                        "(as shown on the consent page).",
                    }
                ),
                "user": _ref("KeyOwner"),
            }
        ),
        "ApiKeyWithSecret": {
            "allOf": [
                _ref("ApiKey"),
                _record(
                    {"key": {"type": "string", "description": "The full key, shown only now."}}
                ),
            ]
        },
        "User": _record(
            {
                "id": STRING,
                "workspace_id": STRING,
                "email": STRING,
                "display_name": STRING,
                "role": _ref("Role"),
                "is_active": BOOLEAN,
                "servers": SERVERS,
                "tools": TOOLS,
                "created_at": TIMESTAMP,
            }
        ),
        "ServerTools": _record(
            {
                "server": STRING,
                "tools": _array(
                    _record({"name": STRING, "description": _nullable(STRING)}),
                    description="As the server lists them (tools/list, every page).",
                ),
                "fetched_at": {
                    **TIMESTAMP,
                    "description": "When the server was asked; answers are kept 60 s.",
                },
            }
        ),
        "Server": _record(
            {
                "name": STRING,
                "granted": {**BOOLEAN, "description": "Whether the caller's user may reach it."},
            }
        ),
        "AuditEvent": _record(
            {
                "id": {"type": "integer"},
                "action": {
                    "type": "string",
                    "examples": ["key.create", "key.update", "key.revoke", "user.servers"],
                },
                "target_type": {"type": "string", "examples": ["key", "user", "workspace"]},
                "target_id": STRING,
                "actor_user_id": _nullable(STRING),
                "actor_key_id": _nullable(STRING),
                "changes": {"type": "object"},
                "created_at": TIMESTAMP,
            },
            description="actor_user_id null: the system (the CLI).",
        ),
        "AuditPage": _record(
            {
                "events": _array(_ref("AuditEvent"), description="Newest first."),
                "next_before": {
                    **_nullable({"type": "integer"}),
                    "description": "Pass as ?before= for the next page; null on a short page.",
                },
            }
        ),
        "Health": _record({"status": {"type": "string", "const": "ok"}}),
        **_usage_schemas(),
    }


INTEGER: Schema = {"type": "integer", "minimum": 0}
PERCENTILE_NOTE = (
    "Estimated from hourly duration buckets (upper bounds "
    + ", ".join(f"{b:g}" for b in DURATION_BUCKETS_MS)
    + " ms, then open-ended): linear within the bucket the percentile falls in, the lower "
    "bound for the open-ended one. null when there were no requests."
)
# The group fields a usage row can carry (admin.usage.GROUP_FIELDS names them).
GROUP_FIELD_SCHEMAS: dict[str, Schema] = {
    "key_id": STRING,
    "user_id": STRING,
    "server": {**_nullable(STRING), "description": "null: chat and /me requests."},
    "tool": {**_nullable(STRING), "description": "null: requests that call no tool."},
    "status": {"type": "integer", "minimum": 100, "maximum": 599},
    "hour": {**TIMESTAMP, "description": "The start of the UTC hour."},
    "day": {"type": "string", "format": "date", "description": "The UTC day."},
}


def _usage_schemas() -> dict[str, Schema]:
    metrics: dict[str, Schema] = {
        "requests": INTEGER,
        "errors": {**INTEGER, "description": "Requests answered with a status >= 400."},
        "p50_ms": {**_nullable({"type": "number"}), "description": PERCENTILE_NOTE},
        "p95_ms": {**_nullable({"type": "number"}), "description": PERCENTILE_NOTE},
        "bytes_in": {**INTEGER, "description": "Request body bytes received from clients."},
        "bytes_out": {**INTEGER, "description": "Response body bytes sent to clients."},
    }
    row = _object(
        {**_pick(GROUP_FIELD_SCHEMAS, usage.GROUP_FIELDS), **metrics},
        required=metrics,
        closed=True,
        description="The fields of the group_by dimensions first (in the order given), then "
        "the metrics; without group_by, one row totals the window.",
    )
    return {
        "UsageRow": row,
        "Usage": _record(
            {
                "from": {
                    **TIMESTAMP,
                    "description": "The window's start: `from` rounded down "
                    "to the start of its UTC hour.",
                },
                "to": {
                    **TIMESTAMP,
                    "description": "The window's end (exclusive): `to` rounded "
                    "up to the next UTC hour.",
                },
                "rows": _array(_ref("UsageRow"), description="Ordered by the group fields."),
            }
        ),
        "Call": _record(
            {
                "id": {"type": "integer", "description": "Increasing; pages go by it."},
                "time": {**TIMESTAMP, "description": "When the request arrived."},
                "request_id": {"type": "string", "description": "X-Request-Id, as sent upstream."},
                "workspace_id": STRING,
                "user_id": STRING,
                "key_id": STRING,
                "route": {"type": "string", "enum": ["mcp", "chat", "me"]},
                "server": _nullable(STRING),
                "mcp_method": {
                    **_nullable(STRING),
                    "description": "From Mcp-Method, else a JSON-RPC request body's method.",
                },
                "tool": {
                    **_nullable(STRING),
                    "description": "From Mcp-Name, else a tools/call body's params.name; "
                    "arguments are never recorded.",
                },
                "status": {"type": "integer"},
                "duration_ms": {"type": "number", "minimum": 0},
                "bytes_in": INTEGER,
                "bytes_out": INTEGER,
                "client": {"type": "string", "description": "The client's address."},
            },
            description="One data-plane request made with a verified key (SPEC §7).",
        ),
        "CallPage": _record(
            {
                "calls": _array(_ref("Call"), description="Newest first."),
                "next_before": {
                    **_nullable({"type": "integer"}),
                    "description": "Pass as ?before= for the next page; null when no older "
                    "call matches.",
                },
            }
        ),
    }


def _request_schemas() -> dict[str, Schema]:
    return {
        "KeyCreate": _object(
            _pick(KEY_FIELD_SCHEMAS, KEY_CREATE_FIELDS), required=["name", "servers"], closed=True
        ),
        "KeyUpdate": _object(
            _pick(KEY_FIELD_SCHEMAS, KEY_PATCH_FIELDS),
            closed=True,
            description="Only the fields given change; {} changes nothing.",
        ),
        "KeyRotate": _object(_pick(ROTATE_FIELD_SCHEMAS, ROTATE_FIELDS), closed=True),
        "UserCreate": _object(
            _pick(USER_FIELD_SCHEMAS, USER_CREATE_FIELDS), required=["email"], closed=True
        ),
        "UserUpdate": _object(_pick(USER_FIELD_SCHEMAS, USER_PATCH_FIELDS), closed=True),
        "UserServers": _object(
            _pick(USER_FIELD_SCHEMAS, {"servers"}), required=["servers"], closed=True
        ),
        "UserTools": _object(_pick(USER_FIELD_SCHEMAS, {"tools"}), required=["tools"], closed=True),
    }


def _compat_schemas() -> dict[str, Schema]:
    return {
        "AuthApiKey": _record(
            {
                "id": STRING,
                "name": STRING,
                "start": {"type": "string", "description": "The masked key (prefix)."},
                "userId": STRING,
                "enabled": {**BOOLEAN, "description": 'true only when status is "active".'},
                "permissions": PERMISSION_LIST,
                "expiresAt": _nullable(TIMESTAMP),
                "createdAt": TIMESTAMP,
                "updatedAt": TIMESTAMP,
                "lastRequest": _nullable(TIMESTAMP),
            }
        ),
        "AuthApiKeyWithSecret": {
            "allOf": [
                _ref("AuthApiKey"),
                _record({"key": STRING}),
            ]
        },
        "AuthKeyCreate": _object(
            {
                "name": KEY_FIELD_SCHEMAS["name"],
                "expiresIn": {
                    **_nullable({"type": "number"}),
                    "minimum": 1,
                    "maximum": AUTH_MAX_EXPIRES_IN,
                    "description": "Seconds from now; null or absent: never expires.",
                },
                "permissions": {
                    **PERMISSION_LIST,
                    "description": 'Default: "mcp" and "chat", as far as the caller holds them.',
                },
            },
            required=["name"],
            closed=True,
            description='The key gets servers ["*"].',
        ),
        "AuthKeyDelete": _object(
            {"keyId": {"type": "string", "minLength": 1}}, required=["keyId"], closed=True
        ),
        "AuthDeleted": _record({"success": {"type": "boolean", "const": True}}),
        "CmsApiKey": _record(
            {
                "id": STRING,
                "name": STRING,
                "token": {"type": "string", "description": "The masked key (prefix)."},
                "isActive": {**BOOLEAN, "description": "Not disabled and not revoked."},
                "validFrom": _nullable(TIMESTAMP),
                "validTo": _nullable(TIMESTAMP),
                "permissions": PERMISSION_LIST,
            }
        ),
        "CmsKeyCreate": _object(
            CMS_FIELD_SCHEMAS,
            required=["name"],
            closed=True,
            description='The key gets servers ["*"]; permissions default as for AuthKeyCreate.',
        ),
        "CmsKeyUpdate": _object(
            CMS_FIELD_SCHEMAS,
            closed=True,
            description="Only the fields given change (a partial update).",
        ),
        "CmsCreated": _record(
            {"result": {"type": "string", "description": "The full key, shown only now."}}
        ),
    }


# --- errors, parameters, security ---

WWW_AUTHENTICATE: Schema = {"schema": STRING, "description": 'Bearer realm="keystile", ...'}

ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadJson", "The body is not a JSON object (invalid_json)."),
    401: (
        "Unauthorized",
        "No key, or a malformed, unknown, expired, pending, disabled or revoked one "
        "(invalid_api_key).",
    ),
    403: (
        "Forbidden",
        "The key lacks what this needs: 'keys' or 'admin', or an admin key of an admin user "
        "(forbidden).",
    ),
    404: ("NotFound", "No such record within the caller's reach (not_found)."),
    409: (
        "Conflict",
        "Conflicts with the current state: a name or email taken (conflict), a revoked key "
        "(key_revoked), or the workspace's last active admin (last_admin).",
    ),
    413: ("TooLarge", "The body is over 1 MiB."),
    422: (
        "Invalid",
        "A field or query parameter is missing, unknown or invalid (invalid_request); `field` "
        "names it.",
    ),
    502: ("BadGateway", "The server could not be reached or answered badly (bad_gateway)."),
    503: (
        "StoreUnavailable",
        "The key store cannot be reached and the key is not cached (store_unavailable).",
    ),
}
# What every authenticated route can answer, and every route that reads a body.
AUTH_ERRORS = (401, 403, 503)
BODY_ERRORS = (400, 413, 422)


def _error_responses() -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for status, (name, description) in ERRORS.items():
        response = _json(description, _ref("Error"))
        if status in (401, 403):
            response["headers"] = {"WWW-Authenticate": WWW_AUTHENTICATE}
        elif status == 503:
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        out[name] = response
    return out


def _path_param(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": STRING,
    }


PARAMETERS: dict[str, Schema] = {
    "KeyId": _path_param("id", "The key's id."),
    "UserId": _path_param("id", "The user's id."),
    "Workspace": _path_param("workspace", "The caller's workspace, by name or id."),
}


def _param(name: str) -> Schema:
    return {"$ref": f"#/components/parameters/{name}"}


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


SECURITY_SCHEMES: dict[str, Schema] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <api key> (a ks1-... key with 'keys' or 'admin').",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same key in X-API-Key, used when no Authorization header is sent.",
    },
}
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {"apiKeyHeader": []}]

# --- operations ---


def _operation(
    operation_id: str,
    summary: str,
    tag: str,
    *,
    ok: int,
    result: Schema | None = None,
    result_description: str = "OK.",
    body: Schema | None = None,
    parameters: Iterable[Schema] = (),
    errors: Iterable[int] = (),
    public: bool = False,
    description: str | None = None,
) -> Schema:
    """One operation. Authenticated ones (not `public`) can also answer 401, 403 and 503, and
    those that read a body 400, 413 and 422; `errors` adds the route's own statuses."""
    op: Schema = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description is not None:
        op["description"] = description
    params = list(parameters)
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    responses: Schema = {}
    if result is None:
        responses[str(ok)] = {"description": result_description}
    elif "content" in result:
        responses[str(ok)] = result
    else:
        responses[str(ok)] = _json(result_description, result)
    statuses = set(errors) | (set() if public else set(AUTH_ERRORS))
    if body is not None:
        statuses |= set(BODY_ERRORS)
    for status in sorted(statuses):
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    op["responses"] = responses
    if public:
        op["security"] = []
    return op


def _key_paths() -> dict[str, Schema]:
    key = _ref("ApiKey")
    key_id = [_param("KeyId")]
    listing = [
        _query("all", BOOLEAN, "Admins: every key of the workspace (1/0 work too)."),
        _query("user_id", STRING, "Admins: this user's keys (default: the caller's own)."),
        _query(
            "status",
            _ref("KeyStatus"),
            "Only keys in this status; revoked keys are listed only when asked for.",
        ),
    ]
    toggle = "The key (409 if it is revoked)."
    return {
        "/api/keys": {
            "get": _operation(
                "listKeys",
                "List keys",
                "keys",
                ok=200,
                result=_array(key),
                parameters=listing,
                errors=[422],
                description="The caller's own keys; admins may ask for anyone's. "
                "403 when a non-admin asks for other users' keys.",
            ),
            "post": _operation(
                "createKey",
                "Create a key",
                "keys",
                ok=201,
                result=_ref("ApiKeyWithSecret"),
                result_description="Created; `key` is the full key, shown only now.",
                body=_body("KeyCreate"),
                errors=[409],
                description="403 when a non-admin names another user; 422 when it asks for "
                "permissions the calling key lacks.",
            ),
        },
        "/api/keys/{id}": {
            "parameters": key_id,
            "get": _operation("getKey", "Get a key", "keys", ok=200, result=key, errors=[404]),
            "patch": _operation(
                "updateKey",
                "Change a key",
                "keys",
                ok=200,
                result=key,
                body=_body("KeyUpdate"),
                errors=[404, 409],
            ),
            "delete": _operation(
                "revokeKey",
                "Revoke a key",
                "keys",
                ok=204,
                result_description="Revoked (also when it already was): permanent and immediate.",
                errors=[404],
            ),
        },
        "/api/keys/{id}/enable": {
            "parameters": key_id,
            "post": _operation(
                "enableKey",
                "Enable a key",
                "keys",
                ok=200,
                result=key,
                errors=[404, 409, 422],
                description=toggle,
            ),
        },
        "/api/keys/{id}/disable": {
            "parameters": key_id,
            "post": _operation(
                "disableKey",
                "Disable a key",
                "keys",
                ok=200,
                result=key,
                errors=[404, 409],
                description=toggle,
            ),
        },
        "/api/keys/{id}/rotate": {
            "parameters": key_id,
            "post": _operation(
                "rotateKey",
                "Rotate a key's secret",
                "keys",
                ok=200,
                result=_ref("ApiKeyWithSecret"),
                result_description="The key with its new secret in `key`, shown only now.",
                body={**_body("KeyRotate"), "required": False},
                errors=[404, 409],
            ),
        },
    }


def _user_paths() -> dict[str, Schema]:
    user = _ref("User")
    user_id = [_param("UserId")]
    admin_only = "Admin only."
    return {
        "/api/users": {
            "get": _operation(
                "listUsers",
                "List users",
                "users",
                ok=200,
                result=_array(user),
                description=admin_only,
            ),
            "post": _operation(
                "createUser",
                "Create a user",
                "users",
                ok=201,
                result=user,
                result_description="Created.",
                body=_body("UserCreate"),
                errors=[409],
                description=admin_only,
            ),
        },
        "/api/users/{id}": {
            "parameters": user_id,
            "get": _operation(
                "getUser",
                "Get a user",
                "users",
                ok=200,
                result=user,
                errors=[404],
                description=admin_only,
            ),
            "patch": _operation(
                "updateUser",
                "Change a user",
                "users",
                ok=200,
                result=user,
                body=_body("UserUpdate"),
                errors=[404, 409],
                description=admin_only + " 409 when it would leave no active admin.",
            ),
            "delete": _operation(
                "deleteUser",
                "Delete a user",
                "users",
                ok=204,
                result_description="Deleted; every key of the user stops at once.",
                errors=[404, 409],
                description=admin_only + " 409 when it would leave no active admin.",
            ),
        },
        "/api/users/{id}/servers": {
            "parameters": user_id,
            "put": _operation(
                "setUserServers",
                "Set a user's server grants",
                "users",
                ok=200,
                result=user,
                body=_body("UserServers"),
                errors=[404],
                description=admin_only,
            ),
        },
        "/api/users/{id}/tools": {
            "parameters": user_id,
            "put": _operation(
                "setUserTools",
                "Set which tools a user's keys may call",
                "users",
                ok=200,
                result=user,
                body=_body("UserTools"),
                errors=[404],
                description=admin_only + " 422 for an admin (admins hold every tool).",
            ),
        },
    }


def _other_paths() -> dict[str, Schema]:
    audit_params = [
        _query(
            "limit",
            {
                "type": "integer",
                "minimum": 1,
                "maximum": AUDIT_MAX_LIMIT,
                "default": AUDIT_DEFAULT_LIMIT,
            },
            "Events per page.",
        ),
        _query(
            "before",
            {"type": "integer", "minimum": 1, "maximum": AUDIT_MAX_BEFORE},
            "Only events with a smaller id: the previous page's next_before.",
        ),
    ]
    return {
        "/api/servers": {
            "get": _operation(
                "listServers",
                "List configured servers",
                "servers",
                ok=200,
                result=_array(_ref("Server")),
            ),
        },
        "/api/servers/{name}/tools": {
            "parameters": [_path_param("name", "A configured server's name.")],
            "get": _operation(
                "listServerTools",
                "The tools a server offers",
                "servers",
                ok=200,
                result=_ref("ServerTools"),
                errors=[404, 502],
                description="Discovered with the official MCP SDK client, using the server's "
                "configured headers. 404 for an unknown server or one the caller's user may "
                "not reach; 502 bad_gateway when the server cannot be reached.",
            ),
        },
        "/api/audit": {
            "get": _operation(
                "listAudit",
                "Read the audit trail",
                "audit",
                ok=200,
                result=_ref("AuditPage"),
                parameters=audit_params,
                errors=[422],
                description="Admin only. Who created, changed, revoked what, when; newest first.",
            ),
        },
        "/healthz": {
            "get": _operation(
                "health", "Liveness", "plumbing", ok=200, result=_ref("Health"), public=True
            ),
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "Prometheus metrics",
                "plumbing",
                ok=200,
                result={
                    "description": "Prometheus text exposition format.",
                    "content": {"text/plain": {"schema": STRING}},
                },
                public=True,
            ),
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                "plumbing",
                ok=200,
                result={"type": "object"},
                result_description="The OpenAPI 3.1 document of the admin API.",
                public=True,
            ),
        },
    }


def _filter_params(reach: str) -> list[Schema]:
    return [
        _query("key_id", STRING, f"Only this key's requests; 404 for a key {reach}."),
        _query("user_id", STRING, f"Only this user's keys' requests; 404 for a user {reach}."),
        _query("server", STRING, "Only requests to this MCP server."),
        _query("tool", STRING, "Only calls of this tool (its name, without the server)."),
    ]


def _usage_paths() -> dict[str, Schema]:
    reach = "outside the caller's reach (another user's, for a non-admin)"
    names = "|".join(usage.GROUP_BY)
    usage_params = [
        _query(
            "from",
            TIMESTAMP,
            "Start, ISO 8601 (no offset: UTC). Rounded down to the start of its UTC hour: "
            "usage is kept per hour. Default: `to` minus 7 days.",
        ),
        _query(
            "to",
            TIMESTAMP,
            "End, ISO 8601. Rounded up to the next UTC hour, so the current hour counts. "
            f"Default: now. Must be after `from`, at most {validate.USAGE_MAX_DAYS} days on.",
        ),
        _query(
            "group_by",
            {"type": "string", "pattern": f"^({names})(,({names}))?$"},
            "One or two dimensions, comma-separated: a row per group (key_id, user_id, "
            "server, tool, status, hour or day). Default: one row for the whole window. "
            f"At most {MAX_GROUPS} groups (422 past that: narrow the window or the filters).",
        ),
        *_filter_params(reach),
        _query(
            "format",
            {"type": "string", "enum": list(usage.FORMATS), "default": "json"},
            "csv: the same rows as text/csv with a header line (null cells empty).",
        ),
    ]
    calls_params = [
        *_filter_params(reach),
        _query("status", {"type": "integer", "minimum": 100, "maximum": 599}, "Only this status."),
        _query(
            "before",
            {"type": "integer", "minimum": 1, "maximum": validate.MAX_BEFORE},
            "Only calls with a smaller id: the previous page's next_before.",
        ),
        _query(
            "limit",
            {
                "type": "integer",
                "minimum": 1,
                "maximum": validate.CALLS_MAX_LIMIT,
                "default": validate.CALLS_DEFAULT_LIMIT,
            },
            "Calls per page.",
        ),
    ]
    visibility = (
        "Admins see their workspace; other keys (permission 'keys') the requests of their own "
        "user's keys. Unknown parameters are 422."
    )
    return {
        "/api/usage": {
            "get": _operation(
                "getUsage",
                "Usage totals",
                "usage",
                ok=200,
                result={
                    "description": "Totals per group over whole UTC hours.",
                    "content": {
                        JSON: {"schema": _ref("Usage")},
                        "text/csv": {
                            "schema": {
                                **STRING,
                                "examples": [
                                    "tool,requests,errors,p50_ms,p95_ms,bytes_in,bytes_out\r\n"
                                    "search,120,3,41.2,180.5,20480,996001\r\n"
                                ],
                            }
                        },
                    },
                },
                parameters=usage_params,
                errors=[404, 422],
                description="Requests, errors (status >= 400), estimated p50/p95 durations and "
                "bytes, from hourly roll-ups of the call records. " + visibility,
            ),
        },
        "/api/calls": {
            "get": _operation(
                "listCalls",
                "Call records",
                "usage",
                ok=200,
                result=_ref("CallPage"),
                parameters=calls_params,
                errors=[404, 422],
                description="One record per data-plane request made with a verified key, "
                "newest first. " + visibility,
            ),
        },
    }


def _page_paths() -> dict[str, Schema]:
    """The admin web page: static files, no key needed (the page signs in from the browser)."""
    return {
        "/admin/api-keys": {
            "get": _operation(
                "adminPage",
                "The admin web page",
                "page",
                ok=200,
                result={
                    "description": "The page (HTML); it calls this API with a key pasted in.",
                    "content": {"text/html": {"schema": STRING}},
                },
                public=True,
                description="Served with Content-Security-Policy: default-src 'self'.",
            ),
        },
        "/admin/static/{name}": {
            "parameters": [_path_param("name", "A file of the page, e.g. app.js or app.css.")],
            "get": _operation(
                "adminPageFile",
                "A file of the admin web page",
                "page",
                ok=200,
                result={
                    "description": "The file; names the page does not use answer 404.",
                    "content": {
                        media: {"schema": STRING}
                        for media in ("text/css", "text/javascript", "image/svg+xml")
                    },
                },
                public=True,
            ),
        },
    }


def _compat_paths() -> dict[str, Schema]:
    auth, cms = "compat-better-auth", "compat-cms"
    listed = "An admin's key lists every key of the workspace; others list their own."
    cms_key = _ref("CmsApiKey")
    cms_one = [_param("Workspace"), _param("KeyId")]
    return {
        "/api/auth/api-key/list": {
            "get": _operation(
                "authListKeys",
                "List keys (better-auth shape)",
                auth,
                ok=200,
                result=_array(_ref("AuthApiKey")),
                description=listed,
            ),
        },
        "/api/auth/api-key/create": {
            "post": _operation(
                "authCreateKey",
                "Create a key (better-auth shape)",
                auth,
                ok=200,
                result=_ref("AuthApiKeyWithSecret"),
                result_description="Created; `key` is the full key, shown only now.",
                body=_body("AuthKeyCreate"),
                errors=[409],
            ),
        },
        "/api/auth/api-key/delete": {
            "post": _operation(
                "authDeleteKey",
                "Revoke a key (better-auth shape)",
                auth,
                ok=200,
                result=_ref("AuthDeleted"),
                body=_body("AuthKeyDelete"),
                errors=[404],
            ),
        },
        "/{workspace}/admin/api-keys": {
            "parameters": [_param("Workspace")],
            "get": _operation(
                "cmsListKeys",
                "List keys (CMS shape)",
                cms,
                ok=200,
                result=_array(cms_key),
                errors=[404],
                description=listed,
            ),
            "post": _operation(
                "cmsCreateKey",
                "Create a key (CMS shape)",
                cms,
                ok=200,
                result=_ref("CmsCreated"),
                result_description="Created; `result` is the full key, shown only now.",
                body=_body("CmsKeyCreate"),
                errors=[404, 409],
            ),
        },
        "/{workspace}/admin/api-keys/{id}": {
            "parameters": cms_one,
            "get": _operation(
                "cmsGetKey", "Get a key (CMS shape)", cms, ok=200, result=cms_key, errors=[404]
            ),
            "put": _operation(
                "cmsUpdateKey",
                "Change a key (CMS shape)",
                cms,
                ok=200,
                result=cms_key,
                body=_body("CmsKeyUpdate"),
                errors=[404, 409],
            ),
            "delete": _operation(
                "cmsRevokeKey",
                "Revoke a key (CMS shape)",
                cms,
                ok=204,
                result_description="Revoked (also when it already was).",
                errors=[404],
            ),
        },
    }


TAGS: list[dict[str, str]] = [
    {"name": "keys", "description": "API keys: the caller's own, or (admins) anyone's."},
    {"name": "users", "description": "Users, roles and server grants (admin only)."},
    {"name": "servers", "description": "The configured MCP servers."},
    {"name": "audit", "description": "The audit trail (admin only)."},
    {"name": "usage", "description": "Usage totals and call records of the data plane."},
    {"name": "plumbing", "description": "Health, metrics and this document; no key needed."},
    {"name": "page", "description": "The admin web page and its files; no key needed."},
    {"name": "compat-better-auth", "description": "better-auth style key routes (camelCase)."},
    {
        "name": "compat-cms",
        "description": "CMS style key routes (token masked, validFrom/validTo).",
    },
]

DESCRIPTION = (
    "Manages a Keystile workspace: users, their server grants and their API keys. "
    "Authenticate with the same keys the gateway takes: a key with permission 'admin' whose "
    "user is an admin manages the workspace; a key with 'keys' manages its own user's keys. "
    "Errors are JSON {error, message, field?}. Records outside the caller's reach answer 404."
)


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Keystile admin API",
            "version": "1",
            "description": DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": TAGS,
        "security": SECURITY,
        "paths": {
            **_key_paths(),
            **_user_paths(),
            **_other_paths(),
            **_usage_paths(),
            **_page_paths(),
            **_compat_paths(),
        },
        "components": {
            "securitySchemes": SECURITY_SCHEMES,
            "schemas": {
                **_value_schemas(),
                **_response_schemas(),
                **_request_schemas(),
                **_compat_schemas(),
            },
            "parameters": PARAMETERS,
            "responses": _error_responses(),
        },
    }


def openapi_document() -> dict[str, Any]:
    """The document; built once, and each caller gets its own copy to change or serialise."""
    return copy.deepcopy(_document())
