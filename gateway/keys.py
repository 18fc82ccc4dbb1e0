"""The key format: generate, parse, checksum, hash and verify. Pure: no I/O, no event loop.

    ks1-<userId>-<keyId>-<secret><checksum>      an API key
    kso1-<userId>-<grantId>-<secret><checksum>   an OAuth access token (SPEC §9)
    ksr1-<userId>-<grantId>-<secret><checksum>   an OAuth refresh token

`secret` is 43 base62 characters (256 bits from `secrets`); `checksum` is CRC32 over everything
before it, as 6 base62 characters, so a mistyped or truncated credential is refused before any
lookup. An OAuth grant is a key record (kind "oauth"), so its tokens name it as a key names its
record, and are verified on the same cache path; they are stored as SHA-256 digests
(`token_hash`), not argon2 hashes: 256 random bits need no stretching, and a token is minted
every hour per client. Each prefix is distinct, so secret scanners tell the three apart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from dataclasses import dataclass
from typing import Literal

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

Kind = Literal["key", "oauth", "refresh"]
PREFIX = "ks1"
ACCESS_PREFIX = "kso1"
REFRESH_PREFIX = "ksr1"
# What a credential is, by its prefix: an API key, or an OAuth grant's access or refresh token.
KINDS: dict[str, Kind] = {PREFIX: "key", ACCESS_PREFIX: "oauth", REFRESH_PREFIX: "refresh"}
PREFIXES: dict[Kind, str] = {kind: prefix for prefix, kind in KINDS.items()}
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SECRET_LENGTH = 43  # 62**43 > 2**256
CHECKSUM_LENGTH = 6  # 62**6 > 2**32
ID_LENGTH = 16  # ~95 bits: ids are public, but unguessable ids keep enumeration pointless
MAX_KEY_LENGTH = 200
_ALPHABET_SET = frozenset(ALPHABET)
_ID_CHARS = frozenset(ALPHABET)


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A credential whose shape and checksum are right; whether it is real is the store's
    question. `key_id` is the record it names: a key's, or for a token its grant's."""

    user_id: str
    key_id: str
    secret: str
    full: str
    kind: Kind = "key"

    @property
    def display_prefix(self) -> str:
        return display_prefix(self.user_id, self.key_id, self.secret, self.kind)

    def __repr__(self) -> str:
        return (
            f"ParsedKey(kind={self.kind!r}, key_id={self.key_id!r}, prefix={self.display_prefix!r})"
        )


def random_string(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def new_id() -> str:
    """A public record id: URL-safe and free of '-', so it can sit inside a key."""
    return random_string(ID_LENGTH)


def checksum(text: str) -> str:
    value = zlib.crc32(text.encode("ascii"))
    out = []
    for _ in range(CHECKSUM_LENGTH):
        value, digit = divmod(value, 62)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def generate(user_id: str, key_id: str, kind: Kind = "key") -> ParsedKey:
    """Mint a new key (or a grant's token) for an existing user id and key (grant) id."""
    secret = random_string(SECRET_LENGTH)
    body = f"{PREFIXES[kind]}-{user_id}-{key_id}-{secret}"
    return ParsedKey(user_id, key_id, secret, body + checksum(body), kind)


def parse(text: str) -> ParsedKey | None:
    """Return the parsed credential, or None for anything malformed or with a wrong checksum."""
    if len(text) > MAX_KEY_LENGTH or not text.isascii():
        return None
    parts = text.split("-")
    if len(parts) != 4:
        return None
    prefix, user_id, key_id, tail = parts
    kind = KINDS.get(prefix)
    if kind is None:
        return None
    if len(tail) != SECRET_LENGTH + CHECKSUM_LENGTH or not _is_id(user_id) or not _is_id(key_id):
        return None
    if not _ALPHABET_SET.issuperset(tail):
        return None
    secret, check = tail[:SECRET_LENGTH], tail[SECRET_LENGTH:]
    if not hmac.compare_digest(checksum(text[:-CHECKSUM_LENGTH]), check):
        return None
    return ParsedKey(user_id, key_id, secret, text, kind)


def _is_id(value: str) -> bool:
    return 0 < len(value) <= 64 and _ID_CHARS.issuperset(value)


def display_prefix(user_id: str, key_id: str, secret: str, kind: Kind = "key") -> str:
    """What every view shows after creation: the ids and the first 4 secret characters."""
    return f"{PREFIXES[kind]}-{user_id}-{key_id}-{secret[:4]}…"


def fingerprint(full_key: str) -> bytes:
    """A fast digest of a full key, used to recognise an already-verified key in memory.

    Only argon2 hashes are stored; this digest never leaves the process.
    """
    # 128 bits: an exact-match check of keys that carry 256 random bits, held per cached key.
    return hashlib.blake2b(full_key.encode("ascii"), digest_size=16).digest()


def token_hash(full_token: str) -> bytes:
    """What the store keeps of an OAuth token (or code): its SHA-256. A token carries 256
    random bits, so no stretching is needed, and lookups by this digest are exact."""
    return hashlib.sha256(full_token.encode("ascii")).digest()


class KeyHasher:
    """argon2id hashing with configured parameters.

    A 256-bit random secret cannot be brute-forced, so the cost only has to make a stolen hash
    useless for offline checks of candidate keys, not to stretch a weak password: the default
    (t=1, m=4 MiB) verifies in about 2 ms instead of argon2-cffi's ~140-200 ms.
    """

    def __init__(self, *, time_cost: int = 1, memory_kib: int = 4096, parallelism: int = 1) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=Type.ID,
        )

    def hash(self, full_key: str) -> str:
        return self._hasher.hash(full_key)

    def verify(self, stored_hash: str, full_key: str) -> bool:
        """Constant-time comparison inside argon2; False on mismatch or a corrupt hash."""
        try:
            return self._hasher.verify(stored_hash, full_key)
        except (VerifyMismatchError, VerificationError, InvalidHashError, UnicodeEncodeError):
            return False  # UnicodeEncodeError: a corrupt, non-ASCII stored hash
