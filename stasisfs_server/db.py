"""Accounts, devices, tokens and the object catalog, through SQLAlchemy (SQLite embedded by default).

Secrets are never stored in the clear: tokens, enrolment codes and login
verifiers are kept as SHA-256 digests of high-entropy values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}  # noqa: RUF012 - SQLAlchemy's own attribute


class Meta(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[datetime] = mapped_column(default=now)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    append_only: Mapped[bool] = mapped_column(Boolean, default=False)
    quota: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    login_salt: Mapped[bytes] = mapped_column(LargeBinary(32))
    login_kdf: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    verifier_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    # Key scheme 2: the user key wrapped under the password (see docs/format.md); None on a scheme-1 account.
    user_key_envelope: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # Counts real password changes, so a device whose local slots use an older password can be told.
    password_version: Mapped[int] = mapped_column(Integer, default=0)
    password_changed: Mapped[datetime | None] = mapped_column(nullable=True)
    # Every stored byte of the user (objects, escrowed keys, the envelope), reserved atomically before a write.
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Seconds without an upload before a device of this user is reported quiet; None: the server's
    # --alert-after; 0: never.
    alert_after: Mapped[int | None] = mapped_column(Integer, nullable=True)


class EnrolmentCode(Base):
    __tablename__ = "enrolment_codes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    code_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    expires: Mapped[datetime] = mapped_column()
    used: Mapped[bool] = mapped_column(Boolean, default=False)


class Device(Base):
    __tablename__ = "devices"
    __table_args__ = (UniqueConstraint("user_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The name used in object keys: random, so store layouts reveal neither users nor device names.
    uid: Mapped[str] = mapped_column(String(32), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    name: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(default=now)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_upload: Mapped[datetime | None] = mapped_column(nullable=True)
    # One live writer: a takeover bumps the generation, and tokens of older generations are refused.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    taken_over_at: Mapped[datetime | None] = mapped_column(nullable=True)
    taken_over_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    alert_after: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: the user's threshold; 0: never
    # When the "quiet" alert went out; cleared (and "back" sent) once the device uploads again.
    # Set by a conditional UPDATE, so several server instances send one alert between them.
    quiet_alerted: Mapped[datetime | None] = mapped_column(nullable=True)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "device" or "session"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    device_id: Mapped[int | None] = mapped_column(ForeignKey("devices.id"), nullable=True)
    created: Mapped[datetime] = mapped_column(default=now)
    expires: Mapped[datetime | None] = mapped_column(nullable=True)
    generation: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the device's, for device tokens


class StoredObject(Base):
    __tablename__ = "objects"
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    object_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[datetime] = mapped_column(default=now)


class EscrowedKey(Base):
    __tablename__ = "escrowed_keys"
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[datetime] = mapped_column(default=now)


class LoginFailure(Base):
    """Failed logins, kept in the database so the throttle holds across server instances."""

    __tablename__ = "login_failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str] = mapped_column(String(64), default="", index=True)
    at: Mapped[datetime] = mapped_column(default=now, index=True)


class WebSession(Base):
    """Dashboard access: a one-time login link ("link") or the browser session it became ("session").

    Only the SHA-256 of each secret is kept. `user_id` None with role "admin" is the operator.
    """

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # "link" or "session"
    role: Mapped[str] = mapped_column(String(16))  # "admin" or "user"
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created: Mapped[datetime] = mapped_column(default=now)
    expires: Mapped[datetime] = mapped_column()


def default_db_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir.absolute() / 'stasis.db'}"


def _to_version_2(s: Any) -> None:
    """Key scheme 2, takeover fencing, byte-exact quota and per-address login throttling (issue 17)."""
    from sqlalchemy import text

    added = {
        "users": ["user_key_envelope BYTEA" if _dialect(s) == "postgresql" else "user_key_envelope BLOB",
                  "password_version INTEGER NOT NULL DEFAULT 0", "password_changed TIMESTAMP WITH TIME ZONE",
                  "used_bytes BIGINT NOT NULL DEFAULT 0"],
        "devices": ["generation INTEGER NOT NULL DEFAULT 1", "taken_over_at TIMESTAMP WITH TIME ZONE", "taken_over_by VARCHAR(200)"],
        "tokens": ["generation INTEGER"],
        "login_failures": ["address VARCHAR(64) NOT NULL DEFAULT ''"],
    }
    for table, columns in added.items():
        for column in columns:
            s.execute(text(f"ALTER TABLE {table} ADD COLUMN {column}"))
    s.execute(text("UPDATE tokens SET generation = 1 WHERE kind = 'device'"))
    # What every user stores today: objects and every escrowed version.
    s.execute(text("UPDATE users SET used_bytes = "
                   "(SELECT COALESCE(SUM(o.size), 0) FROM objects o JOIN devices d ON d.id = o.device_id WHERE d.user_id = users.id) + "
                   "(SELECT COALESCE(SUM(LENGTH(k.blob)), 0) FROM escrowed_keys k JOIN devices d ON d.id = k.device_id WHERE d.user_id = users.id)"))


def _to_version_3(s: Any) -> None:
    """Alert thresholds and alert state (issue 22); the web_sessions table is created by create_all."""
    from sqlalchemy import text

    for statement in ("ALTER TABLE users ADD COLUMN alert_after INTEGER", "ALTER TABLE devices ADD COLUMN alert_after INTEGER",
                      "ALTER TABLE devices ADD COLUMN quiet_alerted TIMESTAMP WITH TIME ZONE"):
        s.execute(text(statement))


def _dialect(s: Any) -> str:
    return str(s.get_bind().dialect.name)


SCHEMA_VERSION = 3
# Forward migrations: MIGRATIONS[n] takes a database at version n to n + 1. A new database is made
# at SCHEMA_VERSION by create_all; an older one is brought forward by every instance at start.
MIGRATIONS: list[Any] = [None, _to_version_2, _to_version_3]


def migrate(engine: Engine, fresh: bool) -> int:
    """Bring the schema to SCHEMA_VERSION; refuse a database newer than this server."""
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        row = s.get(Meta, "schema_version")
        # A database without the row predates versioning, which came with version 1.
        version = int(row.value) if row is not None else (SCHEMA_VERSION if fresh else 1)
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"the database has schema version {version}; this server knows up to {SCHEMA_VERSION}: upgrade it")
        try:
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](s)
                version += 1
            if row is None:
                s.add(Meta(key="schema_version", value=str(version)))
            else:
                row.value = str(version)
            s.commit()
        except Exception:
            s.rollback()
            s.expire_all()
            # Another instance migrated at the same moment (the DDL is transactional where it matters).
            again = s.get(Meta, "schema_version")
            if again is None or int(again.value) != SCHEMA_VERSION:
                raise
    return version


def connect(url: str) -> Engine:
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, the maintained driver
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # the admin CLI works while the server runs
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10)
    from sqlalchemy import inspect

    fresh = not inspect(engine).has_table("users")
    if fresh:
        Base.metadata.create_all(engine)
    else:  # tables new in a later version; columns come from the migrations
        Base.metadata.create_all(engine, tables=[t for t in Base.metadata.sorted_tables if not inspect(engine).has_table(t.name)])
    migrate(engine, fresh)
    return engine
