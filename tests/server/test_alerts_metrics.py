"""Alerts when a device goes quiet (to a real JSON webhook on loopback) and the Prometheus metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from server_fixture import QuietHandler, Server, auth, enrol, free_port, login, new_database, obj, serve_on_loopback

pytestmark = pytest.mark.timeout(180)


class Webhook:
    """An HTTP endpoint that keeps every JSON body POSTed to it."""

    def __init__(self, port: int = 0) -> None:
        received: list[dict[str, Any]] = []

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

        self.received = received
        self.httpd = serve_on_loopback(Handler, port)

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait_for(self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.received):
                return list(self.received)
            time.sleep(0.1)
        raise AssertionError(f"the webhook did not get what was expected in {timeout} s; it got {self.received}")


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.httpd.shutdown()


def quiet(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if "has not backed up" in m["title"]]


def back(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if "backing up again" in m["title"]]


def test_two_instances_send_one_alert_and_one_back_message(tmp_path: Path, postgres: str, webhook: Webhook) -> None:
    shared = ["--db", new_database(postgres), "--store", f"file://{tmp_path / 'objects'}"]
    serve = ["--alert-after", "3s", "--notify", webhook.url]
    first = Server(tmp_path / "one", extra_args=shared, serve_args=serve)
    second = Server(tmp_path / "two", extra_args=shared, serve_args=serve)
    first.start()
    second.start()
    try:
        enrol(first, "bob", "desktop")
        assert first.admin("device", "set", "bob", "desktop", "--alert-after", "never").returncode == 0
        token = enrol(first, "alice", "laptop")
        # Quiet since enrolment: one alert, from one of the two instances, naming the user, the device and the last upload.
        webhook.wait_for(lambda got: len(quiet(got)) >= 1)
        time.sleep(3)  # a dozen more checks on each instance
        alerts = quiet(webhook.received)
        assert len(alerts) == 1, alerts
        assert "laptop of alice" in alerts[0]["title"] and "last upload never" in alerts[0]["message"]
        assert not any("desktop" in m["title"] for m in webhook.received), "bob's device has alerts turned off"
        # It uploads again: one "back" message.
        assert requests.put(obj(second, "laptop", b"hello"), data=b"hello", headers=auth(token), timeout=30).status_code == 201
        webhook.wait_for(lambda got: len(back(got)) >= 1)
        time.sleep(1)
        returned = back(webhook.received)
        assert len(returned) == 1 and "laptop of alice" in returned[0]["title"], returned
    finally:
        first.stop()
        second.stop()


def test_a_users_own_threshold_alerts_without_a_server_default(tmp_path: Path, webhook: Webhook) -> None:
    srv = Server(tmp_path / "data", serve_args=["--notify", webhook.url])
    srv.start()
    try:
        enrol(srv, "alice", "laptop")
        enrol(srv, "carol", "phone")
        assert srv.admin("user", "set", "alice", "--alert-after", "2s").returncode == 0
        wrong = srv.admin("user", "set", "alice", "--alert-after", "fortnight")
        assert wrong.returncode == 2 and "is not a duration" in wrong.stderr
        got = webhook.wait_for(lambda got: len(quiet(got)) >= 1)
        time.sleep(2)
        assert [m["title"] for m in quiet(webhook.received)] == [got[0]["title"]]
        assert "laptop of alice" in got[0]["title"] and "over 2s" in got[0]["title"]
        assert not any("carol" in m["title"] for m in webhook.received), "carol has no threshold, nor has the server"
    finally:
        srv.stop()


def test_an_undeliverable_alert_is_tried_again(tmp_path: Path) -> None:
    port = free_port()  # nothing listens yet
    srv = Server(tmp_path / "data", serve_args=["--alert-after", "1s", "--notify", f"json://127.0.0.1:{port}/hook"])
    srv.start()
    try:
        enrol(srv, "alice", "laptop")
        time.sleep(3)  # several checks fail to deliver
        hook = Webhook(port)  # now it does
        hook.wait_for(lambda got: len(quiet(got)) == 1)
        hook.httpd.shutdown()
    finally:
        srv.stop()


def test_a_notify_url_apprise_does_not_know_is_a_usage_error(tmp_path: Path) -> None:
    srv = Server(tmp_path / "data")
    done = srv.admin("serve", "--listen", "127.0.0.1:0", "--notify", "nonsense-scheme://x")
    assert done.returncode == 2 and "--notify" in done.stderr and "Traceback" not in done.stderr


def scrape(port: int) -> str:
    answer = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert answer.status_code == 200
    return answer.text


def test_metrics_show_every_device_requests_uploads_failures_and_scrubs(tmp_path: Path) -> None:
    port = free_port()
    srv = Server(tmp_path / "data", serve_args=["--metrics-listen", f"127.0.0.1:{port}"])
    srv.start()
    try:
        token = enrol(srv, "alice", "laptop")
        enrol(srv, "bob", "desktop")
        assert requests.put(obj(srv, "laptop", b"x" * 1000), data=b"x" * 1000, headers=auth(token), timeout=30).status_code == 201
        assert requests.post(f"{srv.url}/v1/users/alice/login", json={"verifier": "00" * 32}, timeout=30).status_code == 401
        assert login(srv, "alice").status_code == 200
        before = time.time()
        text = scrape(port)
        lines = text.splitlines()
        upload = next(line for line in lines if line.startswith('stasis_device_last_upload_timestamp_seconds{device="laptop",user="alice"}'))
        assert before - 60 < float(upload.split()[-1]) <= before
        assert 'stasis_device_stored_bytes{device="laptop",user="alice"} 1000.0' in lines
        assert 'stasis_device_stored_objects{device="laptop",user="alice"} 1.0' in lines
        assert 'stasis_device_stored_objects{device="desktop",user="bob"} 0.0' in lines
        assert "stasis_upload_bytes_total 1000.0" in lines
        assert "stasis_login_failures_total 1.0" in lines
        assert any(line.startswith('stasis_http_requests_total{method="PUT",route="/v1/devices/{device}/objects/{kind}/{object_id}",status="201"} 1.0')
                   for line in lines)
        assert "stasis_scrub_objects" not in text  # no scrub has run
        assert srv.admin("scrub").returncode == 0
        after_scrub = scrape(port).splitlines()
        assert 'stasis_scrub_objects{result="checked"} 1.0' in after_scrub
        assert 'stasis_scrub_objects{result="damaged"} 0.0' in after_scrub
        # Object ids never become label values: series stay bounded.
        assert "0" * 10 not in text and "/objects/data/" not in text
    finally:
        srv.stop()
