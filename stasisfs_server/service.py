"""The server's rules, free of HTTP: accounts, tokens, devices, objects, escrow.

Each public method opens its own database session, so it can run in a worker
thread. Failures raise `Refused(status, reason)`; the HTTP layer maps nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Device, EnrolmentCode, EscrowedKey, LoginFailure, Meta, StoredObject, Token, User, aware, now
from .stores import ObjectNotFound, ObjectStore, object_key

KINDS = ("config", "data", "index", "snapshots")
OBJECT_ID = re.compile(r"^[0-9a-f]{64}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENROLMENT_LIFETIME = timedelta(hours=24)
SESSION_LIFETIME = timedelta(hours=1)
LOGIN_WINDOW = timedelta(minutes=1)
LOGIN_FAILURES_ALLOWED = 10
MAX_ESCROW_BYTES = 64 * 1024
# What unknown users are answered with, so that names cannot be probed by their parameters.
DEFAULT_LOGIN_KDF: dict[str, Any] = {"name": "argon2id", "iterations": 3, "memory_kib": 64 * 1024, "lanes": 4}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def check_name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise Refused(400, f"malformed {what} name")
    return name


def check_object(kind: str, object_id: str) -> None:
    if kind not in KINDS:
        raise Refused(400, f"unknown object kind; expected one of {', '.join(KINDS)}")
    if not OBJECT_ID.match(object_id):
        raise Refused(400, "malformed object id: expected 64 lowercase hex digits")


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for."""

    user_id: int
    user_name: str
    kind: str  # "device": only its own device; "session": any device of the user, and account changes
    device_id: int | None


@dataclass(frozen=True)
class DeviceRef:
    id: int
    uid: str
    user_id: int
    name: str


class Service:
    def __init__(self, engine: Engine, store: ObjectStore) -> None:
        self.engine = engine
        self.store = store
        self._secret = self._server_secret()

    def _server_secret(self) -> bytes:
        with Session(self.engine) as s:
            row = s.get(Meta, "secret")
            if row is None:
                s.add(Meta(key="secret", value=secrets.token_hex(32)))
                try:
                    s.commit()
                except IntegrityError:  # another instance made it first
                    s.rollback()
                row = s.get(Meta, "secret")
            assert row is not None
            return bytes.fromhex(row.value)

    # --- administration (the CLI) ---
    def add_user(self, name: str, append_only: bool = False, quota: int | None = None) -> str:
        check_name(name, "user")
        with Session(self.engine) as s:
            if s.scalar(select(User).where(User.name == name)) is not None:
                raise Refused(409, f"user {name} already exists")
            user = User(name=name, append_only=append_only, quota=quota, login_salt=secrets.token_bytes(16))
            s.add(user)
            s.flush()
            code = self._new_code(s, user.id)
            s.commit()
            return code

    def reissue(self, name: str) -> str:
        with Session(self.engine) as s:
            user = self._user(s, name)
            s.execute(delete(EnrolmentCode).where(EnrolmentCode.user_id == user.id, EnrolmentCode.used.is_(False)))
            code = self._new_code(s, user.id)
            s.commit()
            return code

    def _new_code(self, s: Session, user_id: int) -> str:
        code = "-".join(secrets.token_hex(3) for _ in range(4))
        s.add(EnrolmentCode(user_id=user_id, code_hash=digest(code), expires=now() + ENROLMENT_LIFETIME))
        return code

    def set_user(self, name: str, append_only: bool | None = None, quota: int | None = None, clear_quota: bool = False,
                 disabled: bool | None = None) -> None:
        with Session(self.engine) as s:
            user = self._user(s, name)
            if append_only is not None:
                user.append_only = append_only
            if quota is not None or clear_quota:
                user.quota = quota
            if disabled is not None:
                user.disabled = disabled
                if disabled:
                    s.execute(delete(Token).where(Token.user_id == user.id))
            s.commit()

    def users(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            rows = []
            for user in s.scalars(select(User).order_by(User.name)):
                used = s.scalar(select(func.coalesce(func.sum(StoredObject.size), 0)).join(Device).where(Device.user_id == user.id))
                devices = s.scalar(select(func.count()).select_from(Device).where(Device.user_id == user.id))
                rows.append({"name": user.name, "created": user.created.isoformat(), "disabled": user.disabled,
                             "append_only": user.append_only, "quota": user.quota, "used": int(used or 0),
                             "devices": int(devices or 0), "enrolled": user.verifier_hash is not None})
            return rows

    def _user(self, s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise Refused(404, f"no user {name}")
        return user

    # --- login ---
    def login_params(self, name: str) -> dict[str, Any]:
        with Session(self.engine) as s:
            user = s.scalar(select(User).where(User.name == name)) if NAME.match(name) else None
            if user is not None and user.login_kdf is not None:
                return {"salt": user.login_salt.hex(), "kdf": user.login_kdf}
            if user is not None:
                return {"salt": user.login_salt.hex(), "kdf": DEFAULT_LOGIN_KDF}
        fake_salt = hmac.new(self._secret, b"login salt\0" + name.encode(), "sha256").digest()[:16]
        return {"salt": fake_salt.hex(), "kdf": DEFAULT_LOGIN_KDF}

    def enrol(self, user_name: str, code: str, verifier: bytes, kdf: dict[str, Any], device_name: str) -> tuple[str, str]:
        check_name(device_name, "device")
        with Session(self.engine) as s:
            user = s.scalar(select(User).where(User.name == user_name)) if NAME.match(user_name) else None
            row = s.scalar(select(EnrolmentCode).where(EnrolmentCode.code_hash == digest(code.strip())))
            if user is None or row is None or row.user_id != user.id or row.used or aware(row.expires) < now():
                raise Refused(401, "enrolment code is wrong, used or expired; ask the operator for `stasisfs-server user reissue`")
            if user.disabled:
                raise Refused(403, "this account is disabled")
            # Consumed exactly once, even with concurrent requests on several instances.
            taken = s.execute(update(EnrolmentCode).where(EnrolmentCode.id == row.id, EnrolmentCode.used.is_(False)).values(used=True))
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                raise Refused(401, "enrolment code is wrong, used or expired; ask the operator for `stasisfs-server user reissue`")
            user.verifier_hash = digest(verifier)
            user.login_kdf = kdf
            device = self._device_for_token(s, user, device_name, resume=True)
            token = self._new_token(s, "device", user.id, device.id)
            s.commit()
            return token, device.name

    def login(self, user_name: str, verifier: bytes) -> str:
        with Session(self.engine) as s:
            since = now() - LOGIN_WINDOW
            failures = s.scalar(select(func.count()).select_from(LoginFailure).where(LoginFailure.user_name == user_name[:64], LoginFailure.at > since))
            if (failures or 0) >= LOGIN_FAILURES_ALLOWED:
                raise Refused(429, "too many failed logins; wait a minute")
            user = s.scalar(select(User).where(User.name == user_name)) if NAME.match(user_name) else None
            expected = user.verifier_hash if user is not None and user.verifier_hash is not None else digest(self._secret)
            if not hmac.compare_digest(expected, digest(verifier)) or user is None or user.disabled:
                s.execute(delete(LoginFailure).where(LoginFailure.at < since))
                s.add(LoginFailure(user_name=user_name[:64]))
                s.commit()
                raise Refused(401, "wrong user name or password")
            token = self._new_token(s, "session", user.id, None, expires=now() + SESSION_LIFETIME)
            s.commit()
            return token

    def change_verifier(self, principal: Principal, verifier: bytes, kdf: dict[str, Any]) -> None:
        self._require_session(principal)
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            assert user is not None
            user.verifier_hash = digest(verifier)
            user.login_kdf = kdf
            s.commit()

    def maintenance_token(self, name: str, lifetime: timedelta) -> str:
        """A short-lived token that may delete from an append-only account, for prune on a trusted host."""
        with Session(self.engine) as s:
            user = self._user(s, name)
            token = self._new_token(s, "maintenance", user.id, None, expires=now() + lifetime)
            s.commit()
            return token

    def _new_token(self, s: Session, kind: str, user_id: int, device_id: int | None, expires: datetime | None = None) -> str:
        token = secrets.token_urlsafe(32)
        s.add(Token(token_hash=digest(token), kind=kind, user_id=user_id, device_id=device_id, expires=expires))
        return token

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Refused(401, "a bearer token is required")
        with Session(self.engine) as s:
            row = s.scalar(select(Token).where(Token.token_hash == digest(token)))
            # The lookup is by digest; the comparison below is constant-time all the same.
            if row is None or not hmac.compare_digest(row.token_hash, digest(token)):
                raise Refused(401, "invalid or revoked token")
            if row.expires is not None and aware(row.expires) < now():
                raise Refused(401, "session expired; log in again")
            user = s.get(User, row.user_id)
            if user is None or user.disabled:
                raise Refused(401, "this account is disabled")
            return Principal(user.id, user.name, row.kind, row.device_id)

    @staticmethod
    def _require_session(principal: Principal) -> None:
        if principal.kind != "session":
            raise Refused(403, "this needs a password login, not a device token")

    # --- devices ---
    def devices(self, principal: Principal | None = None, user_name: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            user_id = principal.user_id if principal is not None else self._user(s, str(user_name)).id
            rows = []
            for device in s.scalars(select(Device).where(Device.user_id == user_id).order_by(Device.name)):
                stored = s.execute(select(func.count(), func.coalesce(func.sum(StoredObject.size), 0)).where(StoredObject.device_id == device.id)).one()
                rows.append({"name": device.name, "created": device.created.isoformat(), "revoked": device.revoked,
                             "last_upload": device.last_upload.isoformat() if device.last_upload else None,
                             "objects": int(stored[0]), "bytes": int(stored[1]),
                             "this": principal is not None and principal.device_id == device.id})
            return rows

    def register_device(self, principal: Principal, name: str, resume: bool) -> tuple[str, str]:
        """A token for a new device, or with `resume`, for an existing one (recovery carries on as that device)."""
        self._require_session(principal)
        check_name(name, "device")
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            assert user is not None
            device = self._device_for_token(s, user, name, resume)
            token = self._new_token(s, "device", user.id, device.id)
            s.commit()
            return token, device.name

    def _device_for_token(self, s: Session, user: User, name: str, resume: bool) -> Device:
        device = s.scalar(select(Device).where(Device.user_id == user.id, Device.name == name))
        if device is not None and not resume:
            raise Refused(409, f"device {name} already exists; choose another name, or recover it")
        if device is None:
            device = Device(uid=secrets.token_hex(16), user_id=user.id, name=name)
            s.add(device)
            s.flush()
        device.revoked = False
        return device

    def revoke_device(self, principal: Principal | None, name: str, user_name: str | None = None) -> None:
        """Cut a device off at once. Its stored data stays, for recovery with the password."""
        if principal is not None:
            self._require_session(principal)
        with Session(self.engine) as s:
            user_id = principal.user_id if principal is not None else self._user(s, str(user_name)).id
            device = s.scalar(select(Device).where(Device.user_id == user_id, Device.name == name))
            if device is None:
                raise Refused(404, f"no device {name}")
            device.revoked = True
            s.execute(delete(Token).where(Token.device_id == device.id))
            s.commit()

    def device(self, principal: Principal, name: str, write: bool = False) -> DeviceRef:
        """The device a request addresses, if the token may use it; 404 otherwise, so others' devices stay invisible."""
        with Session(self.engine) as s:
            device = s.scalar(select(Device).where(Device.user_id == principal.user_id, Device.name == name)) if NAME.match(name) else None
            # Device tokens reach their own device; session and maintenance tokens any device of the user.
            if device is None or (principal.kind == "device" and principal.device_id != device.id):
                raise Refused(404, "no such device")
            if write and device.revoked:
                raise Refused(403, "this device is revoked")
            if write and principal.kind == "maintenance":
                raise Refused(403, "a maintenance token may list, read and delete, not upload")
            return DeviceRef(device.id, device.uid, device.user_id, device.name)

    # --- objects ---
    def put_object(self, device: DeviceRef, kind: str, object_id: str, data: bytes | list[bytes], sha256: str | None = None) -> bool:
        """Store an object; False when a good copy was already there (nothing is ever overwritten but a bad copy).

        `sha256` is the body's digest when the caller hashed it while receiving.
        """
        check_object(kind, object_id)
        parts = data if isinstance(data, list) else [data]
        if sha256 is None:
            hasher = hashlib.sha256()
            for part in parts:
                hasher.update(part)
            sha256 = hasher.hexdigest()
        if sha256 != object_id:
            raise Refused(400, "the body does not hash to its id (SHA-256)")
        size = sum(len(p) for p in parts)
        key = object_key(device.uid, kind, object_id)
        with Session(self.engine) as s:
            known = s.get(StoredObject, (device.id, kind, object_id))
            if known is not None and self._verifies(key, object_id):
                return False
            if known is None:
                self._check_quota(s, device.user_id, size)
            self.store.put(key, data)
            if known is None:
                s.add(StoredObject(device_id=device.id, kind=kind, object_id=object_id, size=size))
            s.execute(update(Device).where(Device.id == device.id).values(last_upload=now()))
            try:
                s.commit()
            except IntegrityError:  # the same object arrived concurrently; both copies are identical
                s.rollback()
            return True

    def _verifies(self, key: str, object_id: str) -> bool:
        try:
            return hashlib.sha256(self.store.get(key)).hexdigest() == object_id
        except ObjectNotFound:
            return False

    def _check_quota(self, s: Session, user_id: int, incoming: int) -> None:
        user = s.get(User, user_id)
        if user is None or user.quota is None:
            return
        used = s.scalar(select(func.coalesce(func.sum(StoredObject.size), 0)).join(Device).where(Device.user_id == user_id)) or 0
        if used + incoming > user.quota:
            raise Refused(507, f"over quota: {used} of {user.quota} bytes used, this object needs {incoming} more")

    def object_size(self, device: DeviceRef, kind: str, object_id: str) -> int:
        check_object(kind, object_id)
        with Session(self.engine) as s:
            row = s.get(StoredObject, (device.id, kind, object_id))
            if row is None:
                raise Refused(404, "no such object")
            return row.size

    def get_object(self, device: DeviceRef, kind: str, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        check_object(kind, object_id)
        try:
            return self.store.get(object_key(device.uid, kind, object_id), offset, length)
        except ObjectNotFound:
            raise Refused(404, "no such object") from None

    def stream_object(self, device: DeviceRef, kind: str, object_id: str, offset: int, length: int) -> Iterator[bytes]:
        """A range, piece by piece (ranged S3 reads pass straight through to the client)."""
        check_object(kind, object_id)
        pieces = self.store.stream(object_key(device.uid, kind, object_id), offset, length)
        try:
            first = next(pieces, b"")  # surface a missing object as 404 before the answer starts
        except ObjectNotFound:
            raise Refused(404, "no such object") from None
        return itertools.chain([first], pieces)

    def delete_object(self, principal: Principal, device: DeviceRef, kind: str, object_id: str) -> None:
        check_object(kind, object_id)
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            if user is None or (user.append_only and principal.kind != "maintenance"):
                raise Refused(403, "this account is append-only: deletes are refused without a maintenance token")
            s.execute(delete(StoredObject).where(StoredObject.device_id == device.id, StoredObject.kind == kind,
                                                 StoredObject.object_id == object_id))
            s.commit()
        self.store.delete(object_key(device.uid, kind, object_id))

    def list_objects(self, device: DeviceRef, kind: str, after: str = "", limit: int = 1000) -> tuple[list[tuple[str, int]], str | None]:
        if kind not in KINDS:
            raise Refused(400, "unknown object kind")
        if after and not OBJECT_ID.match(after):
            raise Refused(400, "malformed `after` cursor")
        limit = max(1, min(limit, 10000))
        with Session(self.engine) as s:
            rows = s.execute(
                select(StoredObject.object_id, StoredObject.size)
                .where(StoredObject.device_id == device.id, StoredObject.kind == kind, StoredObject.object_id > after)
                .order_by(StoredObject.object_id).limit(limit + 1)
            ).all()
        page = [(r[0], int(r[1])) for r in rows[:limit]]
        return page, page[-1][0] if len(rows) > limit else None

    def missing(self, device: DeviceRef, kind: str, ids: list[str]) -> list[str]:
        for object_id in ids:
            check_object(kind, object_id)
        wanted = set(ids)
        present: set[str] = set()
        with Session(self.engine) as s:
            batch = sorted(wanted)
            for start in range(0, len(batch), 500):
                present.update(s.scalars(select(StoredObject.object_id).where(
                    StoredObject.device_id == device.id, StoredObject.kind == kind, StoredObject.object_id.in_(batch[start : start + 500]))))
        return sorted(wanted - present)

    # --- scrub: integrity without keys ---
    def scrub(self, say: Callable[[str], None] = lambda s: None) -> dict[str, int]:
        """Check every cataloged object's SHA-256 against its id. A damaged or missing one is quarantined:
        its bytes move aside (kept for forensics) and it leaves the catalog, so the device's next
        `sync` or `repair --remote` uploads a good copy."""
        from .stores.replicated import ReplicatedStore

        counts = {"checked": 0, "damaged": 0, "missing": 0, "recopied": 0}
        with Session(self.engine) as s:
            rows = s.execute(select(StoredObject.device_id, Device.uid, StoredObject.kind, StoredObject.object_id)
                             .join(Device, Device.id == StoredObject.device_id)).all()
        for device_id, uid, kind, object_id in rows:
            key = object_key(uid, kind, object_id)
            counts["checked"] += 1
            if isinstance(self.store, ReplicatedStore):
                healthy, recopied = self.store.heal(key)
                for url in recopied:
                    counts["recopied"] += 1
                    say(f"re-copied: device {uid} {kind}/{object_id} into {url}")
                if healthy:
                    continue
            try:
                data = self.store.get(key)
            except ObjectNotFound:
                problem = "missing"
            else:
                if hashlib.sha256(data).hexdigest() == object_id:
                    continue
                problem = "damaged"
                self.store.put(object_key(uid, "quarantine", object_id), data)
                self.store.delete(key)
            counts[problem] += 1
            say(f"{problem}: device {uid} {kind}/{object_id}")
            with Session(self.engine) as s:
                s.execute(delete(StoredObject).where(StoredObject.device_id == device_id, StoredObject.kind == kind,
                                                     StoredObject.object_id == object_id))
                s.commit()
        return counts

    # --- escrow ---
    def put_escrow(self, device: DeviceRef, blob: bytes) -> int:
        if not blob or len(blob) > MAX_ESCROW_BYTES:
            raise Refused(413, "escrowed key is empty or too large")
        with Session(self.engine) as s:
            latest = s.scalar(select(func.max(EscrowedKey.version)).where(EscrowedKey.device_id == device.id)) or 0
            s.add(EscrowedKey(device_id=device.id, version=latest + 1, blob=blob))
            s.commit()
            return latest + 1

    def get_escrow(self, device: DeviceRef) -> tuple[int, bytes]:
        with Session(self.engine) as s:
            row = s.scalar(select(EscrowedKey).where(EscrowedKey.device_id == device.id).order_by(EscrowedKey.version.desc()).limit(1))
            if row is None:
                raise Refused(404, "no escrowed key for this device")
            return row.version, row.blob
