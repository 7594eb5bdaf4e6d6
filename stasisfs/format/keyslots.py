"""Key slots: the device master key wrapped under a password or a machine key.

A slot is a small JSON file `keys/<slot id>` holding KDF parameters and
`nonce | AES-256-GCM(kek, master key)` with the repository and slot ids in the
associated data. Any slot opens the same master key, so slots can be added and
removed without re-encrypting anything.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from stasisfs.errors import StasisError, UsageError, WrongKey
from stasisfs.format.crypto import KEY_LEN, hkdf

SLOT_PASSWORD = "password"
SLOT_MACHINE = "machine"

# borg 2's defaults; about 0.12 s on this class of machine.
ARGON2_DEFAULT = {"iterations": 3, "memory_kib": 64 * 1024, "lanes": 4}
# Only for the test suite, never on by default: see tests/conftest.py.
INSECURE_TEST_KDF_ENV = "STASISFS_INSECURE_TEST_KDF"
ARGON2_INSECURE_TEST = {"iterations": 1, "memory_kib": 64, "lanes": 1}
# The escrowed slot sits on a server that can guess passwords offline against it: make each guess dearer.
ARGON2_ESCROW = {"iterations": 4, "memory_kib": 256 * 1024, "lanes": 4}
LOGIN_VERIFIER_LABEL = b"stasisfs login verifier v1"
# Key scheme 2: one Argon2id run per password, split by HKDF into what the server may hold and what it may not.
ACCOUNT_VERIFIER_LABEL = b"stasisfs login verifier v2"
ACCOUNT_KEK_LABEL = b"stasisfs user key wrap v2"
# Parameters read from storage are bounded, so a planted slot cannot make an unlock take minutes and gigabytes.
ARGON2_CEILING = {"iterations": 64, "memory_kib": 1024 * 1024, "lanes": 64}

MIN_PASSWORD_SCORE = 3  # zxcvbn: "safely unguessable: moderate protection from offline slow-hash scenario"


@dataclass
class KeySlot:
    id: str
    kind: str
    created: str
    kdf: dict[str, object]
    wrapped: bytes
    label: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc = {
            "version": 1,
            "id": self.id,
            "kind": self.kind,
            "label": self.label,
            "created": self.created,
            "kdf": self.kdf,
            "wrapped": base64.b64encode(self.wrapped).decode(),
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> KeySlot:
        try:
            doc = json.loads(data)
            return cls(doc["id"], doc["kind"], doc["created"], doc["kdf"], base64.b64decode(doc["wrapped"]), doc.get("label", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise StasisError(f"key slot is malformed: {exc}") from None


def _slot_aad(repo_id: bytes, slot_id: str) -> bytes:
    return b"stasisfs key slot v1\0" + repo_id + b"\0" + slot_id.encode()


def insecure_test_kdf() -> bool:
    return os.environ.get(INSECURE_TEST_KDF_ENV) == "1"


def argon2_params(strength: dict[str, int] = ARGON2_DEFAULT) -> dict[str, object]:
    params = ARGON2_INSECURE_TEST if insecure_test_kdf() else strength
    return {"name": "argon2id", "salt": base64.b64encode(os.urandom(16)).decode(), **params}


def login_kdf() -> dict[str, object]:
    """Login KDF parameters a new account is enrolled with (the salt comes from the server)."""
    return {"name": "argon2id", **(ARGON2_INSECURE_TEST if insecure_test_kdf() else ARGON2_DEFAULT)}


def login_verifier(password: str, salt: bytes, kdf: dict[str, object]) -> bytes:
    """What proves the password to a server. A different salt and label from every key slot, so it opens nothing."""
    if kdf.get("name") != "argon2id":
        raise StasisError(f"server asks for an unknown login KDF {kdf.get('name')!r}")
    check_login_floor(kdf, salt, ARGON2_DEFAULT)
    stretched = argon2(password.encode(), salt, kdf, "the server's login parameters")
    return hkdf(stretched, LOGIN_VERIFIER_LABEL, salt=salt)


def check_login_floor(kdf: dict[str, object], salt: bytes, floor: dict[str, int]) -> None:
    """A server offering cheap parameters would make its copy of the verifier cheap to guess from: refuse them."""
    if insecure_test_kdf():
        floor = ARGON2_INSECURE_TEST
    try:
        iterations, memory = int(str(kdf["iterations"])), int(str(kdf["memory_kib"]))
    except (KeyError, ValueError):
        raise StasisError("the server sent malformed login KDF parameters; refusing to log in") from None
    if kdf.get("name") != "argon2id":
        raise StasisError(f"server asks for an unknown login KDF {kdf.get('name')!r}")
    if iterations < floor["iterations"] or memory < floor["memory_kib"] or len(salt) < 16:
        raise StasisError("the server asks for login KDF parameters weaker than stasisfs accepts; refusing to log in")


def argon2(secret: bytes, salt: bytes, kdf: dict[str, object], what: str) -> bytes:
    """Argon2id with parameters that came from storage: bounded and checked before any memory is spent."""
    try:
        iterations, memory, lanes = (int(str(kdf[k])) for k in ("iterations", "memory_kib", "lanes"))
    except (KeyError, ValueError):
        raise StasisError(f"{what} has malformed Argon2id parameters") from None
    if not (1 <= iterations <= ARGON2_CEILING["iterations"] and 8 * lanes <= memory <= ARGON2_CEILING["memory_kib"]
            and 1 <= lanes <= ARGON2_CEILING["lanes"]) or len(salt) < 8:
        raise StasisError(f"{what} asks for Argon2id parameters out of bounds (t={iterations}, m={memory} KiB, p={lanes}); refusing it")
    return Argon2id(salt=salt, length=KEY_LEN, iterations=iterations, lanes=lanes, memory_cost=memory).derive(secret)


def derive_kek(kdf: dict[str, object], secret: bytes, slot_id: str) -> bytes:
    name = kdf.get("name")
    if name == "argon2id":
        try:
            salt = base64.b64decode(str(kdf["salt"]))
        except (KeyError, ValueError):
            raise StasisError(f"key slot {slot_id} has a malformed salt") from None
        return argon2(secret, salt, kdf, f"key slot {slot_id}")
    if name == "none":  # a random machine key needs no stretching
        return hkdf(secret, b"stasisfs machine slot v1", salt=slot_id.encode())
    raise StasisError(f"key slot uses unknown KDF {name!r}")


def wrap(master: bytes, repo_id: bytes, secret: bytes, kind: str, kdf: dict[str, object], label: str = "") -> KeySlot:
    slot_id = secrets.token_hex(8)
    kek = derive_kek(kdf, secret, slot_id)
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, master, _slot_aad(repo_id, slot_id))
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return KeySlot(slot_id, kind, created, kdf, wrapped, label)


def unwrap(slot: KeySlot, repo_id: bytes, secret: bytes) -> bytes:
    kek = derive_kek(slot.kdf, secret, slot.id)
    try:
        return AESGCM(kek).decrypt(slot.wrapped[:12], slot.wrapped[12:], _slot_aad(repo_id, slot.id))
    except InvalidTag:
        raise WrongKey("wrong password or key") from None


def password_weakness(password: str, user_inputs: list[str] | None = None) -> str | None:
    """A reason the password is too weak, or None."""
    import zxcvbn  # imported lazily: it loads large dictionaries

    if len(password) < 10:
        return "password is too short: use at least 10 characters, ideally a passphrase of several words"
    result = zxcvbn.zxcvbn(password[:100], user_inputs=user_inputs or [])
    if result["score"] >= MIN_PASSWORD_SCORE:
        return None
    feedback = result.get("feedback", {})
    hint = feedback.get("warning") or " ".join(feedback.get("suggestions", [])) or "it is easy to guess"
    return f"password is too weak ({hint.rstrip('.')}); a passphrase of four or more random words is strong"


# --- machine key files ------------------------------------------------------

MACHINE_KEY_HEADER = "stasisfs-machine-key v1"


def format_machine_key(repo_id: bytes, slot_id: str, secret: bytes) -> str:
    return f"{MACHINE_KEY_HEADER}\nrepository {repo_id.hex()}\nslot {slot_id}\nsecret {base64.b64encode(secret).decode()}\n"


def parse_machine_key(text: str) -> tuple[str, str, bytes]:
    """(repository id hex, slot id, secret)."""
    fields = dict(line.split(" ", 1) for line in text.splitlines()[1:] if " " in line)
    if not text.startswith(MACHINE_KEY_HEADER) or not {"repository", "slot", "secret"} <= fields.keys():
        raise UsageError("key file is not a stasisfs machine key")
    return fields["repository"].strip(), fields["slot"].strip(), base64.b64decode(fields["secret"])


# --- recovery keys ------------------------------------------------------------
# The recovery key is the master key itself plus a 4-byte check, in base32.
# The paper form adds a 2-character checksum per line, so a typo is pinned to its line.

_B32 = re.compile(r"[^A-Z2-7]")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=")


def _line_check(number: int, chars: str) -> str:
    return _b32(blake3.blake3(f"{number}:{chars}".encode()).digest()[:2])[:2]


def format_recovery_key(master: bytes, paper: bool = False) -> str:
    text = _b32(master + blake3.blake3(master).digest()[:4])
    if not paper:
        return "-".join(text[i : i + 4] for i in range(0, len(text), 4))
    lines = []
    for number, start in enumerate(range(0, len(text), 16), 1):
        chars = text[start : start + 16]
        groups = " ".join(chars[i : i + 4] for i in range(0, len(chars), 4))
        lines.append(f"{number}: {groups:<19}  [{_line_check(number, chars)}]")
    return "\n".join(lines)


# "1: ABCD EFGH IJKL MNOP  [XY]": the "1:" may be left out, and the spacing is free.
_PAPER_LINE = re.compile(r"^\s*(?:(\d+)\s*[:.)])?\s*([A-Za-z2-7][A-Za-z2-7 \t-]*?)\s*\[\s*([A-Za-z2-7]{2})\s*\]\s*$")


def parse_recovery_key(text: str) -> bytes:
    """The master key from its compact form, or from the paper form (other lines of the printout are ignored)."""
    lines = text.strip().splitlines()
    paper = [m for m in (_PAPER_LINE.match(line) for line in lines) if m]
    chars = ""
    if paper:
        for position, match in enumerate(paper, 1):
            number, body, check = int(match[1] or position), _B32.sub("", match[2].upper()), match[3].upper()
            if _line_check(number, body) != check:
                raise UsageError(f"recovery key line {number} has a typo (its checksum does not match)")
            chars += body
    else:
        chars = "".join(_B32.sub("", line.upper()) for line in lines)
    try:
        raw = base64.b32decode(chars + "=" * (-len(chars) % 8))
    except ValueError:
        raise UsageError("recovery key is not valid base32") from None
    master, check = raw[:KEY_LEN], raw[KEY_LEN:]
    if len(raw) != KEY_LEN + 4 or blake3.blake3(master).digest()[:4] != check:
        raise UsageError("recovery key is mistyped or incomplete (its checksum does not match)")
    return master


# --- the escrowed key ---------------------------------------------------------
# What the server holds for recovery: one password slot with stronger Argon2id, plus the ids needed to find the rest.


def make_escrow(master: bytes, repo_id: bytes, password: str, config_id: str) -> bytes:
    slot = wrap(master, repo_id, password.encode(), SLOT_PASSWORD, argon2_params(ARGON2_ESCROW), label="escrow")
    return json.dumps({"version": 1, "repository": repo_id.hex(), "config": config_id, "slot": json.loads(slot.encode())}).encode()


def open_escrow(blob: bytes, password: str) -> tuple[bytes, str, bytes]:
    """(repository id, config object id, master key); WrongKey if the password does not open it."""
    try:
        doc = json.loads(blob)
        repo_id, config_id = bytes.fromhex(doc["repository"]), str(doc["config"])
        slot = KeySlot.decode(json.dumps(doc["slot"]).encode())
    except (ValueError, KeyError, TypeError) as exc:
        raise StasisError(f"the escrowed key is malformed: {exc}") from None
    return repo_id, config_id, unwrap(slot, repo_id, password.encode())


# --- key scheme 2: the user key -------------------------------------------------
# root = Argon2id(password, salt); verifier = HKDF(root, "login verifier v2"); kek = HKDF(root, "user key wrap v2").
# The server stores SHA-256(verifier) and the user key wrapped under kek: both cost one Argon2id per guess.
# Each device's master key is escrowed wrapped under the user key, so a password change re-wraps one key.


@dataclass(frozen=True)
class AccountSecrets:
    verifier: bytes  # sent to the server at login; opens nothing
    kek: bytes  # wraps the user key; never leaves the device


def account_kdf() -> dict[str, object]:
    """The parameters a new or changed account password is derived with: the escrow's strength."""
    return {"name": "argon2id", **(ARGON2_INSECURE_TEST if insecure_test_kdf() else ARGON2_ESCROW)}


def account_secrets(password: str, salt: bytes, kdf: dict[str, object]) -> AccountSecrets:
    check_login_floor(kdf, salt, ARGON2_ESCROW)
    root = argon2(password.encode(), salt, kdf, "the server's login parameters")
    return AccountSecrets(hkdf(root, ACCOUNT_VERIFIER_LABEL, salt=salt), hkdf(root, ACCOUNT_KEK_LABEL, salt=salt))


def _user_key_aad(user: str) -> bytes:
    return b"stasisfs user key v2\0" + user.encode()


def wrap_user_key(user_key: bytes, kek: bytes, user: str) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(kek).encrypt(nonce, user_key, _user_key_aad(user))


def open_user_key(envelope: bytes, kek: bytes, user: str) -> bytes:
    try:
        user_key = AESGCM(kek).decrypt(envelope[:12], envelope[12:], _user_key_aad(user))
    except (InvalidTag, ValueError):
        raise WrongKey("the server's wrapped user key does not open with this password") from None
    if len(user_key) != KEY_LEN:
        raise WrongKey("the server's wrapped user key is malformed")
    return user_key


def _device_escrow_aad(user: str, device: str, repo_id: bytes, config_id: str) -> bytes:
    return b"\0".join([b"stasisfs device escrow v2", user.encode(), device.encode(), repo_id, config_id.encode()])


def make_device_escrow(master: bytes, repo_id: bytes, config_id: str, user_key: bytes, user: str, device: str) -> bytes:
    """A device's master key wrapped under the user key; the ids it names are bound in the associated data."""
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(user_key).encrypt(nonce, master, _device_escrow_aad(user, device, repo_id, config_id))
    return json.dumps({"version": 2, "repository": repo_id.hex(), "config": config_id, "device": device,
                       "wrapped": base64.b64encode(wrapped).decode()}).encode()


def open_device_escrow(blob: bytes, user_key: bytes, user: str, device: str, password: str) -> tuple[bytes, str, bytes]:
    """(repository id, config object id, master key) from a scheme-2 escrow, or a scheme-1 one (wrapped under the password).

    WrongKey when it does not open, StasisError when it is malformed: either way the caller names it and tries an older version.
    """
    try:
        doc = json.loads(blob)
        version = int(doc["version"]) if isinstance(doc, dict) else 0
    except (ValueError, KeyError, TypeError):
        raise StasisError("the escrowed key is not JSON") from None
    if version == 1:
        return open_escrow(blob, password)
    if version != 2:
        raise StasisError(f"the escrowed key has unknown version {version}")
    try:
        repo_id, config_id = bytes.fromhex(doc["repository"]), str(doc["config"])
        wrapped = base64.b64decode(doc["wrapped"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise StasisError(f"the escrowed key is malformed: {exc}") from None
    try:
        master = AESGCM(user_key).decrypt(wrapped[:12], wrapped[12:], _device_escrow_aad(user, device, repo_id, config_id))
    except (InvalidTag, ValueError):
        raise WrongKey("the escrowed key does not open with this account's user key") from None
    return repo_id, config_id, master
