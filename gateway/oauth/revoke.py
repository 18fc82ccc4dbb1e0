"""Token revocation (RFC 7009): POST /oauth/revoke ends the grant a token belongs to.

Decisions:
- 200 whatever the token: unknown, expired, already revoked, or not an OAuth token at all
  (RFC 7009 §2.2), so the endpoint tells nobody which tokens exist.
- Revoking an access or a refresh token revokes the whole grant (RFC 7009 §2.1 allows it, and
  a client asking to drop either wants to disconnect); the grant's key id is NOTIFYed, so
  every instance refuses its tokens at once.
- Holding the token is enough: no client_id check. Whoever has a leaked token may kill it,
  which is the point of revoking.
- An API key (`ks1-`) sent here is not revoked: keys are managed on the admin plane.
"""

from __future__ import annotations

from gateway import keys
from gateway.cache import KeyCache
from gateway.oauth.errors import invalid_request
from gateway.oauth.store import OAuthStore


async def revoke(form: dict[str, str], store: OAuthStore, cache: KeyCache) -> None:
    token = form.get("token")
    if token is None:
        raise invalid_request("token is required.")
    parsed = keys.parse(token)
    if parsed is None or parsed.kind == "key":
        return
    grant_id = await store.revoke_by_token(keys.token_hash(parsed.full))
    if grant_id is not None:
        cache.evict_key(grant_id)  # this process at once; the others by the NOTIFY
