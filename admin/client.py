"""An async Python client of the admin API (SPEC §5-§7): `KeystileAdmin(url, key)`.

    async with KeystileAdmin("http://127.0.0.1:8081", key) as admin:
        user = await admin.users.create("ci@example.com", servers=["github"])
        issued = await admin.keys.create("deploy", ["github"], user_id=user["id"])
        rows = (await admin.usage(group_by=["day"]))["rows"]

Keys and users are groups with the familiar SDK names (`create`, `fetch_all`, `fetch`,
`update`, `delete`, ...); servers, usage, calls and the audit trail are methods of the client.
Records are TypedDicts of the API's JSON, so what a method returns is exactly what the API
answered. Every failure raises KeystileError carrying the API's JSON error; an admin plane that
cannot be reached raises KeystileUnreachable, its subclass.

The key is sent in a header and kept nowhere else: it is never logged, never in a repr, never
in an exception's message.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, NotRequired, TypedDict, Unpack, cast
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.config import Secret

DEFAULT_TIMEOUT = 30.0
Role = Literal["admin", "member"]
KeyStatus = Literal["active", "disabled", "expired", "pending", "revoked"]
Moment = datetime | str  # a datetime (naive means UTC) or an ISO 8601 string


# --- records (the API's JSON) ---


class RateLimit(TypedDict):
    requests: int
    per_seconds: int


class KeyOwner(TypedDict):
    id: str
    email: NotRequired[str]  # absent once the user is deleted
    display_name: NotRequired[str]


class ApiKey(TypedDict):
    id: str
    user_id: str
    workspace_id: str
    name: str
    description: str
    prefix: str
    servers: list[str]
    permissions: list[str]
    valid_from: str | None
    expires_at: str | None
    is_active: bool
    status: KeyStatus
    created_at: str
    updated_at: str
    last_used_at: str | None
    revoked_at: str | None
    rate_limit: RateLimit | None
    allowed_cidrs: list[str] | None
    allowed_origins: list[str] | None  # browser origins (SPEC §4); None: any
    tools: list[str] | None
    kind: Literal["key", "oauth"]  # oauth: a grant an MCP client holds (SPEC §9)
    client_id: str | None  # an OAuth grant's client
    client_name: str | None
    user: KeyOwner


class ApiKeyWithSecret(ApiKey):
    key: str  # the full key: shown only in this answer


class User(TypedDict):
    id: str
    workspace_id: str
    email: str
    display_name: str
    role: Role
    is_active: bool
    servers: list[str]
    tools: list[str] | None
    created_at: str


class Server(TypedDict):
    name: str
    granted: bool


class Tool(TypedDict):
    name: str
    description: str | None


class ServerTools(TypedDict):
    server: str
    tools: list[Tool]
    fetched_at: str


class UsageRow(TypedDict):
    # The fields of the group_by dimensions (only those asked for), then the metrics.
    key_id: NotRequired[str]
    user_id: NotRequired[str]
    server: NotRequired[str | None]
    tool: NotRequired[str | None]
    status: NotRequired[int]
    hour: NotRequired[str]
    day: NotRequired[str]
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    bytes_in: int
    bytes_out: int


# "from" is a keyword: the functional form is the only way to name the field.
Usage = TypedDict("Usage", {"from": str, "to": str, "rows": list[UsageRow]})


class Call(TypedDict):
    id: int
    time: str
    request_id: str
    workspace_id: str
    user_id: str
    key_id: str
    route: Literal["mcp", "chat", "me"]
    server: str | None
    mcp_method: str | None
    tool: str | None
    status: int
    duration_ms: float
    bytes_in: int
    bytes_out: int
    client: str


class CallPage(TypedDict):
    calls: list[Call]
    next_before: int | None


class AuditEvent(TypedDict):
    id: int
    action: str
    target_type: str
    target_id: str
    actor_user_id: str | None
    actor_key_id: str | None
    changes: dict[str, Any]
    created_at: str


class AuditPage(TypedDict):
    events: list[AuditEvent]
    next_before: int | None


# --- request fields (each optional; left out = not sent, None = JSON null) ---


class KeyOptions(TypedDict, total=False):
    description: str
    permissions: Sequence[str]
    valid_from: Moment | None
    expires_at: Moment | None
    user_id: str | None
    rate_limit: RateLimit | None
    allowed_cidrs: Sequence[str] | None
    allowed_origins: Sequence[str] | None
    is_active: bool
    tools: Sequence[str] | None


class KeyChanges(TypedDict, total=False):
    name: str
    description: str
    servers: Sequence[str]
    permissions: Sequence[str]
    valid_from: Moment | None
    expires_at: Moment | None
    rate_limit: RateLimit | None
    allowed_cidrs: Sequence[str] | None
    allowed_origins: Sequence[str] | None
    is_active: bool
    tools: Sequence[str] | None


class UserOptions(TypedDict, total=False):
    display_name: str
    role: Role
    servers: Sequence[str]
    tools: Sequence[str] | None


class UserChanges(TypedDict, total=False):
    email: str
    display_name: str
    role: Role
    is_active: bool


# --- errors ---


class KeystileError(Exception):
    """The admin API refused a request: its status and JSON error (`error`, `message`, and
    the offending `field` when there is one)."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status}, error={self.error!r}, "
            f"message={self.message!r}, field={self.field!r})"
        )


class KeystileUnreachable(KeystileError):
    """No answer from the admin plane: refused, reset, unresolvable or timed out."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


# --- the client ---


def _json_value(value: Any) -> Any:
    """A request field as JSON: datetimes as ISO 8601 in UTC (naive ones taken as UTC),
    sequences as lists."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def _body(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _json_value(value) for name, value in fields.items()}


def _query(**params: Any) -> dict[str, str]:
    """Query parameters, leaving out those not given (None)."""
    out: dict[str, str] = {}
    for name, value in params.items():
        field = name.rstrip("_")  # from_ is the parameter "from"
        if value is None:
            continue
        if isinstance(value, bool):
            out[field] = "true" if value else "false"
        elif isinstance(value, Sequence) and not isinstance(value, str):
            out[field] = ",".join(value)
        else:
            out[field] = str(_json_value(value))
    return out


def _checked_key(key: str) -> str:
    # A header cannot carry these, and aiohttp's complaint would come far from the cause.
    if not key or not key.isascii() or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError("the admin key is empty or holds spaces or control characters")
    return key


def _public_ids(key: str) -> tuple[str | None, str | None]:
    """The user and key ids a ks1-<userId>-<keyId>-<secret> key carries in the clear."""
    parts = key.split("-")
    if len(parts) != 4 or parts[0] != "ks1" or not parts[1] or not parts[2]:
        return None, None
    return parts[1], parts[2]


class KeystileAdmin:
    """A client of one admin plane, authenticated with one key (`admin` or `keys`)."""

    def __init__(self, url: str, key: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        base = URL(url.rstrip("/"))
        if base.scheme not in ("http", "https") or not base.host:
            raise ValueError(f"the admin URL must be http:// or https://, not {url!r}")
        self.url = str(base)
        self._key = Secret(_checked_key(key))  # its repr hides it: safe in tracebacks
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.keys = Keys(self)
        self.users = Users(self)

    def __repr__(self) -> str:
        return f"KeystileAdmin({self.url!r})"  # never the key

    @property
    def key_id(self) -> str | None:
        """The calling key's id (public: every view of the key shows it), or None when the
        key is not a ks1- key."""
        return _public_ids(self._key)[1]

    @property
    def user_id(self) -> str | None:
        """The calling key's user's id, or None when the key is not a ks1- key."""
        return _public_ids(self._key)[0]

    async def __aenter__(self) -> KeystileAdmin:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- servers, usage, calls, audit ---

    async def servers(self) -> list[Server]:
        """The configured servers, each with whether the caller's user may reach it."""
        return cast(list[Server], await self._json("GET", "/api/servers"))

    async def server_tools(self, name: str) -> ServerTools:
        """The tools a server offers (asked live, cached 60 s by the admin plane)."""
        return cast(ServerTools, await self._json("GET", f"/api/servers/{_segment(name)}/tools"))

    async def usage(
        self,
        *,
        from_: Moment | None = None,
        to: Moment | None = None,
        group_by: Sequence[str] | str | None = None,
        key_id: str | None = None,
        user_id: str | None = None,
        server: str | None = None,
        tool: str | None = None,
    ) -> Usage:
        """Totals over whole UTC hours (default: the last 7 days), per group."""
        params = _query(
            from_=from_,
            to=to,
            group_by=group_by,
            key_id=key_id,
            user_id=user_id,
            server=server,
            tool=tool,
        )
        return cast(Usage, await self._json("GET", "/api/usage", params=params))

    async def usage_csv(
        self,
        *,
        from_: Moment | None = None,
        to: Moment | None = None,
        group_by: Sequence[str] | str | None = None,
        key_id: str | None = None,
        user_id: str | None = None,
        server: str | None = None,
        tool: str | None = None,
    ) -> str:
        """The same rows as `usage`, as the API's CSV text (CRLF line ends, a header first)."""
        params = _query(
            from_=from_,
            to=to,
            group_by=group_by,
            key_id=key_id,
            user_id=user_id,
            server=server,
            tool=tool,
            format="csv",
        )
        return await self._text("GET", "/api/usage", params=params)

    async def calls(
        self,
        *,
        key_id: str | None = None,
        user_id: str | None = None,
        server: str | None = None,
        tool: str | None = None,
        status: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> CallPage:
        """One page of call records, newest first; pass `next_before` on for the next."""
        params = _query(
            key_id=key_id,
            user_id=user_id,
            server=server,
            tool=tool,
            status=status,
            before=before,
            limit=limit,
        )
        return cast(CallPage, await self._json("GET", "/api/calls", params=params))

    async def iter_calls(
        self,
        *,
        key_id: str | None = None,
        user_id: str | None = None,
        server: str | None = None,
        tool: str | None = None,
        status: int | None = None,
        page_size: int | None = None,
    ) -> AsyncIterator[Call]:
        """Every matching call record, newest first, a page at a time."""
        before: int | None = None
        while True:
            page = await self.calls(
                key_id=key_id,
                user_id=user_id,
                server=server,
                tool=tool,
                status=status,
                before=before,
                limit=page_size,
            )
            for call in page["calls"]:
                yield call
            before = page["next_before"]
            if before is None:
                return

    async def audit(self, *, before: int | None = None, limit: int | None = None) -> AuditPage:
        """One page of the audit trail (admins), newest first."""
        params = _query(before=before, limit=limit)
        return cast(AuditPage, await self._json("GET", "/api/audit", params=params))

    # --- transport ---

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp warns when made outside one).
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> tuple[int, str, bytes]:
        """Status, content type and body of one exchange; KeystileUnreachable when there is
        none. Redirects are not followed: they would carry the key to another place."""
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        try:
            async with self._http().request(
                method,
                self.url + path,
                params=params,
                data=data,
                headers=headers,
                allow_redirects=False,
            ) as response:
                return response.status, response.content_type, await response.read()
        except TimeoutError:
            raise KeystileUnreachable(
                f"the admin plane at {self.url} did not answer within {self._timeout.total:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise KeystileUnreachable(
                f"cannot reach the admin plane at {self.url}: {_reason(exc)}"
            ) from None

    async def _raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> bytes:
        status, content_type, raw = await self._send(method, path, params=params, body=body)
        if status >= 300:
            raise _error(status, content_type, raw)
        return raw

    async def _json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Any:
        raw = await self._raw(method, path, params=params, body=body)
        try:
            return json.loads(raw)
        except ValueError:
            raise KeystileError(0, "invalid_answer", "The admin plane answered non-JSON.") from None

    async def _text(
        self, method: str, path: str, *, params: Mapping[str, str] | None = None
    ) -> str:
        return (await self._raw(method, path, params=params)).decode("utf-8")

    async def _no_content(self, method: str, path: str) -> None:
        await self._raw(method, path)


def _segment(value: str) -> str:
    """A path segment, escaped: an id or name can never reach another route."""
    return quote(value, safe="")


def _reason(exc: aiohttp.ClientError) -> str:
    """Why the exchange failed, in a few words and on one line."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        cause = exc.os_error
        if isinstance(cause, socket.gaierror) or not cause.errno:
            return cause.strerror or type(cause).__name__
        return os.strerror(cause.errno)  # "Connection refused", not asyncio's wording
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__


def _error(status: int, content_type: str, raw: bytes) -> KeystileError:
    """The API's JSON error as an exception; a non-JSON answer (a proxy's page) by status."""
    try:
        body = json.loads(raw) if content_type == "application/json" else None
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        field = body.get("field")
        return KeystileError(
            status,
            str(body.get("error", "error")),
            body["message"],
            field if isinstance(field, str) else None,
        )
    return KeystileError(status, "http_error", f"The admin plane answered HTTP {status}.")


class Keys:
    """`client.keys`: the caller's keys, or (admins) anyone's in the workspace."""

    def __init__(self, client: KeystileAdmin) -> None:
        self._client = client

    async def create(
        self, name: str, servers: Sequence[str], **options: Unpack[KeyOptions]
    ) -> ApiKeyWithSecret:
        """A new key; the answer's `key` is the full key, shown only now."""
        body = _body({"name": name, "servers": servers, **options})
        return cast(ApiKeyWithSecret, await self._client._json("POST", "/api/keys", body=body))

    async def fetch_all(
        self,
        *,
        all: bool = False,
        user_id: str | None = None,
        status: KeyStatus | None = None,
    ) -> list[ApiKey]:
        """The caller's own keys; admins: every key (`all`) or one user's. Revoked keys only
        when asked for with status="revoked"."""
        params = _query(all=all or None, user_id=user_id, status=status)
        return cast(list[ApiKey], await self._client._json("GET", "/api/keys", params=params))

    async def fetch(self, key_id: str) -> ApiKey:
        return cast(ApiKey, await self._client._json("GET", self._path(key_id)))

    async def update(self, key_id: str, **changes: Unpack[KeyChanges]) -> ApiKey:
        """Change the fields given; None sets a field to null (e.g. expires_at: never)."""
        body = _body(changes)
        return cast(ApiKey, await self._client._json("PATCH", self._path(key_id), body=body))

    async def enable(self, key_id: str) -> ApiKey:
        return cast(ApiKey, await self._client._json("POST", self._path(key_id, "enable")))

    async def disable(self, key_id: str) -> ApiKey:
        return cast(ApiKey, await self._client._json("POST", self._path(key_id, "disable")))

    async def delete(self, key_id: str) -> None:
        """Revoke: immediate and permanent (the record stays, with status "revoked")."""
        await self._client._no_content("DELETE", self._path(key_id))

    revoke = delete

    async def rotate(self, key_id: str, *, grace_seconds: float | None = None) -> ApiKeyWithSecret:
        """A new secret for the same key id; the old one keeps working for `grace_seconds`."""
        body = {} if grace_seconds is None else {"grace_seconds": grace_seconds}
        path = self._path(key_id, "rotate")
        return cast(ApiKeyWithSecret, await self._client._json("POST", path, body=body))

    @staticmethod
    def _path(key_id: str, action: str | None = None) -> str:
        path = f"/api/keys/{_segment(key_id)}"
        return f"{path}/{action}" if action else path


class Users:
    """`client.users`: users, roles and grants of the workspace (admins only)."""

    def __init__(self, client: KeystileAdmin) -> None:
        self._client = client

    async def create(self, email: str, **options: Unpack[UserOptions]) -> User:
        body = _body({"email": email, **options})
        return cast(User, await self._client._json("POST", "/api/users", body=body))

    async def fetch_all(self) -> list[User]:
        return cast(list[User], await self._client._json("GET", "/api/users"))

    async def fetch(self, user_id: str) -> User:
        return cast(User, await self._client._json("GET", self._path(user_id)))

    async def find(self, email: str) -> User | None:
        """The user with this email (compared without case, as the API does), or None."""
        wanted = email.casefold()
        return next((u for u in await self.fetch_all() if u["email"].casefold() == wanted), None)

    async def update(self, user_id: str, **changes: Unpack[UserChanges]) -> User:
        body = _body(changes)
        return cast(User, await self._client._json("PATCH", self._path(user_id), body=body))

    async def delete(self, user_id: str) -> None:
        """Delete the user: every key of theirs is revoked at once."""
        await self._client._no_content("DELETE", self._path(user_id))

    async def grant_servers(self, user_id: str, servers: Sequence[str]) -> User:
        """Replace the user's server grants: names, or ["*"] for every server."""
        body = {"servers": list(servers)}
        path = self._path(user_id, "servers")
        return cast(User, await self._client._json("PUT", path, body=body))

    async def grant_tools(self, user_id: str, tools: Sequence[str] | None) -> User:
        """Replace the user's tool patterns; None: every tool."""
        body = {"tools": list(tools) if tools is not None else None}
        return cast(User, await self._client._json("PUT", self._path(user_id, "tools"), body=body))

    @staticmethod
    def _path(user_id: str, action: str | None = None) -> str:
        path = f"/api/users/{_segment(user_id)}"
        return f"{path}/{action}" if action else path
