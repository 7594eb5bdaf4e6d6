"""The dashboard (/ui/) over HTTP, as an attacker and a careless user would meet it: links, cookies, CSRF, who sees what."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import requests
from server_fixture import TEST_ENVELOPE, TEST_KDF, Server, auth, enrol, login, obj

pytestmark = pytest.mark.timeout(120)


def web_link(server: Server, *options: str) -> str:
    done = server.admin("web-login", *options)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def sign_in(link: str) -> requests.Session:
    """Open a one-time link as a browser would: the page, then its button."""
    browser = requests.Session()
    page = browser.get(link, timeout=30)
    assert page.status_code == 200 and 'action="/ui/login"' in page.text
    secret = re.search(r'name="t" value="([^"]+)"', page.text)
    assert secret is not None
    answer = browser.post(link.split("/ui/")[0] + "/ui/login", data={"t": secret[1]}, timeout=30, allow_redirects=False)
    assert answer.status_code == 303, answer.text
    return browser


def csrf_of(page: str) -> str:
    token = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert token is not None
    return token[1]


def test_without_a_session_the_dashboard_shows_no_ones_data(server: Server) -> None:
    enrol(server, "alice", "secret-laptop")
    for cookies in ({}, {"stasis_ui": "forged"}, {"stasis_ui": "x" * 5000}):
        page = requests.get(f"{server.url}/ui/", cookies=cookies, timeout=30)
        assert page.status_code == 401
        assert "alice" not in page.text and "secret-laptop" not in page.text
        assert "stasisfs devices --web" in page.text  # it says how to get in


def test_a_login_link_works_once_and_makes_a_strict_httponly_cookie(server: Server) -> None:
    server.add_user("alice")
    link = web_link(server)
    assert link.startswith(server.url + "/ui/login?t=")
    # Opening the page (a link preview, a scanner) does not use the link up.
    for _ in range(2):
        assert requests.get(link, timeout=30).status_code == 200
    secret = link.split("t=", 1)[1]
    first = requests.post(f"{server.url}/ui/login", data={"t": secret}, timeout=30, allow_redirects=False)
    assert first.status_code == 303
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP here; under TLS it is Secure (test_tls)
    assert first.headers["referrer-policy"] == "same-origin"
    again = requests.post(f"{server.url}/ui/login", data={"t": secret}, timeout=30, allow_redirects=False)
    assert again.status_code == 401 and "used already or has expired" in again.text
    # An expired link opens nothing either.
    short = web_link(server, "--expires", "1s").split("t=", 1)[1]
    time.sleep(1.5)
    late = requests.post(f"{server.url}/ui/login", data={"t": short}, timeout=30, allow_redirects=False)
    assert late.status_code == 401
    bad = server.admin("web-login", "--expires", "soon")
    assert bad.returncode == 2 and "is not a duration" in bad.stderr and "Traceback" not in bad.stderr


def test_a_user_sees_and_acts_on_their_own_devices_only(server: Server) -> None:
    enrol(server, "alice", "laptop")
    enrol(server, "bob", "bobs-phone")
    alice = sign_in(web_link(server, "--user", "alice"))
    page = alice.get(f"{server.url}/ui/", timeout=30).text
    assert "laptop" in page and "bob" not in page
    token = csrf_of(page)
    # Bob's device is invisible to alice, even with her own valid CSRF token.
    attempt = alice.post(f"{server.url}/ui/users/bob/devices/bobs-phone/revoke", data={"csrf": token, "confirm": "yes"}, timeout=30)
    assert attempt.status_code == 404
    disable = alice.post(f"{server.url}/ui/users/alice/disable", data={"csrf": token}, timeout=30)
    assert disable.status_code == 403  # only the operator disables users
    assert login(server, "bob").status_code == 200 and login(server, "alice").status_code == 200


def test_forms_without_the_csrf_token_or_from_another_origin_are_refused(server: Server) -> None:
    enrol(server, "alice")
    admin = sign_in(web_link(server))
    token = csrf_of(admin.get(f"{server.url}/ui/", timeout=30).text)
    target = f"{server.url}/ui/users/alice/disable"
    assert admin.post(target, data={}, timeout=30).status_code == 403
    assert admin.post(target, data={"csrf": "0" * 64}, timeout=30).status_code == 403
    assert admin.post(target, data={"csrf": token}, headers={"Origin": "http://evil.example"}, timeout=30).status_code == 403
    # A token from another session is worthless in this one.
    other = csrf_of(sign_in(web_link(server)).get(f"{server.url}/ui/", timeout=30).text)
    assert admin.post(target, data={"csrf": other}, timeout=30).status_code == 403
    assert login(server, "alice").status_code == 200, "a refused form changed something"
    # The real form works, and the change holds.
    done = admin.post(target, data={"csrf": token}, timeout=30)
    assert done.status_code == 200 and "Enable" in done.text
    assert login(server, "alice").status_code == 401


def test_a_device_token_never_opens_the_user_view_and_a_password_login_does(server: Server) -> None:
    device_token = enrol(server, "alice")
    refused = requests.post(f"{server.url}/v1/account/web-login", headers=auth(device_token), timeout=30)
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    session_token = login(server, "alice").json()["token"]
    path = requests.post(f"{server.url}/v1/account/web-login", headers=auth(session_token), timeout=30).json()["path"]
    alice = sign_in(server.url + path)
    assert "alice's devices" in alice.get(f"{server.url}/ui/", timeout=30).text


def test_logout_ends_the_session_on_the_server(server: Server) -> None:
    server.add_user("alice")
    admin = sign_in(web_link(server))
    cookie = str(admin.cookies["stasis_ui"])
    token = csrf_of(admin.get(f"{server.url}/ui/", timeout=30).text)
    out = admin.post(f"{server.url}/ui/logout", data={"csrf": token}, timeout=30)
    assert out.status_code == 200 and "signed out" in out.text
    # The cookie is gone from the browser, and a copy of it is worthless.
    assert "stasis_ui" not in admin.cookies
    assert requests.get(f"{server.url}/ui/", cookies={"stasis_ui": cookie}, timeout=30).status_code == 401


def test_thresholds_and_codes_from_the_dashboard(server: Server) -> None:
    enrol(server, "alice")
    alice = sign_in(web_link(server, "--user", "alice"))
    token = csrf_of(alice.get(f"{server.url}/ui/", timeout=30).text)
    assert alice.post(f"{server.url}/ui/users/alice/alert-after", data={"csrf": token, "alert_after": "36h"}, timeout=30).status_code == 200
    assert alice.post(f"{server.url}/ui/users/alice/devices/laptop/alert-after", data={"csrf": token, "alert_after": "never"},
                      timeout=30).status_code == 200
    wrong = alice.post(f"{server.url}/ui/users/alice/alert-after", data={"csrf": token, "alert_after": "soonish"}, timeout=30)
    assert wrong.status_code == 400 and "is not a duration" in wrong.text
    users = server.admin("user", "list", "--json").stdout
    assert '"alert_after": 129600' in users
    devices = server.admin("device", "list", "alice", "--json").stdout
    assert '"alert_after": 0' in devices and '"effective_alert_after": null' in devices
    code_page = alice.post(f"{server.url}/ui/users/alice/code", data={"csrf": token}, timeout=30)
    code = re.search(r'id="code">([0-9a-f-]+)<', code_page.text)
    assert code is not None and f"--enrol-code {code[1]}" in code_page.text
    # The code adds a device only with the account's password; a wrong one is refused and changes nothing.
    body = {"user": "alice", "code": code[1], "verifier": "99" * 32, "kdf": TEST_KDF, "device": "tablet", "envelope": TEST_ENVELOPE}
    refused = requests.post(f"{server.url}/v1/enrol", json=body, timeout=30)
    assert refused.status_code == 409 and refused.json()["code"] == "enrolled"
    assert login(server, "alice").status_code == 200
    body["verifier"] = hashlib.sha256(b"alice").hexdigest()
    added = requests.post(f"{server.url}/v1/enrol", json=body, timeout=30)
    assert added.status_code == 200
    tablet = added.json()["token"]
    assert requests.put(obj(server, "tablet", b"x"), data=b"x", headers=auth(tablet), timeout=30).status_code == 201
    session = login(server, "alice").json()["token"]
    assert requests.get(f"{server.url}/v1/account/key", headers=auth(session), timeout=30).content == b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def test_hostile_requests_to_the_dashboard_never_get_a_server_error(server: Server) -> None:
    enrol(server, "alice")
    admin = sign_in(web_link(server))
    token = csrf_of(admin.get(f"{server.url}/ui/", timeout=30).text)
    attempts: list[requests.Response] = [
        requests.post(f"{server.url}/ui/login", data=b"t=%ZZ%00\xff", headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30),
        requests.post(f"{server.url}/ui/login", files={"t": ("x.bin", b"\x00" * 1000)}, timeout=30),
        requests.post(f"{server.url}/ui/login", data={"t": "x" * 100_000}, timeout=30),
        requests.post(f"{server.url}/ui/login", data=b"\xff\xfe" * 10, headers={"Content-Type": "multipart/form-data; boundary=zz"}, timeout=30),
        requests.get(f"{server.url}/ui/login", params={"t": "<script>alert(1)</script>"}, timeout=30),
        requests.get(f"{server.url}/ui/", cookies={"stasis_ui": "\x7f" * 100}, timeout=30),
        admin.post(f"{server.url}/ui/users/{'x' * 300}/code", data={"csrf": token}, timeout=30),
        admin.post(f"{server.url}/ui/users/alice/devices/..%2f..%2fetc/revoke", data={"csrf": token, "confirm": "yes"}, timeout=30),
        admin.post(f"{server.url}/ui/users/alice/alert-after", data={"csrf": token, "alert_after": "9" * 40 + "d"}, timeout=30),
        admin.post(f"{server.url}/ui/users/alice/alert-after", data={"csrf": [token, token], "alert_after": "1d"}, timeout=30),
        admin.post(f"{server.url}/ui/users/alice/alert-after", data=b"csrf=" + token.encode() + b"&" * 100_000,
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30),
        admin.post(f"{server.url}/ui/users/alice/disable", data=b"x" * 300_000, timeout=30),
    ]
    for answer in attempts:
        assert answer.status_code < 500, (answer.request.method, answer.request.url, answer.status_code, answer.text[:300])
    reflected = attempts[4].text
    assert "<script>alert(1)</script>" not in reflected and "&lt;script&gt;" in reflected  # escaped, and no script runs (CSP)
    assert attempts[-1].status_code == 413
    assert login(server, "alice").status_code == 200  # none of it disabled alice
