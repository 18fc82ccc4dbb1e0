"""Header rewriting between client and upstream. Pure: mappings in, headers out.

Every end-to-end header passes (MCP's Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID,
Mcp-Method, Mcp-Param-*, ...); what is removed is a short, fixed list: hop-by-hop headers,
the client's credentials, and identity/forwarding headers a client could forge.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: credentials, the client's Host and framing (the upstream client
# frames the body itself), and headers the gateway owns.
_REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "x-api-key",
}
# Every header of this prefix is the gateway's to set: a client's copy never passes.
_OWNED_PREFIX = "x-keystile-"
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded"})
_RESPONSE_DROP = HOP_BY_HOP


def _connection_listed(headers: Mapping[str, str]) -> frozenset[str]:
    """Headers named in Connection are hop-by-hop for this message too (RFC 9110 7.6.1)."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


class TrustedProxies:
    """The configured proxies whose X-Forwarded-* values are believed."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def is_trusted(self, address: str | None) -> bool:
        if not self._networks or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def client(self, remote: str | None, forwarded_for: Iterable[str]) -> str:
        """The calling client's address (see client_address)."""
        if not self._networks:
            return remote or ""
        return client_address(remote or "", forwarded_for, self.is_trusted)


def client_address(
    remote: str, forwarded_for: Iterable[str], is_trusted: Callable[[str], bool]
) -> str:
    """Who is calling: the connection's address, unless that is a trusted proxy; then the
    rightmost X-Forwarded-For hop that is not itself a trusted proxy (hops further left
    were written by the client and prove nothing)."""
    if not is_trusted(remote):
        return remote
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else remote


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str,
    scheme: str,
    host: str,
    trusted_client: bool,
    identity: Sequence[tuple[str, str]],
    extra: Mapping[str, str],
) -> list[tuple[str, str]]:
    """Headers to send upstream, in order: the client's that pass, then X-Forwarded-*, then
    `identity` and `extra`, each of which replaces any client header of its name.

    X-Forwarded-* are replaced unless the client is a trusted proxy, whose values are kept and
    the client's address appended to X-Forwarded-For. (A list of pairs, not a multidict: it is
    only ever written out, once, on the hot path.)
    """
    listed = _connection_listed(incoming)
    replaced = {name.lower() for name, _ in identity}
    if extra:  # an upstream's configured header wins over the client's and the gateway's
        configured = {name.lower() for name in extra}
        identity = [(n, v) for n, v in identity if n.lower() not in configured]
        replaced |= configured
    out: list[tuple[str, str]] = []
    for name, value in incoming.items():
        lower, kind = _request_header_kinds.get(name) or _classify(name)
        if kind is _DROPPED or lower in listed or lower in replaced:
            continue
        if kind is _REBUILT and not (trusted_client and lower == "forwarded"):
            continue  # X-Forwarded-* are rebuilt below from the kept values
        out.append((name, value))
    if trusted_client:
        prior_for = ", ".join(incoming.getall("X-Forwarded-For", ()))
        out.append(("X-Forwarded-For", f"{prior_for}, {client_ip}" if prior_for else client_ip))
        out.append(("X-Forwarded-Proto", incoming.get("X-Forwarded-Proto", scheme)))
        out.append(("X-Forwarded-Host", incoming.get("X-Forwarded-Host", host)))
    else:
        out += (("X-Forwarded-For", client_ip), ("X-Forwarded-Proto", scheme))
        out.append(("X-Forwarded-Host", host))
    out += identity
    out += extra.items()
    return out


# What becomes of a client's request header, by its name alone.
_PASSED, _DROPPED, _REBUILT = "passed", "dropped", "rebuilt"
# A client sends the same few names on every request: each one's lower-case spelling and fate
# are worked out once. Bounded, since the names are the client's to choose.
_request_header_kinds: dict[str, tuple[str, str]] = {}
_KINDS_MAX = 4096


def _classify(name: str) -> tuple[str, str]:
    lower = name.lower()
    owned = lower.startswith(_OWNED_PREFIX) or ("_" in lower and _owned_spelling(lower))
    if owned or lower in _REQUEST_DROP:
        kind = _DROPPED
    elif lower in _FORWARDED:
        kind = _REBUILT
    else:
        kind = _PASSED
    if len(_request_header_kinds) < _KINDS_MAX:
        _request_header_kinds[name] = (lower, kind)
    return lower, kind


def without(headers: list[tuple[str, str]], name: str) -> list[tuple[str, str]]:
    """`headers` less every header called `name` (any case)."""
    lower = name.lower()
    return [(n, v) for n, v in headers if n.lower() != lower]


def _owned_spelling(name: str) -> bool:
    """CGI and WSGI servers fold `-` and `_` into one variable (X_Keystile_User_Id and
    X-Keystile-User-Id both become HTTP_X_KEYSTILE_USER_ID): an underscore spelling of a
    header the gateway owns or drops would reach such an upstream as the real thing."""
    folded = name.replace("_", "-")
    return folded in _REQUEST_DROP or folded in _FORWARDED or folded.startswith(_OWNED_PREFIX)


def downstream_response_headers(upstream: MultiMapping[str]) -> CIMultiDict[str]:
    """Upstream response headers to send to the client: all but hop-by-hop ones. (A copy:
    the upstream client still reads the answer's framing from the originals.)"""
    listed = _connection_listed(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower in listed:
            continue
        out.add(name, value)
    return out
