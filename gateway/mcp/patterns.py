"""Tool patterns: `"<server>/<tool>"`, `*` for any run of characters (`/` included), a leading
`!` to exclude. A list with only exclusions starts from every tool; otherwise a tool must match
an inclusion and no exclusion, so an empty list allows none. `None` means every tool.

A tool `S/T` is allowed for a key iff `S` is among the key's effective servers and both the
key's and its user's patterns allow `S/T` (SPEC §6). Compiled policies are cached by their
pattern tuples: many keys share a few policies, and a decision is then one regex match.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from gateway.config import SERVER_NAME

MAX_PATTERNS = 200
MAX_PATTERN_LENGTH = 300
# What a pattern's tool part may not hold: whitespace and controls are typos, and a name that
# Unicode normalisation (NFKC) would change is a look-alike (see gateway.mcp.inspect).
_NOT_IN_A_NAME = re.compile(r"[\s\x00-\x1f\x7f]")


class PatternError(ValueError):
    """A pattern that cannot be meant; the message says why."""


def check_pattern(pattern: object, servers: Collection[str]) -> str:
    """The pattern, or PatternError saying what is wrong with it."""
    if not isinstance(pattern, str):
        raise PatternError("a pattern is a string like 'github/search_*'")
    body = pattern[1:] if pattern.startswith("!") else pattern
    if not body or len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"{pattern!r}: empty or too long")
    server, slash, tool = body.partition("/")
    if not slash or not server or not tool:
        raise PatternError(f"{pattern!r}: expected '<server>/<tool>'")
    if _NOT_IN_A_NAME.search(tool) or unicodedata.normalize("NFKC", tool) != tool:
        raise PatternError(f"{pattern!r}: whitespace, controls or unnormalised characters")
    if "*" not in server:
        if server not in servers:
            raise PatternError(f"{pattern!r}: unknown server {server!r}")
    elif not SERVER_NAME.fullmatch(server.replace("*", "x")):
        raise PatternError(f"{pattern!r}: not a server name pattern")
    return pattern


def check_patterns(value: object, servers: Collection[str]) -> tuple[str, ...] | None:
    """`None`, or a list of patterns without duplicates (order kept)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise PatternError("expected null or a list of patterns like 'github/search_*'")
    if len(value) > MAX_PATTERNS:
        raise PatternError(f"at most {MAX_PATTERNS} patterns")
    checked = [check_pattern(p, servers) for p in value]
    return tuple(dict.fromkeys(checked))


def _regex(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    alternatives = "|".join(".*".join(map(re.escape, p.split("*"))) for p in patterns)
    return re.compile(f"(?:{alternatives})", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ToolRule:
    """One pattern list, compiled: allowed iff (no inclusions or one matches) and no exclusion
    matches."""

    include: re.Pattern[str] | None
    exclude: re.Pattern[str] | None
    open: bool  # exclusions and no inclusion: starts from everything

    def allows(self, qualified: str) -> bool:
        if self.exclude is not None and self.exclude.fullmatch(qualified):
            return False
        return self.open or (self.include is not None and bool(self.include.fullmatch(qualified)))


@functools.lru_cache(maxsize=4096)
def compile_rule(patterns: tuple[str, ...]) -> ToolRule:
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    return ToolRule(_regex(include), _regex(exclude), open=not include and bool(exclude))


@dataclass(frozen=True, slots=True)
class ToolPolicy:
    """What a key may call: its rules (the key's and its user's) and its effective servers."""

    rules: tuple[ToolRule, ...]
    servers: frozenset[str]

    def allows(self, server: str, tool: str) -> bool:
        if server not in self.servers:
            return False
        qualified = f"{server}/{tool}"
        return all(rule.allows(qualified) for rule in self.rules)


def policy_for(
    key_tools: tuple[str, ...] | None,
    user_tools: tuple[str, ...] | None,
    servers: frozenset[str],
) -> ToolPolicy | None:
    """The key's tool policy, or None when both lists are null: nothing to inspect."""
    if key_tools is None and user_tools is None:
        return None
    rules = tuple(compile_rule(t) for t in (key_tools, user_tools) if t is not None)
    return ToolPolicy(rules, servers)


def covers(outer: str, inner: str) -> bool:
    """Whether every name `inner` matches is matched by `outer` (both `*`-globs). `outer`'s
    `*` may stand for any run of `inner`'s characters and wildcards; its other characters
    must meet the same characters of `inner`, never a wildcard."""
    # reachable[j]: outer[:i] can match inner[:j]
    reachable = [True] + [False] * len(inner)
    for o in outer:
        if o == "*":
            for j in range(1, len(inner) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j] and inner[j] == o and inner[j] != "*" for j in range(len(inner))
            ]
    return reachable[-1]


def effective_patterns(
    key_tools: tuple[str, ...] | None,
    user_tools: tuple[str, ...] | None,
    servers: frozenset[str],
) -> list[str] | None:
    """One pattern list for what the key and its user both allow, on its effective servers
    (for display: `/api/me`'s `effective_tools`); None when every tool is allowed.

    Two inclusions meet part by part (server, then tool), each part the narrower of the two
    when one covers the other; a pair of overlapping wildcards neither of which covers the
    other is not listed (the gateway still decides on both lists themselves)."""
    lists = [t for t in (key_tools, user_tools) if t is not None]
    if not lists:
        return None
    everything = [f"{s}/*" for s in sorted(servers)]
    inclusions = everything
    for patterns in lists:
        own = [p for p in patterns if not p.startswith("!")]
        if not own and any(p.startswith("!") for p in patterns):
            own = everything  # only exclusions: from everything
        met = {_meet(a, b) for a in inclusions for b in own}
        inclusions = sorted(m for m in met if m is not None)
    exclusions = sorted({p for patterns in lists for p in patterns if p.startswith("!")})
    in_scope = [p for p in inclusions if _server_glob_matches(p, servers)]
    return in_scope + exclusions


def _meet(a: str, b: str) -> str | None:
    a_server, _, a_tool = a.partition("/")
    b_server, _, b_tool = b.partition("/")
    server, tool = _narrower(a_server, b_server), _narrower(a_tool, b_tool)
    return f"{server}/{tool}" if server is not None and tool is not None else None


def _narrower(a: str, b: str) -> str | None:
    if covers(a, b):
        return b
    if covers(b, a):
        return a
    return None


def _server_glob_matches(pattern: str, servers: frozenset[str]) -> bool:
    server = pattern.partition("/")[0]
    return any(covers(server, s) for s in servers)
