"""tools/list answers, filtered to the tools a key may call.

Any JSON-RPC response whose `result.tools` is a list loses the entries the policy denies
(entries without a string `name` cannot be judged and go too); `nextCursor` and every other
field stay. In a JSON body (one message or a batch) and in SSE `data:` events, on any stream.

An SSE stream is handled one event at a time: an event is held until it is complete (a client
acts on nothing less), passed as it was unless it holds a tool list, and never more than one
event is held. A JSON body is held whole. Either is bounded by `max_held`; past it the answer
is refused (StreamRefused) rather than passed unfiltered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from gateway.transform import StreamRefused

Allows = Callable[[str], bool]  # a tool name -> may the key call it
MAX_HELD = 16 * 1024 * 1024
# An event ends at a blank line: a line's end, then an empty line's end. The SSE format lets
# each line end in CRLF, LF or CR, mixed ("\n\r\n" ends an event too); a CR is a line's end
# on its own only when no LF follows, or CRLF would read as two ends. A lone CR at the end of
# what has arrived ends the event: an LF arriving after it is then a blank line of its own,
# which the client ignores.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_MARK = b'"tools"'


def filter_message(message: Any, allows: Allows) -> bool:
    """Filter `message` (a decoded JSON-RPC message or batch) in place; True if it changed."""
    if isinstance(message, list):
        changed = [filter_message(item, allows) for item in message]
        return any(changed)
    if not isinstance(message, dict) or "method" in message:
        return False
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
        return False
    tools = result["tools"]
    kept = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    kept = [t for t in kept if allows(t["name"])]
    if len(kept) == len(tools):
        return False
    result["tools"] = kept
    return True


def _filtered_json(raw: bytes, allows: Allows) -> bytes | None:
    """The filtered serialisation, or None when nothing changed (or it is not JSON)."""
    if _MARK not in raw:
        return None
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses what the standard library reads (integers past 64 bits): an answer
        # any client could read must not pass unfiltered for that.
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if not filter_message(message, allows):
        return None
    return orjson.dumps(message)


class JsonListFilter:
    """A JSON answer body, held whole and filtered at its end."""

    def __init__(self, allows: Allows, max_held: int = MAX_HELD) -> None:
        self._allows = allows
        self._max_held = max_held
        self._chunks: list[bytes] = []
        self._held = 0

    def feed(self, chunk: bytes) -> bytes:
        self._held += len(chunk)
        if self._held > self._max_held:
            raise StreamRefused("a JSON answer too large to filter")
        self._chunks.append(chunk)
        return b""

    def flush(self) -> bytes:
        raw = b"".join(self._chunks)
        self._chunks = []
        filtered = _filtered_json(raw, self._allows)
        return raw if filtered is None else filtered


class SseListFilter:
    """An SSE answer, one event at a time."""

    def __init__(self, allows: Allows, max_held: int = MAX_HELD) -> None:
        self._allows = allows
        self._max_held = max_held
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        buffer = self._buffer + chunk if self._buffer else chunk
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(buffer):
            out.append(self._event(buffer[start : match.end()]))
            start = match.end()
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max_held:
            raise StreamRefused("an SSE event too large to filter")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return self._event(rest) if rest else b""

    def _event(self, event: bytes) -> bytes:
        if _MARK not in event:
            return event
        lines = event.splitlines(keepends=True)
        data = [line for line in lines if line.startswith(b"data")]
        payload = b"\n".join(_value(line) for line in data if _is_data(line))
        filtered = _filtered_json(payload, self._allows)
        if filtered is None:
            return event
        ending = _ending(lines)
        out: list[bytes] = []
        for line in lines:
            if _is_data(line):
                if not out or not _is_data_marker(out[-1]):
                    out.append(b"data: " + filtered + ending)
                    out.append(b"")  # marks that the data line has been written
            elif line.strip(b"\r\n"):
                out.append(line)
        body = b"".join(out)
        return body + ending


def _is_data(line: bytes) -> bool:
    name = line.rstrip(b"\r\n").partition(b":")[0]
    return name == b"data"


def _is_data_marker(item: bytes) -> bool:
    return item == b""


def _value(line: bytes) -> bytes:
    value = line.rstrip(b"\r\n").partition(b":")[2]
    return value[1:] if value.startswith(b" ") else value


def _ending(lines: list[bytes]) -> bytes:
    for line in lines:
        stripped = line.rstrip(b"\r\n")
        if len(stripped) != len(line):
            return line[len(stripped) :]
    return b"\n"
