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

from .crypto import KEY_LEN, hkdf
from .errors import StasisError, UsageError, WrongKey

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
    iterations, memory, lanes = (int(str(kdf[k])) for k in ("iterations", "memory_kib", "lanes"))
    floor = ARGON2_INSECURE_TEST if insecure_test_kdf() else ARGON2_DEFAULT
    if iterations < floor["iterations"] or memory < floor["memory_kib"] or not 1 <= lanes <= 64 or len(salt) < 16:
        # A server offering cheap parameters would make its copy of the verifier cheap to guess from.
        raise StasisError("the server asks for login KDF parameters weaker than stasisfs accepts; refusing to log in")
    stretched = Argon2id(salt=salt, length=KEY_LEN, iterations=iterations, lanes=lanes, memory_cost=memory).derive(password.encode())
    return hkdf(stretched, LOGIN_VERIFIER_LABEL, salt=salt)


def derive_kek(kdf: dict[str, object], secret: bytes, slot_id: str) -> bytes:
    name = kdf.get("name")
    if name == "argon2id":
        salt = base64.b64decode(str(kdf["salt"]))
        iterations, memory, lanes = (int(str(kdf[k])) for k in ("iterations", "memory_kib", "lanes"))
        return Argon2id(salt=salt, length=KEY_LEN, iterations=iterations, lanes=lanes, memory_cost=memory).derive(secret)
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


_PAPER_LINE = re.compile(r"^\s*(\d+)\s*:\s*([A-Za-z2-7 ]+?)\s*\[([A-Za-z2-7]{2})\]\s*$")


def parse_recovery_key(text: str) -> bytes:
    """The master key from its compact form, or from the paper form (other lines of the printout are ignored)."""
    lines = text.strip().splitlines()
    paper = [m for m in (_PAPER_LINE.match(line) for line in lines) if m]
    chars = ""
    if paper:
        for match in paper:
            number, body, check = int(match[1]), _B32.sub("", match[2].upper()), match[3].upper()
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
