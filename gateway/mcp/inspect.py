"""The JSON-RPC inspector: a request body (and its Mcp-* headers) in, the messages it carries
out, or an InspectError naming why it cannot be let through.

Whatever the gateway decides from a body, the upstream must read the same body the same way,
so anything two JSON parsers could read differently is refused rather than guessed at: a byte
order mark, invalid UTF-8, duplicate keys (one parser takes the first `"name"`, another the
last), NaN and Infinity, nesting past Python's limit. A `tools/call` must be a request (with
an id) naming its tool as a string in Unicode normal form (NFKC) without controls, so a
look-alike (`ｄelete_repo`, which some servers would normalise to `delete_repo`) is refused
instead of slipping past a pattern written for the plain name.

Checks run in SPEC §6's order: size (413), shape (`invalid_jsonrpc`), header agreement
(`header_mismatch`). The policy decision is the caller's.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import orjson

MAX_TOOL_NAME = 256
_BOM = b"\xef\xbb\xbf"
# The common tool name: plain ASCII, nothing for Unicode normalisation to change.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-/]+")
# How a 2026-07-28 client sends a header value that is not plain printable ASCII (a tool
# name like "búsqueda"): its UTF-8 bytes in base64, wrapped in this sentinel.
_BASE64_SENTINEL = re.compile(r"=\?base64\?(?P<payload>.*)\?=")

Kind = Literal["request", "notification", "response"]


class InspectError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def invalid(message: str) -> InspectError:
    return InspectError(
        400, "invalid_jsonrpc", f"The request body is not valid JSON-RPC: {message}."
    )


def mismatch(message: str) -> InspectError:
    return InspectError(
        400, "header_mismatch", f"The Mcp-* headers disagree with the body: {message}."
    )


def too_large(limit: int) -> InspectError:
    return InspectError(
        413, "body_too_large", f"An inspected request body may be at most {limit} bytes."
    )


class Message(NamedTuple):
    """One JSON-RPC message: its kind, method, id, and the tool or resource it names. (Named
    tuples: built for every inspected request, where a frozen dataclass costs several times
    as much.)"""

    kind: Kind
    method: str | None
    id: str | int | None
    name: str | None  # params.name (tools/call, prompts/get) or params.uri (resources/*)


class Inspection(NamedTuple):
    messages: tuple[Message, ...]
    batch: bool

    def tool_calls(self) -> list[Message]:
        return [m for m in self.messages if m.method == "tools/call"]


def inspect(
    body: bytes,
    *,
    limit: int,
    mcp_method: Sequence[str] = (),
    mcp_name: Sequence[str] = (),
    content_encoding: Sequence[str] = (),
) -> Inspection:
    """The messages in `body`, or InspectError (413, invalid_jsonrpc, header_mismatch)."""
    if len(body) > limit:
        raise too_large(limit)
    _plain(content_encoding)
    decoded = _decode(body)
    if isinstance(decoded, list):
        if not decoded:
            raise invalid("an empty batch")
        inspection = Inspection(tuple(_message(item) for item in decoded), batch=True)
    else:
        inspection = Inspection((_message(decoded),), batch=False)
    _agree(inspection, mcp_method, mcp_name)
    return inspection


def _plain(content_encoding: Sequence[str]) -> None:
    """Refuse a body sent with a Content-Encoding. As sent it is not JSON; and whatever the
    gateway made of it (aiohttp's server decodes gzip and deflate on the way in, leaving the
    header) is not what the upstream would act on: it gets the header with other bytes."""
    for value in content_encoding:
        for coding in value.split(","):
            if coding.strip().lower() not in ("", "identity"):
                raise invalid(f"a {coding.strip()!r}-encoded body cannot be inspected")


def _decode(body: bytes) -> Any:
    if body.startswith(_BOM):
        raise invalid("a byte order mark before the JSON")
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _decode_strictly(body)  # which says why, or reads what orjson cannot
    # orjson keeps one value of a repeated key without a word. A body that is byte for byte
    # what orjson writes for what it read (compact JSON, as MCP clients send it) holds no
    # repeated key, since a serialiser never writes one; any other body is read strictly.
    if orjson.dumps(decoded) == body:
        return decoded
    return _decode_strictly(body)


def _decode_strictly(body: bytes) -> Any:
    """What orjson refuses (invalid JSON, but also integers past 64 bits, a lone surrogate,
    nesting past 1,024), read by the standard library's decoder, which says why."""
    try:
        return _DECODER.decode(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise invalid("not UTF-8") from None
    except RecursionError:
        raise invalid("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and the hooks' refusals
        raise invalid(str(exc) or "not JSON") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("an object with a repeated key")
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with hooks would build a decoder per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _message(value: Any) -> Message:
    if not isinstance(value, dict):
        raise invalid("a message must be an object")
    if value.get("jsonrpc") != "2.0":
        raise invalid('"jsonrpc" must be "2.0"')
    if "id" in value and not _is_id(value["id"]):
        raise invalid('"id" must be a string or an integer')
    ident = value.get("id")
    if "method" not in value:
        if ("result" in value) == ("error" in value) or "id" not in value:
            raise invalid("a message without a method must be a response with an id")
        return Message("response", None, ident, None)
    method = value["method"]
    if not isinstance(method, str) or not method:
        raise invalid('"method" must be a non-empty string')
    params = value.get("params")
    if "params" in value and not isinstance(params, dict | list):
        raise invalid('"params" must be an object or an array')
    kind: Kind = "request" if "id" in value else "notification"
    name = _named(method, params if isinstance(params, dict) else None, kind)
    return Message(kind, method, ident, name)


def _is_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _named(method: str, params: dict[str, Any] | None, kind: Kind) -> str | None:
    if method != "tools/call":
        if params is None:
            return None
        named = params.get("name", params.get("uri"))
        return named if isinstance(named, str) else None
    if kind != "request":
        raise invalid("tools/call must be a request with an id")
    tool = params.get("name") if params is not None else None
    if not isinstance(tool, str):
        raise invalid('tools/call needs "params.name" as a string')
    if not tool or len(tool) > MAX_TOOL_NAME:
        raise invalid("the tool name is empty or too long")
    if _PLAIN_NAME.fullmatch(tool):
        return tool
    if unicodedata.normalize("NFKC", tool) != tool or any(
        unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in tool
    ):
        raise invalid("the tool name holds look-alike, control or format characters")
    return tool


def _agree(inspection: Inspection, mcp_method: Sequence[str], mcp_name: Sequence[str]) -> None:
    if not mcp_method and not mcp_name:
        return
    if inspection.batch:
        raise mismatch("Mcp-Method and Mcp-Name describe one message, not a batch")
    if len(mcp_method) > 1 or len(mcp_name) > 1:
        raise mismatch("a header is repeated")
    message = inspection.messages[0]
    if mcp_method and mcp_method[0] != message.method:
        raise mismatch(f"Mcp-Method is {mcp_method[0]!r}, the body's method {message.method!r}")
    if mcp_name and _header_value(mcp_name[0]) != message.name:
        raise mismatch(f"Mcp-Name is {mcp_name[0]!r}, the body names {message.name!r}")


def _header_value(value: str) -> str | None:
    """Mcp-Name as the client meant it: verbatim, or the text of a base64 sentinel, decoded
    as the MCP SDK's servers decode it (canonical base64 of UTF-8; None, which no body name
    equals, when it is not). Compared raw, every non-ASCII name would be a mismatch."""
    match = _BASE64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match["payload"]
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None  # non-canonical: no encoder emits it
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
