"""Quiet-device alerts: one message when a device stops uploading, one when it comes back.

Every instance checks; the database decides who sends. A device is claimed with a conditional
UPDATE (`quiet_alerted IS NULL` → now), and released the same way once it uploads again, so of
several instances checking at once exactly one sends each message. A message that cannot be
delivered releases its claim, to be tried again at the next check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from .db import Device, User, aware, now
from .durations import format_duration
from .service import Service, effective_alert_after

MAX_CHECK_INTERVAL = timedelta(minutes=5)
MIN_CHECK_INTERVAL = timedelta(seconds=1)
log = logging.getLogger("stasisfs_server.alerts")


@dataclass(frozen=True)
class Notice:
    kind: str  # "quiet" or "back"
    user: str
    device: str
    last_upload: datetime | None
    threshold: timedelta | None

    @property
    def title(self) -> str:
        if self.kind == "quiet":
            over = format_duration(self.threshold.total_seconds()) if self.threshold else "its threshold"
            return f"stasisfs: {self.device} of {self.user} has not backed up for over {over}"
        return f"stasisfs: {self.device} of {self.user} is backing up again"

    @property
    def body(self) -> str:
        last = f"{aware(self.last_upload):%Y-%m-%d %H:%M:%S} UTC" if self.last_upload else "never"
        if self.kind == "quiet":
            return (f"User {self.user}, device {self.device}: last upload {last}. "
                    "Check that the machine is on, that its schedule runs (`stasisfs schedule list`), and run `stasisfs sync` by hand.")
        return f"User {self.user}, device {self.device}: uploaded again at {last}."


def check_interval(service: Service) -> timedelta:
    """min(smallest threshold / 4, 5 min): a quiet device is reported within a quarter of its threshold."""
    with Session(service.engine) as s:
        set_here = [n for n in s.scalars(select(User.alert_after).where(User.alert_after > 0))]
        set_here += [n for n in s.scalars(select(Device.alert_after).where(Device.alert_after > 0))]
    thresholds = [timedelta(seconds=n) for n in set_here if n]
    if service.default_alert_after:
        thresholds.append(service.default_alert_after)
    interval = min([t / 4 for t in thresholds] + [MAX_CHECK_INTERVAL])
    return max(interval, MIN_CHECK_INTERVAL)


def claim_notices(service: Service, moment: datetime | None = None) -> list[Notice]:
    """The messages due now, each claimed in the database by this instance alone."""
    moment = moment or now()
    due: list[Notice] = []
    with Session(service.engine) as s:
        rows = s.execute(select(Device, User).join(User, User.id == Device.user_id)
                         .where(Device.revoked.is_(False), User.disabled.is_(False))).tuples().all()
        for device, user in rows:
            threshold = effective_alert_after(device.alert_after, user.alert_after, service.default_alert_after)
            if device.quiet_alerted is None:
                if threshold is None:
                    continue
                cutoff = moment - threshold
                if aware(device.last_upload or device.created) >= cutoff:
                    continue
                claimed = s.execute(update(Device).where(
                    Device.id == device.id, Device.quiet_alerted.is_(None),
                    or_(Device.last_upload.is_(None), Device.last_upload < cutoff)).values(quiet_alerted=moment))
                kind = "quiet"
            else:
                if device.last_upload is None or aware(device.last_upload) <= aware(device.quiet_alerted):
                    continue
                claimed = s.execute(update(Device).where(
                    Device.id == device.id, Device.quiet_alerted.is_not(None), Device.last_upload > Device.quiet_alerted).values(quiet_alerted=None))
                kind = "back"
            s.commit()
            if claimed.rowcount == 1:  # type: ignore[attr-defined]
                due.append(Notice(kind, user.name, device.name, device.last_upload, threshold))
    return due


def release(service: Service, notice: Notice) -> None:
    """Undo a claim whose message did not go out, so the next check tries again."""
    with Session(service.engine) as s:
        device = s.scalar(select(Device).join(User, User.id == Device.user_id).where(User.name == notice.user, Device.name == notice.device))
        if device is not None:
            device.quiet_alerted = None if notice.kind == "quiet" else (notice.last_upload or now()) - timedelta(seconds=1)
            s.commit()


def apprise_sender(urls: Sequence[str]) -> Callable[[Notice], bool]:
    """Deliver through apprise: mailto://, ntfy://, gotify://, matrix://, json:// and the rest."""
    import apprise

    targets = apprise.Apprise()
    for url in urls:
        if not targets.add(url):
            raise ValueError(f"--notify {url!r} is not a URL apprise knows (see https://github.com/caronc/apprise/wiki)")

    def send(notice: Notice) -> bool:
        kind = apprise.NotifyType.WARNING if notice.kind == "quiet" else apprise.NotifyType.SUCCESS
        return bool(targets.notify(title=notice.title, body=notice.body, notify_type=kind))

    return send


def run_check(service: Service, send: Callable[[Notice], bool]) -> list[Notice]:
    """One round: claim what is due, send it, release what could not be sent. Returns what went out."""
    sent = []
    for notice in claim_notices(service):
        try:
            delivered = send(notice)
        except Exception:
            log.exception("sending an alert failed")
            delivered = False
        if delivered:
            log.info("alert sent: %s", notice.title)
            sent.append(notice)
        else:
            log.warning("alert not delivered, will retry: %s", notice.title)
            release(service, notice)
    return sent
