"""The HTTP API under /v1: a thin FastAPI adapter over `Service`.

Blocking work (database, store, hashing) runs in worker threads; the event loop
only moves bytes. Every refusal is a JSON `{"error": reason}` with the status of
interface.md.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __doc__ as package_doc
from .service import Principal, Refused, Service

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
    await JSONResponse({"error": "request body too large"}, status_code=413)(scope, receive, send)


class EnrolRequest(BaseModel):
    user: str = Field(max_length=64)
    code: str = Field(max_length=64)
    verifier: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex of the login verifier the client derived from the password")
    kdf: dict[str, Any]
    device: str = Field(max_length=64)


class LoginRequest(BaseModel):
    verifier: str = Field(pattern=r"^[0-9a-f]{64}$")


class VerifierRequest(BaseModel):
    verifier: str = Field(pattern=r"^[0-9a-f]{64}$")
    kdf: dict[str, Any]


class DeviceRequest(BaseModel):
    name: str = Field(max_length=64)
    resume: bool = Field(False, description="issue a token for an existing device: recovery carries on as it")


class MissingRequest(BaseModel):
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
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
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


def create_app(service: Service, max_object: int = MAX_OBJECT_BYTES) -> ASGIApp:
    app = FastAPI(title="stasisfs-server", version="1", description=package_doc or "", docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else ({"Retry-After": "60"} if exc.status == 429 else None)
        return JSONResponse({"error": exc.reason}, status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "malformed request", "detail": exc.errors()[:5]}, status_code=400)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/users/{user}/params")
    def params(user: str) -> dict[str, Any]:
        return service.login_params(user)

    @app.post("/v1/enrol")
    def enrol(body: EnrolRequest) -> dict[str, str]:
        token, device = service.enrol(body.user, body.code, bytes.fromhex(body.verifier), body.kdf, body.device)
        return {"token": token, "device": device}

    @app.post("/v1/users/{user}/login")
    def login(user: str, body: LoginRequest) -> dict[str, str]:
        return {"token": service.login(user, bytes.fromhex(body.verifier))}

    @app.put("/v1/account/verifier")
    def change_verifier(who: Auth, body: VerifierRequest) -> dict[str, str]:
        service.change_verifier(who, bytes.fromhex(body.verifier), body.kdf)
        return {"status": "ok"}

    @app.get("/v1/devices")
    def devices(who: Auth) -> list[dict[str, Any]]:
        return service.devices(who)

    @app.post("/v1/devices")
    def register_device(who: Auth, body: DeviceRequest) -> dict[str, str]:
        token, device = service.register_device(who, body.name, body.resume)
        return {"token": token, "device": device}

    @app.delete("/v1/devices/{device}")
    def revoke_device(who: Auth, device: str) -> dict[str, str]:
        service.revoke_device(who, device)
        return {"status": "revoked"}

    @app.put("/v1/devices/{device}/key")
    async def put_key(request: Request, device: str) -> dict[str, int]:
        who = await run_in_threadpool(principal, request)
        target = await run_in_threadpool(service.device, who, device, True)
        return {"version": await run_in_threadpool(service.put_escrow, target, await request.body())}

    @app.get("/v1/devices/{device}/key")
    def get_key(who: Auth, device: str) -> Response:
        version, blob = service.get_escrow(service.device(who, device))
        return Response(blob, media_type="application/octet-stream", headers={"X-Key-Version": str(version)})

    @app.get("/v1/devices/{device}/objects/{kind}/")
    def list_objects(who: Auth, device: str, kind: str, after: str = "", limit: int = 1000) -> dict[str, Any]:
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
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        offset, length = span
        pieces = service.stream_object(target, kind, object_id, offset, length)
        return StreamingResponse(iterate_in_threadpool(pieces), status_code=206, media_type="application/octet-stream",
                                 headers={"Content-Range": f"bytes {offset}-{offset + length - 1}/{size}", "Accept-Ranges": "bytes",
                                          "Content-Length": str(length)})

    @app.delete("/v1/devices/{device}/objects/{kind}/{object_id}")
    def delete_object(who: Auth, device: str, kind: str, object_id: str) -> dict[str, str]:
        service.delete_object(who, service.device(who, device), kind, object_id)
        return {"status": "deleted"}

    return BodyLimit(app, max_object)
