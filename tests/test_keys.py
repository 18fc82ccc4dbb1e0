"""gateway.keys: the key format, its checksum, and argon2id hashing. Pure: no I/O."""

from __future__ import annotations

import math
import re
import zlib
from urllib.parse import quote

import pytest

from gateway import keys
from gateway.keys import ALPHABET, KeyHasher, ParsedKey, checksum, generate, new_id, parse

USER = "u1A2b3C4d5E6f7G8"
KEY = "k9Z8y7X6w5V4u3T2"
SECRET = "S3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tS3cr3tX"  # 43 characters
BASE62 = re.compile(r"[0-9A-Za-z]+")


def build(body: str) -> str:
    """`body` plus its correct checksum: shape errors then cannot hide behind checksum errors."""
    return body + checksum(body)


# A fixed key keeps the exhaustive mutation tests deterministic.
FIXED = build(f"ks1-{USER}-{KEY}-{SECRET}")


def decode_base62(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + ALPHABET.index(char)
    return value


# --- format -------------------------------------------------------------------------------------


def test_generate_parse_round_trip() -> None:
    made = generate(USER, KEY)
    parsed = parse(made.full)
    assert parsed == made
    assert (parsed.user_id, parsed.key_id) == (USER, KEY)


def test_format() -> None:
    made = generate(USER, KEY)
    assert re.fullmatch(rf"ks1-{USER}-{KEY}-[0-9A-Za-z]{{43}}[0-9A-Za-z]{{6}}", made.full)
    assert len(made.secret) == 43
    assert made.full == f"ks1-{USER}-{KEY}-{made.secret}" + made.full[-6:]


def test_secret_carries_at_least_256_bits() -> None:
    assert len(set(ALPHABET)) == 62
    assert keys.SECRET_LENGTH * math.log2(len(ALPHABET)) >= 256
    secrets_seen = {generate(USER, KEY).secret for _ in range(50)}
    assert len(secrets_seen) == 50


def test_checksum_is_crc32_of_everything_before_it() -> None:
    made = generate(USER, KEY)
    body, check = made.full[:-6], made.full[-6:]
    assert BASE62.fullmatch(check)
    assert decode_base62(check) == zlib.crc32(body.encode("ascii"))


def test_checksum_has_fixed_length() -> None:
    # CRC32 of "" is 0: still six characters.
    assert checksum("") == "000000"
    assert all(len(checksum(f"ks1-{i}")) == 6 for i in range(200))


def test_display_prefix() -> None:
    made = generate(USER, KEY)
    expected = f"ks1-{USER}-{KEY}-{made.secret[:4]}…"
    assert made.display_prefix == expected
    assert keys.display_prefix(USER, KEY, made.secret) == expected
    assert made.secret[4:] not in made.display_prefix


def test_repr_hides_the_key() -> None:
    made = generate(USER, KEY)
    for text in (repr(made), str(made), f"{made}", repr([made])):
        assert made.full not in text
        assert made.secret not in text
    assert made.display_prefix in repr(made)


def test_new_id_is_url_safe_without_dashes() -> None:
    ids = [new_id() for _ in range(200)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        assert value
        assert "-" not in value
        assert BASE62.fullmatch(value)
        assert quote(value, safe="") == value


def test_new_ids_make_parseable_keys() -> None:
    made = generate(new_id(), new_id())
    assert parse(made.full) == made


# --- checksum: every small mistake is caught ----------------------------------------------------


def test_every_substitution_is_rejected() -> None:
    assert parse(FIXED) is not None  # the unmutated key is valid
    replacements = ALPHABET + "-_ .~/+=é\t\0"
    for index, original in enumerate(FIXED):
        for char in replacements:
            if char != original:
                mutated = FIXED[:index] + char + FIXED[index + 1 :]
                assert parse(mutated) is None, (index, char)


def test_every_substitution_of_a_generated_key_is_rejected() -> None:
    full = generate(new_id(), new_id()).full
    assert parse(full) is not None
    for index, original in enumerate(full):
        for char in ALPHABET:
            if char != original:
                assert parse(full[:index] + char + full[index + 1 :]) is None, (index, char)


def test_every_deletion_is_rejected() -> None:
    assert parse(FIXED) is not None  # the unmutated key is valid
    for index in range(len(FIXED)):
        assert parse(FIXED[:index] + FIXED[index + 1 :]) is None, index


def test_every_insertion_is_rejected() -> None:
    assert parse(FIXED) is not None  # the unmutated key is valid
    for index in range(len(FIXED) + 1):
        for char in "0aZ-":
            assert parse(FIXED[:index] + char + FIXED[index:]) is None, (index, char)


def test_every_adjacent_swap_is_rejected() -> None:
    assert parse(FIXED) is not None  # the unmutated key is valid
    for index in range(len(FIXED) - 1):
        a, b = FIXED[index], FIXED[index + 1]
        if a != b:
            assert parse(FIXED[:index] + b + a + FIXED[index + 2 :]) is None, index


def test_every_truncation_is_rejected() -> None:
    assert parse(FIXED) is not None  # the unmutated key is valid
    for length in range(len(FIXED)):
        assert parse(FIXED[:length]) is None, length


def test_ids_cannot_be_swapped_for_others() -> None:
    tail = FIXED.split("-")[3]
    other = "a1B2c3D4e5F6g7H8"
    for forged in (
        f"ks1-{other}-{KEY}-{tail}",
        f"ks1-{USER}-{other}-{tail}",
        f"ks1-{KEY}-{USER}-{tail}",
        f"ks1-{USER}-{USER}-{tail}",
    ):
        assert parse(forged) is None, forged
    assert parse(FIXED) is not None


# --- malformed input: None, never an exception --------------------------------------------------

VALID_TAIL = FIXED.split("-")[3]

MALFORMED = {
    "empty": "",
    "prefix only": "ks1",
    "prefix and dash": "ks1-",
    "wrong prefix": build(f"ok1-{USER}-{KEY}-{SECRET}"),
    "wrong prefix, same checksum": "ok1" + FIXED[3:],
    "upper-case prefix": build(f"KS1-{USER}-{KEY}-{SECRET}"),
    "no prefix": build(f"{USER}-{KEY}-{SECRET}"),
    "extra dash in secret": build(f"ks1-{USER}-{KEY}-{SECRET[:20]}-{SECRET[21:]}"),
    "extra dash at end": FIXED + "-",
    "double dash": build(f"ks1-{USER}--{KEY}-{SECRET}"),
    "empty user id": build(f"ks1--{KEY}-{SECRET}"),
    "empty key id": build(f"ks1-{USER}--{SECRET}"),
    "underscore in id": build(f"ks1-u_1-{KEY}-{SECRET}"),
    "overlong id": build(f"ks1-{'u' * 65}-{KEY}-{SECRET}"),
    "short secret": build(f"ks1-{USER}-{KEY}-{SECRET[:-1]}"),
    "long secret": build(f"ks1-{USER}-{KEY}-{SECRET}x"),
    "non-ASCII in secret": FIXED[:-10] + "é" + FIXED[-9:],
    "non-ASCII lookalike digit": FIXED.replace("3", "３", 1),
    "overlong 10k": "ks1-" + "a" * 10_000,
    "overlong valid-looking": build(f"ks1-{USER}-{KEY}-{SECRET * 300}"),
    "leading space": " " + FIXED,
    "trailing space": FIXED + " ",
    "trailing newline": FIXED + "\n",
    "tab inside": FIXED[:30] + "\t" + FIXED[31:],
    "NUL inside": FIXED[:30] + "\0" + FIXED[31:],
    "bearer scheme included": "Bearer " + FIXED,
    "only dashes": "---",
    "only whitespace": "   \t\n",
}


@pytest.mark.parametrize("text", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_is_none(text: str) -> None:
    assert parse(text) is None


def test_malformed_inputs_differ_from_a_valid_key() -> None:
    # Guard the table above: the valid key itself parses, so each case fails for its own reason.
    assert len(SECRET) == keys.SECRET_LENGTH
    assert parse(FIXED) == ParsedKey(USER, KEY, SECRET, FIXED)
    assert FIXED not in MALFORMED.values()


# --- hashing ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hasher() -> KeyHasher:
    return KeyHasher()


def test_hash_is_argon2id_with_default_parameters(hasher: KeyHasher) -> None:
    hashed = hasher.hash(FIXED)
    assert hashed.startswith("$argon2id$")
    assert "$m=4096,t=1,p=1$" in hashed
    assert FIXED not in hashed
    assert SECRET not in hashed


def test_hash_shows_configured_parameters() -> None:
    hashed = KeyHasher(time_cost=2, memory_kib=8192, parallelism=2).hash(FIXED)
    assert hashed.startswith("$argon2id$")
    assert "$m=8192,t=2,p=2$" in hashed


def test_hash_is_salted(hasher: KeyHasher) -> None:
    first, second = hasher.hash(FIXED), hasher.hash(FIXED)
    assert first != second
    assert hasher.verify(first, FIXED)
    assert hasher.verify(second, FIXED)


def test_verify_right_and_wrong_key(hasher: KeyHasher) -> None:
    other = generate(USER, KEY).full
    hashed = hasher.hash(FIXED)
    assert hasher.verify(hashed, FIXED) is True
    assert hasher.verify(hashed, other) is False
    assert hasher.verify(hashed, FIXED[:-1]) is False
    assert hasher.verify(hashed, "") is False


def test_verify_uses_the_parameters_in_the_hash(hasher: KeyHasher) -> None:
    # Changing the configured cost must not break keys hashed under the old one.
    old = KeyHasher(time_cost=2, memory_kib=8192).hash(FIXED)
    assert hasher.verify(old, FIXED) is True


def test_verify_corrupt_hash_is_false(hasher: KeyHasher) -> None:
    hashed = hasher.hash(FIXED)
    flipped = "A" if hashed[-10] != "A" else "B"  # inside the digest, not its padding bits
    corrupt = [
        "",
        "not a hash",
        "$argon2id$",
        "$argon2id$v=19$m=4096,t=1,p=1$",
        "$argon2id$v=19$m=4096,t=1,p=1$garbage",
        "$argon2id$v=19$m=0,t=0,p=0$AAAA$AAAA",
        "$2b$12$abcdefghijklmnopqrstuv",
        hashed[:-5],
        hashed[:-10] + flipped + hashed[-9:],
        hashed.replace("$argon2id$", "$argon2xx$"),
        hashed + "é",
        "é",
    ]
    for stored in corrupt:
        assert hasher.verify(stored, FIXED) is False, stored
