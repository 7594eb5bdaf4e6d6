"""Who may see the dashboard: one-time login links, the browser sessions they become, and CSRF tokens.

A link is made by the operator (`stasisfs-server web-login`) or by a password login
(`stasisfs devices --web`); a device token alone never makes one. Redeeming a link deletes it
and creates a session, in one transaction, so a link opens at most one session. Only SHA-256
digests of links and sessions are stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .db import User, WebSession, aware, now
from .service import Principal, Refused, digest

LINK_LIFETIME = timedelta(minutes=10)
MAX_LINK_LIFETIME = timedelta(days=1)
SESSION_LIFETIME = timedelta(minutes=30)
ADMIN = "admin"
USER = "user"


@dataclass(frozen=True)
class Viewer:
    """The person behind a dashboard session: the operator, or one user."""

    session_id: int
    role: str
    user_id: int | None
    user_name: str | None
    csrf: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_manage(self, user_name: str) -> bool:
        return self.is_admin or self.user_name == user_name


class WebAccess:
    def __init__(self, engine: Engine, server_secret: bytes) -> None:
        self.engine = engine
        self._csrf_key = hmac.new(server_secret, b"stasisfs dashboard csrf", hashlib.sha256).digest()

    def issue_link(self, user_name: str | None, lifetime: timedelta = LINK_LIFETIME) -> str:
        """A one-time login secret for the admin view (`user_name` None) or that user's view."""
        if not timedelta(0) < lifetime <= MAX_LINK_LIFETIME:
            raise Refused(400, "malformed", "a login link lives between a second and a day")
        with Session(self.engine) as s:
            user_id = None
            if user_name is not None:
                user = s.scalar(select(User).where(User.name == user_name))
                if user is None:
                    raise Refused(404, "not_found", f"no user {user_name}")
                if user.disabled:
                    raise Refused(403, "disabled", f"user {user_name} is disabled")
                user_id = user.id
            return self._new(s, "link", ADMIN if user_id is None else USER, user_id, lifetime)

    def link_for(self, principal: Principal) -> str:
        """A link to the user view for someone who just logged in with the password (never a device token)."""
        if principal.kind != "session":
            raise Refused(403, "forbidden", "the dashboard needs a password login, not a device token")
        return self.issue_link(principal.user_name)

    def redeem(self, link: str) -> str:
        """Trade a link for a session secret; each link works once, before it expires."""
        with Session(self.engine) as s:
            row = s.scalar(select(WebSession).where(WebSession.secret_hash == digest(link), WebSession.kind == "link"))
            expired = row is None or aware(row.expires) < now()
            # The delete is the claim: of two redemptions at once, one deletes the row and the other finds none.
            if row is None or s.execute(delete(WebSession).where(WebSession.id == row.id)).rowcount != 1 or expired:  # type: ignore[attr-defined]
                s.commit()
                raise Refused(401, "unauthorized", "this login link was used already or has expired; ask for a new one")
            secret = self._new(s, "session", row.role, row.user_id, SESSION_LIFETIME)
            s.execute(delete(WebSession).where(WebSession.expires < now()))
            s.commit()
            return secret

    def viewer(self, secret: str | None) -> Viewer | None:
        """The session's viewer; None when the cookie is missing, unknown, expired or its user disabled."""
        if not secret or len(secret) > 128:
            return None
        with Session(self.engine) as s:
            row = s.scalar(select(WebSession).where(WebSession.secret_hash == digest(secret), WebSession.kind == "session"))
            if row is None or aware(row.expires) < now():
                return None
            name = None
            if row.user_id is not None:
                user = s.get(User, row.user_id)
                if user is None or user.disabled:
                    return None
                name = user.name
            return Viewer(row.id, row.role, row.user_id, name, self.csrf_token(secret))

    def end(self, viewer: Viewer) -> None:
        with Session(self.engine) as s:
            s.execute(delete(WebSession).where(WebSession.id == viewer.session_id))
            s.commit()

    def csrf_token(self, session_secret: str) -> str:
        """Bound to the session: a token from one session is worthless in another, and nothing extra is stored."""
        return hmac.new(self._csrf_key, session_secret.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _new(s: Session, kind: str, role: str, user_id: int | None, lifetime: timedelta) -> str:
        secret = secrets.token_urlsafe(32)
        s.add(WebSession(secret_hash=digest(secret), kind=kind, role=role, user_id=user_id, expires=now() + lifetime))
        s.commit()
        return secret
