"""The HTTP API under /v1: a thin FastAPI adapter over `Service`.

Blocking work (database, store, hashing) runs in worker threads; the event loop
only moves bytes. Every refusal is a JSON `{"code": stable code, "detail": sentence}`
with the statuses and codes of docs/format.md; clients act on `code`, never on the sentence.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __doc__ as package_doc
from .metrics import Metrics
from .service import Principal, Refused, Service
from .web.dashboard import create_dashboard, static_files
from .webaccess import WebAccess

MAX_OBJECT_BYTES = 128 * 1024 * 1024
MAX_REQUEST_BYTES = 256 * 1024  # everything that is not an object upload
_OBJECT_PUT = re.compile(r"^/v1/devices/[^/]+/objects/[^/]+/[^/]+$")


class BodyLimit:
    """Refuse oversized request bodies with 413 before they are buffered, declared length or not."""

    def __init__(self, app: ASGIApp, max_object: int = MAX_OBJECT_BYTES) -> None:
        self.app = app
        self.max_object = max_object

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_object if scope["method"] == "PUT" and _OBJECT_PUT.match(scope["path"]) else MAX_REQUEST_BYTES
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await too_large(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, "request body too large")  # answered by the app's exception handling
            return message

        await self.app(scope, limited_receive, send)


async def too_large(scope: Scope, receive: Receive, send: Send) -> None:
    await JSONResponse(refusal("too_large", "request body too large"), status_code=413)(scope, receive, send)


def refusal(code: str, detail: str) -> dict[str, str]:
    return {"code": code, "detail": detail}


# pydantic matches patterns with Rust's regex, whose `$` is the end of the text: no trailing newline gets through.
HEX32 = r"^[0-9a-f]{64}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ENVELOPE = r"^[A-Za-z0-9+/]{20,5000}={0,2}$"
STATUS_CODES = {400: "malformed", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                409: "conflict", 413: "too_large", 415: "unsupported_media_type", 416: "range_not_satisfiable", 429: "rate_limited"}


class Strict(BaseModel):
    """No coercion and no unknown fields: a NaN, a float or a stray key is a 400, never a 500."""

    model_config = ConfigDict(extra="forbid", strict=True)


class KdfParams(Strict):
    """Argon2id parameters, bounded: whatever a client sends is served back to every other client."""

    name: Literal["argon2id"]
    iterations: int = Field(ge=1, le=64)
    memory_kib: int = Field(ge=8, le=1024 * 1024)
    lanes: int = Field(ge=1, le=64)


class EnrolRequest(Strict):
    user: str = Field(max_length=64)
    code: str = Field(max_length=64)
    verifier: str = Field(pattern=HEX32, description="hex of the login verifier the client derived from the password")
    kdf: KdfParams
    device: str = Field(pattern=NAME_PATTERN)
    envelope: str = Field(pattern=ENVELOPE, description="base64 of the user key wrapped under the password (docs/format.md)")


class LoginRequest(Strict):
    verifier: str = Field(pattern=HEX32)


class PasswordRequest(Strict):
    current: str = Field(pattern=HEX32, description="the verifier of the current password: proof beside the fresh session")
    salt: str = Field(pattern=r"^(?:[0-9a-f]{2}){16,32}$")
    kdf: KdfParams
    verifier: str = Field(pattern=HEX32)
    envelope: str = Field(pattern=ENVELOPE)
    changed: bool = Field(True, description="false for a key-scheme upgrade under the same password")


class DeviceRequest(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    take_over: bool = Field(False, description="take over an existing device: its older copies are retired at once")
    host: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,64}$", description="a label for the machine taking over, shown to the retired copy")


class MissingRequest(Strict):
    ids: list[str] = Field(max_length=10000)


async def receive_hashed(request: Request) -> tuple[list[bytes], str]:
    """The body as received, hashed on the way in: SHA-256 runs in a thread while the next bytes arrive."""
    hasher = hashlib.sha256()
    parts: list[bytes] = []
    async for chunk in request.stream():
        if len(chunk) >= 256 * 1024:
            await run_in_threadpool(hasher.update, chunk)
        elif chunk:
            hasher.update(chunk)
        if chunk:
            parts.append(chunk)
    return parts, hasher.hexdigest()


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(offset, length) for a single `bytes=` range; None when it cannot be satisfied."""
    # At most 18 digits: larger numbers are no size we hold, and int() of thousands of digits raises.
    match = re.fullmatch(r"bytes=(\d{0,18})-(\d{0,18})", header.strip())
    if not match or match[1] == match[2] == "":
        return None
    if match[1] == "":
        length = min(int(match[2]), size)
        return (size - length, length) if length > 0 else None
    start = int(match[1])
    end = min(int(match[2]), size - 1) if match[2] else size - 1
    if start >= size or end < start:
        return None
    return start, end - start + 1


def principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    service: Service = request.app.state.service
    return service.authenticate(token.strip() if scheme.lower() == "bearer" else None)


Auth = Annotated[Principal, Depends(principal)]


def client_address(request: Request) -> str:
    """The TCP peer: what the login throttle counts by (a proxy in front would need its own limits)."""
    return request.client.host if request.client is not None else ""


def from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise Refused(400, "malformed", "not valid base64") from None


def create_app(service: Service, max_object: int = MAX_OBJECT_BYTES, metrics: Metrics | None = None) -> ASGIApp:
    """The whole HTTP surface: the API under /v1 and the dashboard under /ui, counted by `metrics`."""
    app = FastAPI(title="stasisfs-server", version="1", description=package_doc or "", docs_url=None, redoc_url=None)
    app.state.service = service
    metrics = metrics or Metrics(service)
    access = WebAccess(service.engine, service.secret)
    app.include_router(create_dashboard(service, access))
    app.mount("/ui/static", static_files(), name="ui-static")
    log = logging.getLogger("stasisfs_server")

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(exc.retry_after)}
        return JSONResponse(refusal(exc.code, exc.detail), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(refusal(STATUS_CODES.get(exc.status_code, "error"), str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5])
        return JSONResponse(refusal("malformed", f"malformed request: {problems}"), status_code=400)

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")  # the traceback stays in the server's log; the client learns nothing of it
        return JSONResponse(refusal("internal", "internal server error"), status_code=500)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/users/{user}/params")
    def params(user: str) -> dict[str, Any]:
        return service.login_params(user)

    @app.post("/v1/enrol")
    def enrol(request: Request, body: EnrolRequest) -> dict[str, str]:
        with counting_failures(metrics):
            token, device = service.enrol(body.user, body.code, bytes.fromhex(body.verifier), body.kdf.model_dump(), body.device,
                                          from_base64(body.envelope), client_address(request))
        return {"token": token, "device": device}

    @app.post("/v1/users/{user}/login")
    def login(request: Request, user: str, body: LoginRequest) -> dict[str, str]:
        with counting_failures(metrics):
            return {"token": service.login(user, bytes.fromhex(body.verifier), client_address(request))}

    @app.post("/v1/account/web-login")
    def web_login(who: Auth) -> dict[str, str]:
        """A one-time dashboard link for the user: for a password login only, never a device token."""
        return {"path": f"/ui/login?t={access.link_for(who)}"}

    @app.get("/v1/account")
    def account(who: Auth) -> dict[str, Any]:
        return service.account(who)

    @app.get("/v1/account/key")
    def user_key(who: Auth) -> Response:
        return Response(service.user_key(who), media_type="application/octet-stream")

    @app.put("/v1/account/password")
    def change_password(request: Request, who: Auth, body: PasswordRequest) -> dict[str, str]:
        service.change_password(who, bytes.fromhex(body.current), bytes.fromhex(body.salt), body.kdf.model_dump(), bytes.fromhex(body.verifier),
                                from_base64(body.envelope), body.changed, client_address(request))
        return {"status": "ok"}

    @app.get("/v1/devices")
    def devices(who: Auth) -> list[dict[str, Any]]:
        return service.devices(who)

    @app.post("/v1/devices")
    def register_device(request: Request, who: Auth, body: DeviceRequest) -> dict[str, Any]:
        by = f"{client_address(request)} (host {body.host})" if body.host else client_address(request)
        token, device, taken_over = service.register_device(who, body.name, body.take_over, by)
        return {"token": token, "device": device, "taken_over": taken_over}

    @app.delete("/v1/devices/{device}")
    def revoke_device(who: Auth, device: str) -> dict[str, str]:
        service.revoke_device(who, device)
        return {"status": "revoked"}

    @app.put("/v1/devices/{device}/key", openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
    async def put_key(request: Request, device: str) -> dict[str, int]:
        who = await run_in_threadpool(principal, request)
        target = await run_in_threadpool(service.device, who, device, True)
        return {"version": await run_in_threadpool(service.put_escrow, who, target, await request.body())}

    @app.get("/v1/devices/{device}/key")
    def get_key(who: Auth, device: str) -> Response:
        version, blob = service.get_escrow(service.device(who, device))
        return Response(blob, media_type="application/octet-stream", headers={"X-Key-Version": str(version)})

    @app.get("/v1/devices/{device}/keys")
    def list_keys(who: Auth, device: str) -> dict[str, list[dict[str, Any]]]:
        versions = service.escrow_versions(service.device(who, device))
        return {"keys": [{"version": v, "blob": base64.b64encode(blob).decode()} for v, blob in versions]}

    @app.delete("/v1/devices/{device}/keys")
    def delete_older_keys(who: Auth, device: str, older_than: Annotated[int, Query(ge=1, le=2**31)]) -> dict[str, int]:
        return {"deleted": service.delete_older_escrows(who, service.device(who, device), older_than)}

    @app.get("/v1/devices/{device}/objects/{kind}/")
    def list_objects(who: Auth, device: str, kind: str, after: str = "",
                     limit: Annotated[int, Query(ge=1, le=10000)] = 1000) -> dict[str, Any]:
        page, cursor = service.list_objects(service.device(who, device), kind, after, limit)
        return {"objects": [{"id": i, "size": size} for i, size in page], "next": cursor}

    @app.post("/v1/devices/{device}/objects/{kind}/missing")
    def missing(who: Auth, device: str, kind: str, body: MissingRequest) -> dict[str, list[str]]:
        return {"missing": service.missing(service.device(who, device), kind, body.ids)}

    @app.put("/v1/devices/{device}/objects/{kind}/{object_id}", openapi_extra={"requestBody": {"content": {"application/octet-stream": {}}}})
    async def put_object(request: Request, device: str, kind: str, object_id: str) -> JSONResponse:
        who = await run_in_threadpool(principal, request)
        target = await run_in_threadpool(service.device, who, device, True)
        parts, sha256 = await receive_hashed(request)
        stored = await run_in_threadpool(service.put_object, target, kind, object_id, parts, sha256)
        if stored:
            metrics.upload_bytes.inc(sum(len(p) for p in parts))
        return JSONResponse({"stored": stored}, status_code=201 if stored else 200)

    @app.head("/v1/devices/{device}/objects/{kind}/{object_id}")
    def head_object(who: Auth, device: str, kind: str, object_id: str) -> Response:
        size = service.object_size(service.device(who, device), kind, object_id)
        return Response(headers={"Content-Length": str(size), "Accept-Ranges": "bytes"})

    @app.get("/v1/devices/{device}/objects/{kind}/{object_id}")
    def get_object(request: Request, who: Auth, device: str, kind: str, object_id: str) -> Response:
        target = service.device(who, device)
        wanted = request.headers.get("range")
        if wanted is None:
            return Response(service.get_object(target, kind, object_id), media_type="application/octet-stream", headers={"Accept-Ranges": "bytes"})
        size = service.object_size(target, kind, object_id)
        span = parse_range(wanted, size)
        if span is None:
            return JSONResponse(refusal("range_not_satisfiable", f"the range cannot be served from an object of {size} bytes"),
                                status_code=416, headers={"Content-Range": f"bytes */{size}"})
        offset, length = span
        pieces = service.stream_object(target, kind, object_id, offset, length)
        return StreamingResponse(iterate_in_threadpool(pieces), status_code=206, media_type="application/octet-stream",
                                 headers={"Content-Range": f"bytes {offset}-{offset + length - 1}/{size}", "Accept-Ranges": "bytes",
                                          "Content-Length": str(length)})

    @app.delete("/v1/devices/{device}/objects/{kind}/{object_id}")
    def delete_object(who: Auth, device: str, kind: str, object_id: str) -> dict[str, str]:
        service.delete_object(who, service.device(who, device), kind, object_id)
        return {"status": "deleted"}

    return BodyLimit(metrics.middleware(app), max_object)


@contextlib.contextmanager
def counting_failures(metrics: Metrics) -> Iterator[None]:
    """Count refused logins and enrolments (wrong secrets and throttled attempts) in the metrics."""
    try:
        yield
    except Refused as exc:
        if exc.code in ("unauthorized", "enrolled", "rate_limited"):
            metrics.login_failures.inc()
        raise
