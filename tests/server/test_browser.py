"""The dashboard in a real browser: Debian's headless Chromium driven through chromedriver (selenium).

Set STASISFS_SCREENSHOTS=DIR to keep the pages as PNG files (docs/screenshots comes from this).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cli
from server_fixture import QuietHandler, Server, serve_on_loopback

pytestmark = pytest.mark.timeout(240)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), "Debian's chromium and chromium-driver: scripts/test installs them"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> None:
    where = os.environ.get("STASISFS_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(where) / f"{name}.png"))


def open_link(driver: Any, link: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(link)
    driver.find_element(By.ID, "continue").click()


def text_of(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def wait_text(driver: Any, needle: str, timeout: float = 30) -> str:
    """The page's text once it shows `needle` (a click's navigation finishes on its own time)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def shows(d: Any) -> str | bool:
        try:
            text = text_of(d)
        except WebDriverException as exc:  # Chromium's form of a stale element, mid-navigation
            if "does not belong to the document" in str(exc):
                return False
            raise
        return text if needle in text else False

    try:
        return str(WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(shows))
    except TimeoutException:
        raise AssertionError(f"the page never showed {needle!r}; it shows: {text_of(driver)}") from None


class AttackerPage:
    """Another origin on the same machine (same site, other port) serving a form that posts to the dashboard."""

    def __init__(self, action: str) -> None:
        page = (f'<html><body><form method="post" action="{action}"><input type="hidden" name="csrf" value="guessed">'
                '<input type="hidden" name="confirm" value="yes">'
                '<button id="win" type="submit">Claim your prize</button></form></body></html>').encode()

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

        self.httpd = serve_on_loopback(Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"


def test_a_user_opens_a_link_revokes_a_device_and_its_next_sync_is_refused(cli: Cli, server: Server, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    # alice's laptop backs up and syncs; her old phone (enrolled over the API) should go.
    cli.ok("init", "--device", "laptop")
    cli.add_remote(server, user="alice")
    cli.backup(cli.tree({"notes.txt": "the dashboard never sees this"}))
    old_phone = cli.another_machine("phone")
    old_phone.ok("init", "--device", "old-phone")
    old_phone.ok("remote", "add", "home", server.url, "--user", "alice")
    old_phone.backup(cli.tree({"photo.jpg": os.urandom(5000)}, name="photos"))

    # The one-time link comes from a password login on the laptop.
    links = cli.ok("devices", "--web").stdout.decode().split()
    assert len(links) == 1 and links[0].startswith(f"{server.url}/ui/login?t=")
    open_link(browser, links[0])
    page = wait_text(browser, "alice's devices")
    assert "alice's devices" in page and "laptop" in page and "old-phone" in page
    assert "notes.txt" not in browser.page_source
    screenshot(browser, "user-view")

    browser.find_element(By.ID, "revoke-alice-old-phone").click()
    wait_text(browser, "Revoke old-phone?")
    browser.find_element(By.ID, "confirm-revoke").click()
    wait_text(browser, "revoked")
    assert "revoked" in browser.find_element(By.ID, "device-alice-old-phone").text
    refused = old_phone.run("sync")
    assert refused.returncode != 0 and b"revoked" in refused.stderr, refused.stderr
    assert cli.run("sync").returncode == 0  # the laptop goes on

    # The same link does not open a second session, in this browser or any other.
    open_link(browser, links[0])
    wait_text(browser, "used already or has expired")

    # A forged form from another origin is refused, and revokes nothing.
    browser.get(f"{server.url}/ui/")
    attacker = AttackerPage(f"{server.url}/ui/users/alice/devices/laptop/revoke")
    try:
        browser.get(attacker.url)
        browser.find_element(By.ID, "win").click()
        wait_text(browser, "CSRF check failed")
    finally:
        attacker.httpd.shutdown()
    browser.get(f"{server.url}/ui/")
    assert "active" in browser.find_element(By.ID, "device-alice-laptop").text
    assert cli.run("sync").returncode == 0

    # Sign out: the session is gone, and so is every device figure.
    browser.find_element(By.ID, "logout").click()
    wait_text(browser, "You are signed out")
    browser.get(f"{server.url}/ui/")
    assert "laptop" not in wait_text(browser, "Not signed in")


def test_the_operator_sees_every_user_issues_a_code_and_disables_a_user(cli: Cli, server: Server, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    cli.ok("init", "--device", "laptop")
    cli.add_remote(server, user="alice")
    cli.backup(cli.tree({"a.txt": "a"}))
    server.add_user("bob", "--quota", "5000000000", "--append-only")
    assert server.admin("scrub").returncode == 0
    link = server.admin("web-login").stdout.strip().splitlines()[-1]
    open_link(browser, link)
    page = wait_text(browser, "Users and devices")
    assert "Users and devices" in page and "alice" in page and "bob" in page and "laptop" in page
    assert "Last scrub finished" in page and "0 damaged, 0 missing" in page
    assert "append-only" in browser.find_element(By.ID, "user-bob").text
    screenshot(browser, "admin-view")

    browser.find_element(By.ID, "code-bob").click()
    wait_text(browser, "Enrolment code for bob")
    code = browser.find_element(By.ID, "code").text
    assert len(code) == 27 and code.count("-") == 3
    assert f"--enrol-code {code}" in text_of(browser)
    browser.get(f"{server.url}/ui/")
    browser.find_element(By.ID, "disable-alice").click()
    wait_text(browser, "disabled")
    assert "disabled" in browser.find_element(By.ID, "user-alice").text
    refused = cli.run("sync")
    assert refused.returncode != 0 and b"disabled" in refused.stderr
    browser.find_element(By.ID, "enable-alice").click()
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "disable-alice")))
    assert cli.run("sync").returncode == 0, "enabling the user lets the device back in"


def test_the_browser_gets_a_secure_cookie_under_tls(tmp_path: Path, browser: Any) -> None:
    """Behind TLS the session cookie is Secure (the certificate is our own, so the browser is told to accept it)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    srv = Server(tmp_path / "data", serve_args=["--tls-cert", str(cert), "--tls-key", str(key)])
    srv.start()
    try:
        assert srv.url.startswith("https://")
        link = srv.admin("web-login").stdout.strip().splitlines()[-1]
        assert link.startswith("https://")
        browser.execute_cdp_cmd("Security.setIgnoreCertificateErrors", {"ignore": True})
        open_link(browser, link)
        wait_text(browser, "Users and devices")
        cookie = browser.get_cookie("stasis_ui")
        assert cookie is not None and cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    finally:
        srv.stop()
