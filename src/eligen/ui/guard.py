"""What keeps other web pages out of the app (an ASGI middleware in the manner of Starlette's
``TrustedHostMiddleware``): a request whose ``Host`` is not an address the app serves (or a name given with
``--allowed-host``) is refused, so a DNS-rebound page never reaches it; a state-changing request from another origin
(``Origin`` or ``Sec-Fetch-Site``) is refused, and so is one that is not ``application/json`` (which no form or
no-cors request can send); when the app listens beyond loopback every request needs the access key printed at
start (kept by the browser as a same-site cookie); and every answer forbids framing and carries a content-security
policy that lets the page load nothing but its own files."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = ("GET", "HEAD")
KEY_COOKIE = "eligen_key"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def host_name(header: str | None) -> str | None:
    """The host of a ``Host`` header, lowercased, without port or IPv6 brackets (None when malformed)."""
    if not header:
        return None
    try:
        parts = urlsplit(f"//{header}")
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return None
    return parts.hostname


class Guard:
    """The checks above, around ``app``. ``hosts``: the names and addresses the page may be reached by;
    ``access_key``: required of every request when given."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str], access_key: str | None = None):
        self.app = app
        self.hosts = {h.lower().strip("[]") for h in hosts}
        self.access_key = access_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        problem = self._refusal(scope, headers)
        if problem is not None:
            status, message = problem
            await _send_json(send, status, {"errors": [{"message": message, "entity": None, "field": None,
                                                        "todo": False}]})
            return
        if self.access_key is not None and scope["method"] == "GET" and self._key_in_query(scope):
            await _send_redirect(send, f"{KEY_COOKIE}={self.access_key}; HttpOnly; SameSite=Strict; Path=/")
            return

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    response_headers[name] = value
            await send(message)

        await self.app(scope, receive, secured)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        host = host_name(headers.get("host"))
        if host is None or host not in self.hosts:
            return 403, ("this app answers only requests addressed to it by the address it printed (or a name "
                         "given with --allowed-host)")
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and origin != f"{scope.get('scheme', 'http')}://{headers['host']}":
                return 403, "requests from other web pages are refused"
            if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return 403, "requests from other web pages are refused"
            if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                return 415, "the app takes JSON requests only (Content-Type: application/json)"
        if self.access_key is not None and not self._has_key(scope, headers):
            return 401, ("this app needs its access key: open the address `eligen ui` printed when it started "
                         "(it ends in ?key=...)")
        return None

    def _key_in_query(self, scope: Scope) -> bool:
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [""])[0]
        return bool(given) and secrets.compare_digest(given, self.access_key or "")

    def _has_key(self, scope: Scope, headers: Headers) -> bool:
        cookies = dict(part.strip().split("=", 1) for part in headers.get("cookie", "").split(";") if "=" in part)
        given = cookies.get(KEY_COOKIE, "")
        return secrets.compare_digest(given, self.access_key or "") or self._key_in_query(scope)


async def _send_json(send: Send, status: int, data: dict) -> None:
    body = json.dumps(data).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_redirect(send: Send, cookie: str) -> None:
    """The key moves from the address into a cookie, and the address bar loses it."""
    headers = [(b"location", b"/"), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]
    headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
