"""Key derivation, authenticated encryption and padding.

Every encrypted object is a *sealed box*:

    version (1 byte = 1) | session id (16) | nonce (12) | AES-256-GCM ciphertext + tag (16)

The AES key of a box is HKDF-SHA256(encryption key, salt=session id). A writer
draws a fresh random session id per process and counts nonces from one under
it, so a nonce can never repeat without any coordination through storage.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stasisfs.errors import IntegrityError

BOX_VERSION = 1
SESSION_ID_LEN = 16
NONCE_LEN = 12
TAG_LEN = 16
BOX_OVERHEAD = 1 + SESSION_ID_LEN + NONCE_LEN + TAG_LEN
KEY_LEN = 32
NONCE = struct.Struct(">IQ")  # zero, then the session's counter

# Object kinds bound into the associated data, so one object cannot stand in for another.
KIND_CHUNK = b"chunk"
KIND_PACK_HEADER = b"pack-header"
KIND_PACK_TRAILER = b"pack-trailer"
KIND_PACK_JOURNAL = b"pack-journal"
KIND_INDEX = b"index"
KIND_SNAPSHOT = b"snapshot"
KIND_LOCK = b"lock"
KIND_SETTINGS = b"settings"
KIND_KEY_SLOT = b"key-slot"


def hkdf(secret: bytes, info: bytes, salt: bytes | None = None, length: int = KEY_LEN) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(secret)


def associated_data(repo_id: bytes, kind: bytes, object_id: bytes = b"") -> bytes:
    return b"stasisfs\0" + repo_id + b"\0" + kind + b"\0" + object_id


class MasterKeys:
    """Every purpose-specific key, derived once from the 32-byte device master key."""

    def __init__(self, master: bytes, repo_id: bytes) -> None:
        if len(master) != KEY_LEN:
            raise ValueError("master key must be 32 bytes")
        self.master = master
        self.repo_id = repo_id
        self.encryption = hkdf(master, b"stasisfs encryption v1")
        self.chunk_id = hkdf(master, b"stasisfs chunk id v1")
        self.path_hash = hkdf(master, b"stasisfs path hash v1")
        # pyfastcdc XORs the seed into its gear table; it must fit in 63 bits and be non-zero.
        seed = int.from_bytes(hkdf(master, b"stasisfs chunker seed v1", length=8), "little")
        self.chunker_seed = (seed & ((1 << 63) - 1)) or 1
        self.key_check = hkdf(master, b"stasisfs key check v1", length=16)

    def chunk_id_of(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self.chunk_id).digest()

    def path_key(self, path: bytes) -> bytes:
        return blake3.blake3(path, key=self.path_hash).digest()


class Cipher:
    """Seals with this process's session; opens boxes from any session."""

    def __init__(self, keys: MasterKeys) -> None:
        self.keys = keys
        self._session_id = os.urandom(SESSION_ID_LEN)
        self._sealer = AESGCM(self._session_key(self._session_id))
        self._box_prefix = bytes((BOX_VERSION,)) + self._session_id
        self._nonces = itertools.count(1)  # next() on count is atomic under the GIL
        self._openers: dict[bytes, AESGCM] = {self._session_id: self._sealer}
        self._lock = threading.Lock()

    def _session_key(self, session_id: bytes) -> bytes:
        return hkdf(self.keys.encryption, b"stasisfs session v1", salt=session_id)

    def seal(self, plaintext: bytes | memoryview, kind: bytes, object_id: bytes = b"") -> bytes:
        nonce = NONCE.pack(0, next(self._nonces))
        aad = associated_data(self.keys.repo_id, kind, object_id)
        return b"".join((self._box_prefix, nonce, self._sealer.encrypt(nonce, bytes(plaintext), aad)))

    def open(self, box: bytes | memoryview, kind: bytes, object_id: bytes = b"") -> bytes:
        view = memoryview(box)
        if len(view) < BOX_OVERHEAD or view[0] != BOX_VERSION:
            raise IntegrityError(f"malformed encrypted {kind.decode()} object")
        session_id = bytes(view[1 : 1 + SESSION_ID_LEN])
        nonce = bytes(view[1 + SESSION_ID_LEN : 1 + SESSION_ID_LEN + NONCE_LEN])
        opener = self._openers.get(session_id)
        if opener is None:
            opener = AESGCM(self._session_key(session_id))
            with self._lock:
                if len(self._openers) > 4096:
                    self._openers.clear()
                self._openers[session_id] = opener
        try:
            return opener.decrypt(nonce, view[1 + SESSION_ID_LEN + NONCE_LEN :], associated_data(self.keys.repo_id, kind, object_id))
        except InvalidTag:
            raise IntegrityError(f"encrypted {kind.decode()} object failed authentication") from None


def padme(length: int) -> int:
    """Padmé (Nikitin et al., PETS 2019): leaks O(log log L) bits, overhead at most 12%."""
    if length < 2:
        return length
    exponent = length.bit_length() - 1
    size_bits = exponent.bit_length()
    last_bits = exponent - size_bits
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def padded_size(length: int, floor: int) -> int:
    return padme(max(length, floor))
