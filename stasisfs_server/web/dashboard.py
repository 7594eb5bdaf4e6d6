"""The dashboard at /ui/: server-rendered pages over `Service` and `WebAccess`, no JavaScript.

Reading needs a session cookie (HttpOnly, SameSite=Strict, Secure under TLS) made from a one-time
link. Every form carries the session's CSRF token, and a POST without it, or from another origin,
is refused. The pages show what the server already knows (names, sizes, times) and nothing it
could not: it holds no key.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from ..durations import format_duration, parse_duration
from ..service import Refused, Service
from ..webaccess import SESSION_LIFETIME, Viewer, WebAccess

HERE = Path(__file__).parent
COOKIE = "stasis_ui"
# No scripts at all and no framing. Referers stay on this origin, so a login link in the address bar never
# leaks to another site (and the browser still sends Origin on our own forms: no-referrer would make it "null").
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

templates = Jinja2Templates(directory=str(HERE / "templates"))


def human_size(n: int | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def when(iso: str | None) -> str:
    """An ISO time as `2026-12-07 10:42 UTC (3h ago)`."""
    if not iso:
        return "never"
    moment = datetime.fromisoformat(iso)
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    age = (datetime.now(UTC) - moment).total_seconds()
    ago = "just now"
    for unit in (86400, 3600, 60):  # whole days, else whole hours, else whole minutes
        if age >= unit:
            ago = f"{format_duration(age - age % unit)} ago"
            break
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC ({ago})"


def threshold(seconds: int | None, inherited: str) -> str:
    if seconds is None:
        return inherited
    return "never" if seconds == 0 else format_duration(seconds)


templates.env.filters["size"] = human_size
templates.env.filters["when"] = when
templates.env.globals["threshold"] = threshold


def parse_alert_setting(text: str) -> int | None:
    """A form's threshold: empty or `default` inherits, `never` (or 0) turns alerts off, else a duration."""
    text = text.strip().lower()
    if text in ("", "default"):
        return None
    if text in ("never", "0", "off"):
        return 0
    try:
        return int(parse_duration(text).total_seconds())
    except ValueError as exc:
        raise Refused(400, "malformed", str(exc)) from None


def create_dashboard(service: Service, access: WebAccess) -> APIRouter:
    router = APIRouter(prefix="/ui", include_in_schema=False)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def refusal_page(request: Request, exc: Refused, viewer: Viewer | None = None) -> HTMLResponse:
        return page(request, "message.html", exc.status, title="Refused", message=exc.detail, viewer=viewer)

    def viewer_of(request: Request) -> Viewer | None:
        return access.viewer(request.cookies.get(COOKIE))

    async def form_action(request: Request, act: Callable[[Viewer, dict[str, str]], Response | None]) -> Response:
        """A POST from one of our forms: a live session, our own origin and its CSRF token, then `act`."""
        viewer = await run_in_threadpool(viewer_of, request)
        if viewer is None:
            return page(request, "message.html", 401, title="Signed out", message="Your session ended. Open a new login link.", viewer=None)
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        origin = request.headers.get("origin")
        same_origin = origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"
        if not same_origin or not hmac.compare_digest(form.get("csrf", ""), viewer.csrf):
            return page(request, "message.html", 403, title="Refused", message="This form did not come from this dashboard (CSRF check failed).",
                        viewer=viewer)
        try:
            done = await run_in_threadpool(act, viewer, form)
        except Refused as exc:
            return refusal_page(request, exc, viewer)
        return done if done is not None else RedirectResponse("/ui/", status_code=303)

    def managed(viewer: Viewer, user_name: str) -> str:
        """The user a form acts on, if this viewer may: the operator anyone, a user themself (others stay invisible)."""
        if not viewer.may_manage(user_name):
            raise Refused(404, "not_found", f"no user {user_name}")
        return user_name

    def admin_only(viewer: Viewer) -> None:
        if not viewer.is_admin:
            raise Refused(403, "forbidden", "only the operator may do this")

    @router.get("/")
    async def home(request: Request) -> Response:
        viewer = await run_in_threadpool(viewer_of, request)
        if viewer is None:
            return page(request, "signed_out.html", 401, viewer=None)
        data = await run_in_threadpool(overview, viewer)
        return page(request, "admin.html" if viewer.is_admin else "user.html", viewer=viewer, **data)

    def overview(viewer: Viewer) -> dict[str, Any]:
        default = service.default_alert_after
        inherited = format_duration(default.total_seconds()) if default else "never"
        if viewer.is_admin:
            users = service.users()
            return {"users": [{**u, "device_rows": service.devices(user_name=u["name"])} for u in users],
                    "scrub": service.last_scrub(), "server_default": inherited}
        assert viewer.user_name is not None
        return {"user": service.user(viewer.user_name), "devices": service.devices(user_name=viewer.user_name), "server_default": inherited}

    @router.get("/login")
    async def login_page(request: Request, t: str = "") -> Response:
        # Opening the link only shows a button: link previews and scanners that GET it do not use it up.
        if not t:
            return page(request, "message.html", 400, title="No link", message="Open the whole login link you were given.", viewer=None)
        return page(request, "login.html", link=t, viewer=None)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = await request.form()
        link = form.get("t")
        try:
            secret = await run_in_threadpool(access.redeem, link if isinstance(link, str) else "")
        except Refused as exc:
            return refusal_page(request, exc)
        response = RedirectResponse("/ui/", status_code=303)
        response.set_cookie(COOKIE, secret, max_age=int(SESSION_LIFETIME.total_seconds()), path="/ui", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        response.headers.update(SECURITY_HEADERS)
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        def end(viewer: Viewer, _form: dict[str, str]) -> Response:
            access.end(viewer)
            response = page(request, "message.html", title="Signed out", message="You are signed out. This browser holds no session now.",
                            viewer=None)
            response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict", secure=request.url.scheme == "https")
            return response

        return await form_action(request, end)

    @router.post("/users/{user_name}/code")
    async def enrolment_code(request: Request, user_name: str) -> Response:
        def issue(viewer: Viewer, _form: dict[str, str]) -> Response:
            code = service.reissue(managed(viewer, user_name))
            return page(request, "code.html", viewer=viewer, user_name=user_name, code=code, base=f"{request.url.scheme}://{request.url.netloc}")

        return await form_action(request, issue)

    @router.post("/users/{user_name}/devices/{device_name}/revoke")
    async def revoke(request: Request, user_name: str, device_name: str) -> Response:
        def act(viewer: Viewer, form: dict[str, str]) -> Response | None:
            managed(viewer, user_name)
            if form.get("confirm") != "yes":  # it cannot be undone from here: one more click, on a page that says so
                return page(request, "confirm_revoke.html", viewer=viewer, user_name=user_name, device_name=device_name)
            service.revoke_device(None, device_name, user_name=user_name)
            return None

        return await form_action(request, act)

    async def set_disabled(request: Request, user_name: str, disabled: bool) -> Response:
        def act(viewer: Viewer, _form: dict[str, str]) -> None:
            admin_only(viewer)
            service.set_user(user_name, disabled=disabled)

        return await form_action(request, act)

    @router.post("/users/{user_name}/disable")
    async def disable(request: Request, user_name: str) -> Response:
        return await set_disabled(request, user_name, True)

    @router.post("/users/{user_name}/enable")
    async def enable(request: Request, user_name: str) -> Response:
        return await set_disabled(request, user_name, False)

    @router.post("/users/{user_name}/alert-after")
    async def user_alert_after(request: Request, user_name: str) -> Response:
        return await form_action(request, lambda viewer, form: service.set_user(
            managed(viewer, user_name), alert_after=parse_alert_setting(form.get("alert_after", ""))))

    @router.post("/users/{user_name}/devices/{device_name}/alert-after")
    async def device_alert_after(request: Request, user_name: str, device_name: str) -> Response:
        return await form_action(request, lambda viewer, form: service.set_device_alert_after(
            managed(viewer, user_name), device_name, parse_alert_setting(form.get("alert_after", ""))))

    return router


def static_files() -> Callable[[Any, Any, Any], Awaitable[None]]:
    from starlette.staticfiles import StaticFiles

    return StaticFiles(directory=str(HERE / "static"))
