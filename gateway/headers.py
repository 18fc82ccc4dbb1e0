"""Header rewriting between client and upstream. Pure: mappings in, a multidict out.

Every end-to-end header passes (MCP's Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID,
Mcp-Method, Mcp-Param-*, ...); what is removed is a short, fixed list: hop-by-hop headers,
the client's credentials, and identity/forwarding headers a client could forge.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping

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
    identity: Iterable[tuple[str, str]],
    extra: Mapping[str, str],
) -> CIMultiDict[str]:
    """Headers to send upstream.

    X-Forwarded-* are replaced unless the client is a trusted proxy, whose values are kept and
    the client's address appended to X-Forwarded-For.
    """
    listed = _connection_listed(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if "_" in lower and _owned_spelling(lower):
            continue
        if lower in _REQUEST_DROP or lower in listed or lower.startswith(_OWNED_PREFIX):
            continue
        if lower in _FORWARDED and not trusted_client:
            continue
        if lower in _FORWARDED and lower != "forwarded":
            continue  # rebuilt below from the kept values
        out.add(name, value)
    prior_for = ", ".join(incoming.getall("X-Forwarded-For", ())) if trusted_client else ""
    out["X-Forwarded-For"] = f"{prior_for}, {client_ip}" if prior_for else client_ip
    out["X-Forwarded-Proto"] = (
        incoming.get("X-Forwarded-Proto", scheme) if trusted_client else scheme
    )
    out["X-Forwarded-Host"] = incoming.get("X-Forwarded-Host", host) if trusted_client else host
    for name, value in identity:
        out[name] = value
    for name, value in extra.items():
        out[name] = value
    return out


def _owned_spelling(name: str) -> bool:
    """CGI and WSGI servers fold `-` and `_` into one variable (X_Keystile_User_Id and
    X-Keystile-User-Id both become HTTP_X_KEYSTILE_USER_ID): an underscore spelling of a
    header the gateway owns or drops would reach such an upstream as the real thing."""
    folded = name.replace("_", "-")
    return folded in _REQUEST_DROP or folded in _FORWARDED or folded.startswith(_OWNED_PREFIX)


def downstream_response_headers(upstream: MultiMapping[str]) -> CIMultiDict[str]:
    """Upstream response headers to send to the client: all but hop-by-hop ones."""
    listed = _connection_listed(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RESPONSE_DROP or lower in listed:
            continue
        out.add(name, value)
    return out
