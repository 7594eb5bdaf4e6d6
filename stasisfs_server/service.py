"""The server's rules, free of HTTP: accounts, tokens, devices, objects, escrow.

Each public method opens its own database session, so it can run in a worker
thread. Failures raise `Refused(status, code, detail)`; the HTTP layer maps nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import throttle
from .db import Device, EnrolmentCode, EscrowedKey, LoginFailure, Meta, StoredObject, Token, User, aware, now
from .stores import ObjectNotFound, ObjectStore, object_key

KINDS = ("config", "data", "index", "snapshots")
LAST_SCRUB = "last_scrub"  # the Meta row holding the last scrub's result
OBJECT_ID = re.compile(r"^[0-9a-f]{64}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENROLMENT_LIFETIME = timedelta(hours=24)
SESSION_LIFETIME = timedelta(hours=1)
# Recovery material (escrowed keys, the verifier, the user key) changes only this soon after a password login.
FRESH_LOGIN = timedelta(minutes=10)
MAX_ESCROW_BYTES = 64 * 1024
MAX_ENVELOPE_BYTES = 4 * 1024
ESCROW_VERSIONS_KEPT = 4  # a bound, whatever clients do; clients delete older ones once a new one is confirmed
# What unknown users are answered with, so that names cannot be probed by their parameters: key scheme 2's.
DEFAULT_LOGIN_KDF: dict[str, Any] = {"name": "argon2id", "iterations": 4, "memory_kib": 256 * 1024, "lanes": 4}


class _Keep:
    """The default of a setting that is left as it is (None means "inherit", so it cannot mean "unchanged")."""


KEEP = _Keep()
AlertSetting = int | None | _Keep


class Refused(Exception):
    """A refusal: HTTP status, a stable machine-readable code (docs/format.md lists them) and a sentence for people."""

    def __init__(self, status: int, code: str, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after  # seconds, for a 429

    @property
    def reason(self) -> str:
        return self.detail


def digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


def valid_name(name: str) -> bool:
    return NAME.fullmatch(name) is not None


def check_name(name: str, what: str) -> str:
    if not valid_name(name):
        raise Refused(400, "malformed", f"malformed {what} name: letters, digits, '.', '_' and '-', at most 64")
    return name


def check_object(kind: str, object_id: str) -> None:
    if kind not in KINDS:
        raise Refused(400, "malformed", f"unknown object kind; expected one of {', '.join(KINDS)}")
    if OBJECT_ID.fullmatch(object_id) is None:
        raise Refused(400, "malformed", "malformed object id: expected 64 lowercase hex digits")


@dataclass(frozen=True)
class Principal:
    """Who a bearer token speaks for."""

    user_id: int
    user_name: str
    kind: str  # "device": only its own device; "session": any device of the user, and account changes
    device_id: int | None
    token_id: int = 0
    issued: datetime | None = None


@dataclass(frozen=True)
class DeviceRef:
    id: int
    uid: str
    user_id: int
    name: str


class Service:
    def __init__(self, engine: Engine, store: ObjectStore, default_alert_after: timedelta | None = None) -> None:
        self.engine = engine
        self.store = store
        # `serve --alert-after`: when a device counts as quiet, unless its user or itself sets another threshold.
        self.default_alert_after = default_alert_after
        self._secret = self._server_secret()

    @property
    def secret(self) -> bytes:
        """The server's own random secret, for keyed hashes (never sent anywhere)."""
        return self._secret

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
                raise Refused(409, "conflict", f"user {name} already exists")
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
                 disabled: bool | None = None, alert_after: AlertSetting = KEEP) -> None:
        with Session(self.engine) as s:
            user = self._user(s, name)
            if not isinstance(alert_after, _Keep):
                user.alert_after = alert_after
            if append_only is not None:
                user.append_only = append_only
            if quota is not None or clear_quota:
                user.quota = quota
            if disabled is not None:
                user.disabled = disabled
                if disabled:  # device tokens stay, refused while disabled, so enabling the user again lets the devices back in
                    s.execute(delete(Token).where(Token.user_id == user.id, Token.kind != "device"))
            s.commit()

    def set_device_alert_after(self, user_name: str, device_name: str, alert_after: int | None) -> None:
        """A device's own quiet threshold in seconds: None follows its user's, 0 never alerts."""
        with Session(self.engine) as s:
            user = self._user(s, user_name)
            device = s.scalar(select(Device).where(Device.user_id == user.id, Device.name == device_name)) if valid_name(device_name) else None
            if device is None:
                raise Refused(404, "not_found", f"no device {device_name} for {user_name}")
            device.alert_after = alert_after
            s.commit()

    def users(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            return [self._user_row(s, user) for user in s.scalars(select(User).order_by(User.name))]

    def user(self, name: str) -> dict[str, Any]:
        """One user's row of `users()`."""
        with Session(self.engine) as s:
            return self._user_row(s, self._user(s, name))

    @staticmethod
    def _user_row(s: Session, user: User) -> dict[str, Any]:
        used = s.scalar(select(func.coalesce(func.sum(StoredObject.size), 0)).join(Device).where(Device.user_id == user.id))
        devices = s.scalar(select(func.count()).select_from(Device).where(Device.user_id == user.id))
        return {"name": user.name, "created": user.created.isoformat(), "disabled": user.disabled,
                "append_only": user.append_only, "quota": user.quota, "used": int(user.used_bytes),
                "objects_bytes": int(used or 0), "key_scheme": 2 if user.user_key_envelope is not None else 1,
                "devices": int(devices or 0), "enrolled": user.verifier_hash is not None, "alert_after": user.alert_after}

    def _user(self, s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise Refused(404, "not_found", f"no user {name}")
        return user

    # --- login ---
    def login_params(self, name: str) -> dict[str, Any]:
        """The salt and KDF a client derives its verifier (and, in scheme 2, the user key's wrapping key) with."""
        with Session(self.engine) as s:
            user = s.scalar(select(User).where(User.name == name)) if valid_name(name) else None
            if user is not None and user.login_kdf is not None:
                return {"salt": user.login_salt.hex(), "kdf": user.login_kdf, "scheme": 2 if user.user_key_envelope is not None else 1}
            if user is not None:
                return {"salt": user.login_salt.hex(), "kdf": DEFAULT_LOGIN_KDF, "scheme": 2}
        fake_salt = hmac.new(self._secret, b"login salt\0" + name.encode(), "sha256").digest()[:16]
        return {"salt": fake_salt.hex(), "kdf": DEFAULT_LOGIN_KDF, "scheme": 2}

    def enrol(self, user_name: str, code: str, verifier: bytes, kdf: dict[str, Any], device_name: str, envelope: bytes,
              address: str = "") -> tuple[str, str]:
        check_name(device_name, "device")
        self._check_envelope(envelope)
        wrong = Refused(401, "unauthorized", "enrolment code is wrong, used or expired; ask the operator for `stasisfs-server user reissue`")
        with Session(self.engine) as s:
            user = s.scalar(select(User).where(User.name == user_name)) if valid_name(user_name) else None
            row = s.scalar(select(EnrolmentCode).where(EnrolmentCode.code_hash == digest(code.strip())))
            if user is None or row is None or row.user_id != user.id or row.used or aware(row.expires) < now():
                raise wrong
            if user.disabled:
                raise Refused(403, "disabled", "this account is disabled")
            enrolled = user.verifier_hash is not None
            # A code for an account that already has devices adds one, with the password: it never replaces the
            # verifier or the user key, which would cut every other device off from recovery.
            if enrolled and not self._verifier_matches(user, verifier):
                self._throttle(s, user.name, address)
                self._record_failure(s, user.name, address)
                raise Refused(409, "enrolled", "this account already has devices: the code adds another one with the account's "
                                               "current password (derive the verifier with the server's login parameters)")
            # Consumed exactly once, even with concurrent requests on several instances.
            taken = s.execute(update(EnrolmentCode).where(EnrolmentCode.id == row.id, EnrolmentCode.used.is_(False)).values(used=True))
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                raise wrong
            if not enrolled:
                grown = len(envelope) - len(user.user_key_envelope or b"")
                user.verifier_hash = digest(verifier)
                user.login_kdf = kdf
                user.user_key_envelope = envelope
                s.flush()
                self._reserve(s, user.id, grown)
            device = self._device_for_token(s, user, device_name, take_over=True, by="enrolment")
            token = self._new_token(s, "device", user.id, device.id, generation=device.generation)
            s.commit()
            return token, device.name

    def login(self, user_name: str, verifier: bytes, address: str) -> str:
        """A one-hour session token for the right verifier. Guessing is slowed per name and per address (throttle.py)."""
        name = user_name[:64]
        with Session(self.engine) as s:
            self._throttle(s, name, address)
            user = s.scalar(select(User).where(User.name == user_name)) if valid_name(user_name) else None
            if not self._verifier_matches(user, verifier) or user is None or user.disabled:
                self._record_failure(s, name, address)
                raise Refused(401, "unauthorized", "wrong user name or password")
            s.execute(delete(LoginFailure).where(LoginFailure.user_name == name, LoginFailure.address == address))
            token = self._new_token(s, "session", user.id, None, expires=now() + SESSION_LIFETIME)
            s.commit()
            return token

    def _verifier_matches(self, user: User | None, verifier: bytes) -> bool:
        expected = user.verifier_hash if user is not None and user.verifier_hash is not None else digest(self._secret)
        return hmac.compare_digest(expected, digest(verifier))

    def _throttle(self, s: Session, name: str, address: str) -> None:
        moment = now()
        since = moment - throttle.WINDOW

        def failures(*where: Any) -> throttle.Failures:
            count, newest = s.execute(select(func.count(), func.max(LoginFailure.at)).where(LoginFailure.at > since, *where)).one()
            return throttle.Failures(int(count or 0), aware(newest) if newest is not None else None)

        wait = throttle.wait_seconds(moment, failures(LoginFailure.user_name == name, LoginFailure.address == address),
                                     failures(LoginFailure.address == address), failures(LoginFailure.user_name == name))
        if wait > 0:
            seconds = math.ceil(wait)
            raise Refused(429, "rate_limited", f"too many failed logins from this address; try again in {seconds} s", retry_after=seconds)

    def _record_failure(self, s: Session, name: str, address: str) -> None:
        s.execute(delete(LoginFailure).where(LoginFailure.at < now() - throttle.WINDOW))
        s.add(LoginFailure(user_name=name, address=address[:64]))
        s.commit()

    def account(self, principal: Principal) -> dict[str, Any]:
        """What any token of the user may know about the account: its key scheme and password version."""
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            assert user is not None
            return {"user": user.name, "scheme": 2 if user.user_key_envelope is not None else 1,
                    "password_version": user.password_version,
                    "password_changed": aware(user.password_changed).isoformat(timespec="seconds") if user.password_changed else None,
                    "quota": user.quota, "used": int(user.used_bytes)}

    def user_key(self, principal: Principal) -> bytes:
        """The user key wrapped under the password: for password logins only."""
        self._require_session(principal)
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            if user is None or user.user_key_envelope is None:
                raise Refused(404, "not_found", "this account has no user key yet (key scheme 1); log in with a current client to upgrade it")
            return user.user_key_envelope

    def change_password(self, principal: Principal, current: bytes, salt: bytes, kdf: dict[str, Any], verifier: bytes,
                        envelope: bytes, changed: bool, address: str) -> None:
        """Replace the verifier, salt, KDF and user-key envelope at once. Needs a fresh login and the current verifier.

        `changed` is False for a scheme upgrade under the same password, so other devices are not told to update.
        """
        self._require_fresh_session(principal)
        self._check_envelope(envelope)
        with Session(self.engine) as s:
            self._throttle(s, principal.user_name, address)
            user = s.get(User, principal.user_id)
            assert user is not None
            if not self._verifier_matches(user, current):
                self._record_failure(s, principal.user_name, address)
                raise Refused(403, "wrong_password", "the current password is wrong")
            grown = len(envelope) - len(user.user_key_envelope or b"")
            user.verifier_hash = digest(verifier)
            user.login_salt = salt
            user.login_kdf = kdf
            user.user_key_envelope = envelope
            if changed:
                user.password_version += 1
                user.password_changed = now()
                # Other sessions were opened with the old password; this one proved the current password just now.
                s.execute(delete(Token).where(Token.user_id == user.id, Token.kind == "session", Token.id != principal.token_id))
            s.flush()
            self._reserve(s, user.id, grown)
            s.commit()

    def maintenance_token(self, name: str, lifetime: timedelta) -> str:
        """A short-lived token that may delete from an append-only account, for prune on a trusted host."""
        with Session(self.engine) as s:
            user = self._user(s, name)
            token = self._new_token(s, "maintenance", user.id, None, expires=now() + lifetime)
            s.commit()
            return token

    def _new_token(self, s: Session, kind: str, user_id: int, device_id: int | None, expires: datetime | None = None,
                   generation: int | None = None) -> str:
        token = secrets.token_urlsafe(32)
        s.add(Token(token_hash=digest(token), kind=kind, user_id=user_id, device_id=device_id, expires=expires, generation=generation))
        return token

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise Refused(401, "unauthorized", "a bearer token is required")
        with Session(self.engine) as s:
            row = s.scalar(select(Token).where(Token.token_hash == digest(token)))
            # The lookup is by digest; the comparison below is constant-time all the same.
            if row is None or not hmac.compare_digest(row.token_hash, digest(token)):
                raise Refused(401, "unauthorized", "invalid or revoked token")
            if row.expires is not None and aware(row.expires) < now():
                raise Refused(401, "unauthorized", "session expired; log in again")
            user = s.get(User, row.user_id)
            if user is None or user.disabled:
                raise Refused(401, "unauthorized", "this account is disabled")
            if row.kind == "device" and row.device_id is not None:
                device = s.get(Device, row.device_id)
                if device is not None and (row.generation or 1) < device.generation:
                    raise Refused(409, "device_retired", retired_message(device))
            return Principal(user.id, user.name, row.kind, row.device_id, row.id, aware(row.created))

    @staticmethod
    def _require_session(principal: Principal) -> None:
        if principal.kind != "session":
            raise Refused(403, "forbidden", "this needs a password login, not a device token")

    @staticmethod
    def _require_fresh_session(principal: Principal) -> None:
        Service._require_session(principal)
        if principal.issued is None or now() - principal.issued > FRESH_LOGIN:
            raise Refused(403, "reauth_required", "this needs a password login from the last 10 minutes; log in again")

    @staticmethod
    def _check_envelope(envelope: bytes) -> None:
        if not 16 <= len(envelope) <= MAX_ENVELOPE_BYTES:
            raise Refused(400, "malformed", "the wrapped user key is missing or the wrong size")

    # --- devices ---
    def devices(self, principal: Principal | None = None, user_name: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id) if principal is not None else self._user(s, str(user_name))
            assert user is not None
            rows = []
            for device in s.scalars(select(Device).where(Device.user_id == user.id).order_by(Device.name)):
                stored = s.execute(select(func.count(), func.coalesce(func.sum(StoredObject.size), 0)).where(StoredObject.device_id == device.id)).one()
                threshold = effective_alert_after(device.alert_after, user.alert_after, self.default_alert_after)
                rows.append({"name": device.name, "created": device.created.isoformat(), "revoked": device.revoked,
                             "last_upload": device.last_upload.isoformat() if device.last_upload else None,
                             "objects": int(stored[0]), "bytes": int(stored[1]), "generation": device.generation,
                             "taken_over": aware(device.taken_over_at).isoformat(timespec="seconds") if device.taken_over_at else None,
                             "state": device_state(device, threshold), "alert_after": device.alert_after,
                             "effective_alert_after": int(threshold.total_seconds()) if threshold else None,
                             "this": principal is not None and principal.device_id == device.id})
            return rows

    def register_device(self, principal: Principal, name: str, take_over: bool, by: str = "") -> tuple[str, str, bool]:
        """A token for a new device; with `take_over`, for an existing one, whose older copies are retired at once.

        Returns (token, device name, whether an existing device was taken over).
        """
        self._require_fresh_session(principal)
        check_name(name, "device")
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            assert user is not None
            existed = s.scalar(select(Device.id).where(Device.user_id == user.id, Device.name == name)) is not None
            device = self._device_for_token(s, user, name, take_over, by)
            token = self._new_token(s, "device", user.id, device.id, generation=device.generation)
            s.commit()
            return token, device.name, existed

    def _device_for_token(self, s: Session, user: User, name: str, take_over: bool, by: str) -> Device:
        device = s.scalar(select(Device).where(Device.user_id == user.id, Device.name == name))
        if device is not None and not take_over:
            raise Refused(409, "conflict", f"device {name} already exists; choose another name, or take it over with `stasisfs recover`")
        if device is None:
            device = Device(uid=secrets.token_hex(16), user_id=user.id, name=name, generation=1)
            s.add(device)
            s.flush()
        else:
            # Every earlier copy of this device is fenced off from now on: one live writer.
            device.generation += 1
            device.taken_over_at = now()
            device.taken_over_by = by[:200]
        device.revoked = False
        return device

    def revoke_device(self, principal: Principal | None, name: str, user_name: str | None = None) -> None:
        """Cut a device off at once. Its stored data stays, for recovery with the password."""
        if principal is not None:
            self._require_session(principal)
        with Session(self.engine) as s:
            user_id = principal.user_id if principal is not None else self._user(s, str(user_name)).id
            device = s.scalar(select(Device).where(Device.user_id == user_id, Device.name == name)) if valid_name(name) else None
            if device is None:
                raise Refused(404, "not_found", f"no device {name}")
            device.revoked = True
            s.execute(delete(Token).where(Token.device_id == device.id))
            s.commit()

    def device(self, principal: Principal, name: str, write: bool = False) -> DeviceRef:
        """The device a request addresses, if the token may use it; 404 otherwise, so others' devices stay invisible."""
        with Session(self.engine) as s:
            device = s.scalar(select(Device).where(Device.user_id == principal.user_id, Device.name == name)) if valid_name(name) else None
            # Device tokens reach their own device; session and maintenance tokens any device of the user.
            if device is None or (principal.kind == "device" and principal.device_id != device.id):
                raise Refused(404, "not_found", "no such device")
            if write and device.revoked:
                raise Refused(403, "revoked", "this device is revoked")
            if write and principal.kind == "maintenance":
                raise Refused(403, "forbidden", "a maintenance token may list, read and delete, not upload")
            return DeviceRef(device.id, device.uid, device.user_id, device.name)

    # --- quota: every stored byte, reserved before it is written ---
    def _reserve(self, s: Session, user_id: int, nbytes: int) -> None:
        """Add `nbytes` to the user's usage in this transaction, or refuse with 507 if it would pass the quota.

        One conditional UPDATE: the database's row lock makes concurrent reservations add up exactly.
        """
        if nbytes <= 0:
            s.execute(update(User).where(User.id == user_id).values(used_bytes=User.used_bytes + nbytes))
            return
        done = s.execute(update(User).where(User.id == user_id, or_(User.quota.is_(None), User.used_bytes + nbytes <= User.quota))
                         .values(used_bytes=User.used_bytes + nbytes))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            user = s.get(User, user_id)
            used, quota = (user.used_bytes, user.quota) if user is not None else (0, 0)
            raise Refused(507, "quota", f"over quota: {used} of {quota} bytes used, this needs {nbytes} more")

    def _reserve_now(self, user_id: int, nbytes: int) -> None:
        with Session(self.engine) as s:
            self._reserve(s, user_id, nbytes)
            s.commit()

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
            raise Refused(400, "hash_mismatch", "the body does not hash to its id (SHA-256)")
        size = sum(len(p) for p in parts)
        key = object_key(device.uid, kind, object_id)
        with Session(self.engine) as s:
            known = s.get(StoredObject, (device.id, kind, object_id)) is not None
        if known and self._verifies(key, object_id):
            return False
        if not known:  # a heal replaces bytes already counted
            self._reserve_now(device.user_id, size)
        try:
            self.store.put(key, data)
        except BaseException:
            if not known:
                self._reserve_now(device.user_id, -size)
            raise
        with Session(self.engine) as s:
            if not known:
                s.add(StoredObject(device_id=device.id, kind=kind, object_id=object_id, size=size))
            s.execute(update(Device).where(Device.id == device.id).values(last_upload=now()))
            try:
                s.commit()
            except IntegrityError:  # the same object arrived concurrently and was counted once already
                s.rollback()
                self._reserve_now(device.user_id, -size)
            return True

    def _verifies(self, key: str, object_id: str) -> bool:
        try:
            return hashlib.sha256(self.store.get(key)).hexdigest() == object_id
        except ObjectNotFound:
            return False

    def object_size(self, device: DeviceRef, kind: str, object_id: str) -> int:
        check_object(kind, object_id)
        with Session(self.engine) as s:
            row = s.get(StoredObject, (device.id, kind, object_id))
            if row is None:
                raise Refused(404, "not_found", "no such object")
            return row.size

    def get_object(self, device: DeviceRef, kind: str, object_id: str, offset: int = 0, length: int | None = None) -> bytes:
        check_object(kind, object_id)
        try:
            return self.store.get(object_key(device.uid, kind, object_id), offset, length)
        except ObjectNotFound:
            raise Refused(404, "not_found", "no such object") from None

    def stream_object(self, device: DeviceRef, kind: str, object_id: str, offset: int, length: int) -> Iterator[bytes]:
        """A range, piece by piece (ranged S3 reads pass straight through to the client)."""
        check_object(kind, object_id)
        pieces = self.store.stream(object_key(device.uid, kind, object_id), offset, length)
        try:
            first = next(pieces, b"")  # surface a missing object as 404 before the answer starts
        except ObjectNotFound:
            raise Refused(404, "not_found", "no such object") from None
        return itertools.chain([first], pieces)

    def delete_object(self, principal: Principal, device: DeviceRef, kind: str, object_id: str) -> None:
        """Delete an object; 404 when it is not there (the client treats that as done)."""
        check_object(kind, object_id)
        with Session(self.engine) as s:
            user = s.get(User, principal.user_id)
            if user is None or (user.append_only and principal.kind != "maintenance"):
                raise Refused(403, "append_only", "this account is append-only: deletes are refused without a maintenance token")
        if not self._uncatalog(device.id, kind, object_id):
            raise Refused(404, "not_found", "no such object (already deleted?)")
        self.store.delete(object_key(device.uid, kind, object_id))

    def _uncatalog(self, device_id: int, kind: str, object_id: str) -> bool:
        """Drop an object from the catalog and its bytes from its user's usage; False if it was not cataloged."""
        with Session(self.engine) as s:
            size = s.scalar(select(StoredObject.size).where(StoredObject.device_id == device_id, StoredObject.kind == kind,
                                                            StoredObject.object_id == object_id))
            gone = s.execute(delete(StoredObject).where(StoredObject.device_id == device_id, StoredObject.kind == kind,
                                                        StoredObject.object_id == object_id))
            if size is None or gone.rowcount != 1:  # type: ignore[attr-defined]
                s.rollback()
                return False
            user_id = s.scalar(select(Device.user_id).where(Device.id == device_id))
            assert user_id is not None
            self._reserve(s, user_id, -int(size))
            s.commit()
            return True

    def list_objects(self, device: DeviceRef, kind: str, after: str = "", limit: int = 1000) -> tuple[list[tuple[str, int]], str | None]:
        if kind not in KINDS:
            raise Refused(400, "malformed", "unknown object kind")
        if after and OBJECT_ID.fullmatch(after) is None:
            raise Refused(400, "malformed", "malformed `after` cursor")
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
            self._uncatalog(device_id, kind, object_id)
        self._put_meta(LAST_SCRUB, json.dumps({"finished": now().isoformat(timespec="seconds"), **counts}))
        return counts

    def last_scrub(self) -> dict[str, Any] | None:
        """The last scrub's counts and finishing time, whichever instance or admin command ran it."""
        with Session(self.engine) as s:
            row = s.get(Meta, LAST_SCRUB)
            return dict(json.loads(row.value)) if row is not None else None

    def _put_meta(self, key: str, value: str) -> None:
        with Session(self.engine) as s:
            row = s.get(Meta, key)
            if row is None:
                s.add(Meta(key=key, value=value))
            else:
                row.value = value
            s.commit()

    # --- escrow: each device's key wrapped under the user key (scheme 2) or the password (scheme 1) ---
    def put_escrow(self, principal: Principal, device: DeviceRef, blob: bytes) -> int:
        """A new version of the device's escrowed key. Only a fresh password login may write one: never a device token."""
        self._require_fresh_session(principal)
        if not blob or len(blob) > MAX_ESCROW_BYTES:
            raise Refused(413, "too_large", "escrowed key is empty or too large")
        with Session(self.engine) as s:
            latest = s.scalar(select(func.max(EscrowedKey.version)).where(EscrowedKey.device_id == device.id)) or 0
            self._reserve(s, device.user_id, len(blob))
            s.add(EscrowedKey(device_id=device.id, version=latest + 1, blob=blob))
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise Refused(409, "conflict", "another escrow upload for this device arrived at the same moment; try again") from None
        self._drop_escrow_versions(device, keep_from=latest + 2 - ESCROW_VERSIONS_KEPT)
        return latest + 1

    def delete_older_escrows(self, principal: Principal, device: DeviceRef, version: int) -> int:
        """Drop every version older than `version`, which must exist: the client confirmed it opens. Returns how many."""
        self._require_fresh_session(principal)
        with Session(self.engine) as s:
            if s.get(EscrowedKey, (device.id, version)) is None:
                raise Refused(404, "not_found", f"no escrowed key version {version} for this device")
        return self._drop_escrow_versions(device, keep_from=version)

    def _drop_escrow_versions(self, device: DeviceRef, keep_from: int) -> int:
        with Session(self.engine) as s:
            sizes = s.scalars(select(func.length(EscrowedKey.blob)).where(EscrowedKey.device_id == device.id, EscrowedKey.version < keep_from)).all()
            if not sizes:
                return 0
            s.execute(delete(EscrowedKey).where(EscrowedKey.device_id == device.id, EscrowedKey.version < keep_from))
            self._reserve(s, device.user_id, -sum(int(n) for n in sizes))
            s.commit()
            return len(sizes)

    def get_escrow(self, device: DeviceRef) -> tuple[int, bytes]:
        versions = self.escrow_versions(device)
        if not versions:
            raise Refused(404, "not_found", "no escrowed key for this device")
        return versions[0]

    def escrow_versions(self, device: DeviceRef) -> list[tuple[int, bytes]]:
        """Every kept version, newest first: recovery falls back to an older one that opens."""
        with Session(self.engine) as s:
            rows = s.scalars(select(EscrowedKey).where(EscrowedKey.device_id == device.id).order_by(EscrowedKey.version.desc())).all()
            return [(row.version, row.blob) for row in rows]


def effective_alert_after(device_setting: int | None, user_setting: int | None, default: timedelta | None) -> timedelta | None:
    """The device's own threshold, else its user's, else the server's; None when it is never reported quiet."""
    for setting in (device_setting, user_setting):
        if setting is not None:
            return timedelta(seconds=setting) if setting > 0 else None
    return default


def device_state(device: Device, threshold: timedelta | None, moment: datetime | None = None) -> str:
    """`revoked`, `stale` (quiet past its threshold) or `active`."""
    if device.revoked:
        return "revoked"
    last = aware(device.last_upload or device.created)
    if threshold is not None and (moment or now()) - last > threshold:
        return "stale"
    return "active"


def retired_message(device: Device) -> str:
    when = aware(device.taken_over_at).isoformat(timespec="seconds") if device.taken_over_at else "an earlier time"
    return (f"device {device.name} was taken over on {when} by {device.taken_over_by or 'another machine'}; "
            "this copy is retired and may no longer read or write there (its local snapshots stay readable)")
