"""The HTTP client of a stasisfs-server, on requests.

One `RemoteClient` per thread (requests sessions are not shared across threads).
Transport seam: pass a `requests.Session` with your own adapters mounted, as
httpx's MockTransport allows. Every download is checked against its id here,
so no caller ever handles unverified bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from stasisfs.errors import IntegrityError, StasisError, UsageError, WrongKey

if TYPE_CHECKING:
    import requests

# requests and urllib3 are imported on first use, not with this module: a backup with no remote, and
# every command's start, are about 50 ms faster without them.

TIMEOUT = (10, 120)  # connect, read (a 16 MiB pack on a slow link)


class RemoteError(StasisError):
    """The server refused or could not be reached; `str()` says which and why, `code` is the server's stable code."""

    def __init__(self, message: str, code: str = "", status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class RemoteUnavailable(RemoteError):
    """Connection refused, timed out, TLS failed, or a 502/503/504: worth trying again later."""


class QuotaExceeded(RemoteError):
    """HTTP 507: the account is full."""


class RemoteAuthError(RemoteError):
    exit_code = WrongKey.exit_code


class DeviceRetired(RemoteError):
    """This copy of the device was taken over by a recovery elsewhere: the server refuses it everything."""


def _session() -> requests.Session:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    # PUTs are idempotent here (content-addressed, never overwriting), so they may be retried too.
    retry = Retry(total=4, connect=4, read=2, status=3, backoff_factor=0.3, status_forcelist=(502, 503, 504),
                  allowed_methods=frozenset({"GET", "HEAD", "PUT", "DELETE"}), raise_on_status=False)
    adapter = HTTPAdapter(max_retries=retry, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


F = TypeVar("F", bound=Callable[..., Any])


def _parses_answers(method: F) -> F:
    """A server's JSON is untrusted input: a malformed answer is a RemoteError naming the call, never a traceback."""
    @functools.wraps(method)
    def wrapper(self: RemoteClient, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise RemoteError(f"remote {self.name} sent a malformed answer to {method.__name__.replace('_', ' ')} "
                              f"({exc.__class__.__name__})", "malformed") from None

    return wrapper  # type: ignore[return-value]


class RemoteClient:
    def __init__(self, url: str, token: str | None = None, cacert: str | None = None, name: str = "",
                 session: requests.Session | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"remote URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.token = token
        self.cacert = cacert
        self.name = name or self.url
        self.session = session or _session()

    # --- plumbing ---
    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kw: Any) -> requests.Response:
        import requests

        headers = dict(kw.pop("headers", {}) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            # verify per request: a session's verify loses to REQUESTS_CA_BUNDLE in the environment (requests #3829).
            response = self.session.request(method, f"{self.url}/v1{path}", headers=headers, timeout=TIMEOUT,
                                            verify=self.cacert or True, **kw)
        except requests.exceptions.SSLError as exc:
            raise RemoteUnavailable(f"remote {self.name}: TLS failed ({exc.__class__.__name__}); pass --cacert if it uses a private CA") from None
        except requests.exceptions.RequestException as exc:
            raise RemoteUnavailable(f"remote {self.name} cannot be reached at {self.url}: {_reason(exc)}") from None
        if response.status_code in ok:
            return response
        code, reason = _refusal(response)
        status = response.status_code
        if status == 401:
            raise RemoteAuthError(f"remote {self.name}: {reason}", code, status)
        if code == "device_retired":
            raise DeviceRetired(f"remote {self.name}: {reason}", code, status)
        if status == 507:
            raise QuotaExceeded(f"remote {self.name} is full for this account: {reason}; ask its operator for more quota or prune", code, status)
        if status in (502, 503, 504):
            raise RemoteUnavailable(f"remote {self.name} is unavailable (HTTP {status})", code, status)
        raise RemoteError(f"remote {self.name} refused {method} {path.split('?')[0]}: HTTP {status}: {reason}", code, status)

    # --- accounts ---
    def health(self) -> None:
        self._request("GET", "/health")

    @_parses_answers
    def login_params(self, user: str) -> tuple[bytes, dict[str, Any], int]:
        """(salt, KDF parameters, key scheme) the account's password is derived with."""
        doc = self._request("GET", f"/users/{_seg(user)}/params").json()
        try:
            return bytes.fromhex(doc["salt"]), dict(doc["kdf"]), int(doc.get("scheme", 1))
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"remote {self.name} sent malformed login parameters", "malformed") from None

    @_parses_answers
    def enrol(self, user: str, code: str, verifier: bytes, kdf: dict[str, Any], device: str, envelope: bytes) -> str:
        doc = self._request("POST", "/enrol", json={"user": user, "code": code, "verifier": verifier.hex(), "kdf": kdf, "device": device,
                                                    "envelope": base64.b64encode(envelope).decode()}).json()
        return str(doc["token"])

    @_parses_answers
    def login(self, user: str, verifier: bytes) -> str:
        try:
            return str(self._request("POST", f"/users/{_seg(user)}/login", json={"verifier": verifier.hex()}).json()["token"])
        except RemoteAuthError as exc:
            raise RemoteAuthError(f"remote {self.name}: wrong user name or password", exc.code, exc.status) from None

    @_parses_answers
    def account(self) -> dict[str, Any]:
        return dict(self._request("GET", "/account").json())

    def user_key(self) -> bytes:
        return self._request("GET", "/account/key").content

    def change_password(self, current: bytes, salt: bytes, kdf: dict[str, Any], verifier: bytes, envelope: bytes, changed: bool) -> None:
        self._request("PUT", "/account/password", json={"current": current.hex(), "salt": salt.hex(), "kdf": kdf, "verifier": verifier.hex(),
                                                         "envelope": base64.b64encode(envelope).decode(), "changed": changed})

    @_parses_answers
    def devices(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/devices").json())

    @_parses_answers
    def register_device(self, name: str, take_over: bool = False, host: str = "") -> tuple[str, bool]:
        """(device token, whether an existing device was taken over)."""
        doc = self._request("POST", "/devices", json={"name": name, "take_over": take_over, "host": host}).json()
        return str(doc["token"]), bool(doc.get("taken_over"))

    def revoke_device(self, name: str) -> None:
        self._request("DELETE", f"/devices/{_seg(name)}")

    @_parses_answers
    def web_login(self) -> str:
        """A one-time URL to the user's dashboard; the server gives one to a password login only."""
        path = str(self._request("POST", "/account/web-login").json()["path"])
        if not path.startswith("/ui/login?t="):
            raise RemoteError(f"remote {self.name} sent a malformed dashboard link", "malformed")
        return self.url + path

    # --- escrow ---
    @_parses_answers
    def put_key(self, device: str, blob: bytes) -> int:
        return int(self._request("PUT", f"/devices/{_seg(device)}/key", data=blob,
                                 headers={"Content-Type": "application/octet-stream"}).json()["version"])

    def get_key(self, device: str) -> bytes:
        return self._request("GET", f"/devices/{_seg(device)}/key").content

    @_parses_answers
    def get_keys(self, device: str) -> list[tuple[int, bytes]]:
        """Every kept version of the device's escrowed key, newest first."""
        doc = self._request("GET", f"/devices/{_seg(device)}/keys").json()
        try:
            return [(int(k["version"]), base64.b64decode(k["blob"])) for k in doc["keys"]]
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"remote {self.name} sent a malformed list of escrowed keys", "malformed") from None

    def delete_older_keys(self, device: str, version: int) -> None:
        self._request("DELETE", f"/devices/{_seg(device)}/keys", params={"older_than": version})

    # --- objects ---
    def put_object(self, device: str, kind: str, object_id: str, data: bytes | memoryview) -> bool:
        """Upload; False if the server already had a good copy."""
        response = self._request("PUT", f"/devices/{_seg(device)}/objects/{kind}/{object_id}", ok=(200, 201), data=data,
                                 headers={"Content-Type": "application/octet-stream"})
        return response.status_code == 201

    def delete_object(self, device: str, kind: str, object_id: str) -> bool:
        """Delete; False if it was not there. RemoteError 403 on an append-only account."""
        response = self._request("DELETE", f"/devices/{_seg(device)}/objects/{kind}/{object_id}", ok=(200, 404))
        return response.status_code == 200

    def get_object(self, device: str, kind: str, object_id: str) -> bytes:
        data = self._request("GET", f"/devices/{_seg(device)}/objects/{kind}/{object_id}").content
        if hashlib.sha256(data).hexdigest() != object_id:
            raise IntegrityError(f"remote {self.name} served a damaged {kind} object {object_id[:16]}")
        return data

    def get_range_upto(self, device: str, kind: str, object_id: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset`: shorter only where the object ends."""
        response = self._request("GET", f"/devices/{_seg(device)}/objects/{kind}/{object_id}", ok=(206,),
                                 headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        total = int(response.headers.get("Content-Range", "/0").rsplit("/", 1)[1] or 0)
        if len(response.content) != min(length, total - offset):
            raise IntegrityError(f"remote {self.name} served a short range of {kind} object {object_id[:16]}")
        return response.content

    def list_objects(self, device: str, kind: str) -> Iterator[tuple[str, int]]:
        after = ""
        while True:
            page, after = self._listing_page(device, kind, after)
            yield from page
            if not after:
                return

    @_parses_answers
    def _listing_page(self, device: str, kind: str, after: str) -> tuple[list[tuple[str, int]], str]:
        doc = self._request("GET", f"/devices/{_seg(device)}/objects/{kind}/", params={"after": after, "limit": 5000}).json()
        return [(str(entry["id"]), int(entry["size"])) for entry in doc["objects"]], str(doc.get("next") or "")

    @_parses_answers
    def missing(self, device: str, kind: str, ids: list[str]) -> set[str]:
        result: set[str] = set()
        for start in range(0, len(ids), 5000):
            doc = self._request("POST", f"/devices/{_seg(device)}/objects/{kind}/missing", json={"ids": ids[start : start + 5000]}).json()
            result.update(doc["missing"])
        return result


class PerThread:
    """A RemoteClient per thread (requests sessions are not thread-safe), made on first use."""

    def __init__(self, make: Callable[[], RemoteClient]) -> None:
        self._make = make
        self._local = threading.local()

    def __call__(self) -> RemoteClient:
        client: RemoteClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._make()
        return client


def _seg(name: str) -> str:
    """A path segment; names are validated by the server, this only keeps them from being read as paths."""
    return quote(name, safe="")


def _refusal(response: requests.Response) -> tuple[str, str]:
    """(code, detail) of a refusal; older servers sent {"error": reason} without a code."""
    try:
        doc = response.json()
        return str(doc.get("code") or ""), str(doc.get("detail") or doc.get("error") or response.reason)
    except (ValueError, AttributeError):
        return "", response.reason or f"HTTP {response.status_code}"


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused (is the server running?)"
    if "timed out" in text.lower():
        return "timed out"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    return exc.__class__.__name__
