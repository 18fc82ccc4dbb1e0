"""GET /api/usage and GET /api/calls (SPEC §7): who used what, from the call records.

Visibility, as for keys: an admin (a key with `admin` whose user is an admin) sees the whole
workspace; any other caller (a key with `keys`) sees the usage of its own user's keys only.
Nothing of another workspace is ever read. A `key_id` or `user_id` filter naming a record
outside the caller's reach answers 404, exactly as a key or user that does not exist would
(a member's own user and keys, an admin's whole workspace): a filter on someone else's key is
neither answered with their data nor with an empty page that would read as "no usage".

Parameters are validated before anything is looked up (422 naming the parameter, unknown
parameters included, like unknown fields of a body), then reach is checked (404).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from admin import validate
from admin.http import RUNTIME, Caller, authenticate, invalid, json_response
from admin.service import key_not_found, user_not_found
from gateway import usage_store
from gateway.models import iso
from gateway.usage_store import DIMENSIONS, Scope

FILTERS = ("key_id", "user_id", "server", "tool")
USAGE_PARAMETERS = frozenset({"from", "to", "group_by", "format", *FILTERS})
CALLS_PARAMETERS = frozenset({"status", "before", "limit", *FILTERS})
GROUP_BY = tuple(DIMENSIONS)
GROUP_FIELDS = tuple(DIMENSIONS[d][0] for d in GROUP_BY)  # key -> key_id, user -> user_id
FORMATS = ("json", "csv")
METRICS = ("requests", "errors", "p50_ms", "p95_ms", "bytes_in", "bytes_out")
CSV_FILENAME = "keystile-usage.csv"
# A spreadsheet runs a cell that starts with one of these as a formula; tool names and other
# text in a row can come from clients, so such cells are quoted with a leading apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


async def get_usage(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    params = validate.query(request.query, USAGE_PARAMETERS)
    start, end = validate.hour_window(
        params,
        datetime.now(UTC),
        default_days=validate.USAGE_DEFAULT_DAYS,
        max_days=validate.USAGE_MAX_DAYS,
    )
    group_by = validate.dimensions(params, "group_by", GROUP_BY)
    form = validate.query_choice(params, "format", FORMATS, default="json")
    scope = await _scope(request, caller, _filters(params))
    try:
        rows = await usage_store.usage(request.app[RUNTIME].pool, scope, start, end, group_by)
    except usage_store.TooManyGroups as exc:
        message = f"more than {exc.limit} groups; narrow the window, the filters or the grouping"
        raise invalid("group_by", message) from None
    if form == "csv":
        return _csv([DIMENSIONS[d][0] for d in group_by] + list(METRICS), rows)
    return json_response({"from": iso(start), "to": iso(end), "rows": rows})


async def list_calls(request: web.Request) -> web.Response:
    caller = await authenticate(request)
    params = validate.query(request.query, CALLS_PARAMETERS)
    filters = _filters(params)
    status = validate.query_integer(params, "status", minimum=100, maximum=599, default=None)
    before = validate.query_integer(
        params, "before", minimum=1, maximum=validate.MAX_BEFORE, default=None
    )
    limit = validate.query_integer(
        params,
        "limit",
        minimum=1,
        maximum=validate.CALLS_MAX_LIMIT,
        default=validate.CALLS_DEFAULT_LIMIT,
    )
    assert limit is not None  # it has a default
    scope = await _scope(request, caller, filters, status=status)
    page, next_before = await usage_store.calls(
        request.app[RUNTIME].pool, scope, before=before, limit=limit
    )
    return json_response({"calls": page, "next_before": next_before})


def _filters(params: Mapping[str, str]) -> dict[str, str | None]:
    return {name: validate.query_text(params, name) for name in FILTERS}


async def _scope(
    request: web.Request,
    caller: Caller,
    filters: Mapping[str, str | None],
    *,
    status: int | None = None,
) -> Scope:
    """The caller's workspace, narrowed to its own user unless it is an admin; 404 for a
    key or user filter outside that reach."""
    store = request.app[RUNTIME].store
    workspace = caller.workspace_id
    user_id, key_id = filters["user_id"], filters["key_id"]
    if not caller.is_admin:
        if user_id is not None and user_id != caller.user_id:
            raise user_not_found()
        user_id = caller.user_id
    elif user_id is not None and await store.user(workspace, user_id) is None:
        raise user_not_found()
    if key_id is not None:
        key = await store.key(workspace, key_id)  # revoked keys too: their usage stays
        if key is None or not (caller.is_admin or key.user_id == caller.user_id):
            raise key_not_found()
    return Scope(
        workspace,
        user_id=user_id,
        key_id=key_id,
        server=filters["server"],
        tool=filters["tool"],
        status=status,
    )


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> web.Response:
    """The rows as CSV (RFC 4180: CRLF line ends), a header line first; null is empty."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{CSV_FILENAME}"'},
    )
