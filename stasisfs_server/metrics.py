"""Prometheus metrics, served on their own listener (`serve --metrics-listen HOST:PORT`).

Per-device and scrub series are read from the database at each scrape, so every instance reports
the same truth. Request, upload and login-failure counters are this instance's own, as Prometheus
counters are: sum them across instances in queries.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .db import Device, StoredObject, User, aware
from .service import Service


class StoredState(Collector):
    """Gauges from the catalog: what each device stores and when it last uploaded, and the last scrub."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        labels = ["user", "device"]
        last_upload = GaugeMetricFamily("stasis_device_last_upload_timestamp_seconds", "When the device last stored an object (Unix time).", labels=labels)
        stored_bytes = GaugeMetricFamily("stasis_device_stored_bytes", "Bytes of objects the device has stored.", labels=labels)
        stored_objects = GaugeMetricFamily("stasis_device_stored_objects", "Objects the device has stored.", labels=labels)
        revoked = GaugeMetricFamily("stasis_device_revoked", "1 if the device is revoked.", labels=labels)
        used = GaugeMetricFamily("stasis_user_used_bytes", "Every byte the user stores, quota-counted.", labels=["user"])
        quota = GaugeMetricFamily("stasis_user_quota_bytes", "The user's quota (absent: none).", labels=["user"])
        with Session(self.service.engine) as s:
            totals = {device_id: (count, size) for device_id, count, size in s.execute(
                select(StoredObject.device_id, func.count(), func.coalesce(func.sum(StoredObject.size), 0)).group_by(StoredObject.device_id))}
            for device, user_name in s.execute(select(Device, User.name).join(User, User.id == Device.user_id)).tuples():
                names = [user_name, device.name]
                count, size = totals.get(device.id, (0, 0))
                if device.last_upload is not None:
                    last_upload.add_metric(names, aware(device.last_upload).timestamp())
                stored_bytes.add_metric(names, int(size))
                stored_objects.add_metric(names, int(count))
                revoked.add_metric(names, 1 if device.revoked else 0)
            for user in s.scalars(select(User)):
                used.add_metric([user.name], int(user.used_bytes))
                if user.quota:
                    quota.add_metric([user.name], int(user.quota))
        yield from (last_upload, stored_bytes, stored_objects, revoked, used, quota)
        scrub = self.service.last_scrub()
        if scrub is not None:
            finished = GaugeMetricFamily("stasis_scrub_last_finished_timestamp_seconds", "When the last scrub finished (Unix time).")
            finished.add_metric([], datetime.fromisoformat(scrub["finished"]).timestamp())
            objects = GaugeMetricFamily("stasis_scrub_objects", "Objects in the last scrub, by result.", labels=["result"])
            for result in ("checked", "damaged", "missing", "recopied"):
                objects.add_metric([result], int(scrub.get(result, 0)))
            yield from (finished, objects)


class Metrics:
    """This instance's registry and its counters."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StoredState(service))
        self.requests = Counter("stasis_http_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=self.registry)
        self.upload_bytes = Counter("stasis_upload_bytes", "Bytes of objects received and newly stored.", registry=self.registry)
        self.login_failures = Counter("stasis_login_failures", "Refused password logins and enrolments.", registry=self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """Count every answer by its route template (never the raw path: ids would make endless series)."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500

            async def remember(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, remember)
            finally:
                route = getattr(scope.get("route"), "path", None) or ("/ui/static" if scope["path"].startswith("/ui/static/") else "unmatched")
                self.requests.labels(route, scope["method"], str(status)).inc()

        return counted

    def asgi_app(self) -> ASGIApp:
        """/metrics; the lifespan protocol is answered here, which prometheus_client's app does not do."""
        from prometheus_client import make_asgi_app

        exporter = make_asgi_app(self.registry)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif message["type"] == "lifespan.shutdown":
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            await exporter(scope, receive, send)

        return app
