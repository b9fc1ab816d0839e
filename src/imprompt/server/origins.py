"""Which web pages may use the API: a request for a host name the server does not answer to (its `Host` header),
or from a web page of another site (its `Origin` header), is refused with a 403 before anything else reads it.

Why: a browser sends a page's cross-site POST without asking anyone (CORS only keeps the page from reading the
answer), so without this any page the user visits could run generations on http://127.0.0.1:7860; and a page whose
own name is pointed at 127.0.0.1 after it loaded (DNS rebinding) is same-origin with the API and could read every
answer too. Its requests carry its own name as `Host`, which the server does not answer to.

The server answers to localhost, 127.0.0.1 (any loopback address), [::1], the address a connection came in on (a
server bound to 0.0.0.0 is reached at its machine's addresses), and the names in `allowed_hosts` ("*": any; then
only the API key protects it). A request with an `Origin` is taken when that origin is the server's own (the page
at `/`) or one the operator listed, as A1111's `--cors-allow-origins` / `--cors-allow-origins-regex` list them;
those also get CORS headers (Starlette's CORSMiddleware), so their pages can read the answers. Clients that are not
browsers (webuiapi, httpx, curl) send no Origin and are not affected.
"""

from __future__ import annotations

import ipaddress
import re

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import CrossSiteError, shown

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def add_origin_checks(app: FastAPI, allowed_hosts=(), allow_origins=(), allow_origin_regex: str | None = None) -> None:
    """Refuse cross-site requests (outside the API key check, so a listed origin's CORS preflight, which carries no
    key, is answered); add CORS headers for the origins listed."""
    if allow_origins or allow_origin_regex:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_origin_regex=allow_origin_regex,
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=True)  # fmt: skip
    app.add_middleware(SameSite, allowed_hosts=allowed_hosts, allow_origins=allow_origins,
                       allow_origin_regex=allow_origin_regex)  # fmt: skip


class SameSite:
    """The Host and Origin checks (see the module's docstring)."""

    def __init__(self, app: ASGIApp, allowed_hosts=(), allow_origins=(), allow_origin_regex: str | None = None):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {_normal(h) for h in LOOPBACK_NAMES} | {_normal(host_and_port(h)[0]) for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allow_origins}
        self.origin_regex = re.compile(allow_origin_regex) if allow_origin_regex else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1") or None
        error = self.refusal(host, origin, scope.get("server"))
        if error is None:
            await self.app(scope, receive, send)
            return
        response = JSONResponse({"error": type(error).__name__, "detail": str(error)}, error.http_status)
        await response(scope, receive, send)

    def refusal(self, host: str, origin: str | None, server) -> CrossSiteError | None:
        """Why a request with these headers is refused (None: it is not). `server`: the ASGI server's (address,
        port) of the connection, which the client does not choose."""
        name, _ = host_and_port(host)
        reached = _normal(str(server[0])) if server and server[0] is not None else None
        if host and not self.any_host and not self.answers_to(name, reached):
            return CrossSiteError(
                f"Host {shown(host)}: not a name this server answers to (localhost, 127.0.0.1, [::1], the address "
                f"it was reached at, and the names given with --allowed-hosts); a web page whose own name points at "
                f"this server (DNS rebinding) is what this refuses. If you reach the server by this name, start it "
                f"with --allowed-hosts {name or '<name>'}"
            )
        if origin is not None and not self.takes_origin(origin, host):
            return CrossSiteError(
                f"a request from the web page at {shown(origin)} (its Origin header), another site than this "
                f"server ({shown(host)}): refused, so that the pages you visit cannot use the API through your "
                f"browser. If that page is yours, start the server with --cors-allow-origins {origin.rstrip('/')} "
                f"(or --cors-allow-origins-regex)"
            )
        return None

    def answers_to(self, name: str, reached: str | None) -> bool:
        normal = _normal(name)
        return normal in self.hosts or normal == reached or _loopback(normal)

    def takes_origin(self, origin: str, host: str) -> bool:
        given = origin.rstrip("/").lower()
        if given in self.origins or (self.origin_regex is not None and self.origin_regex.fullmatch(origin)):
            return True
        scheme, sep, rest = given.partition("://")
        if not sep or not host:
            return False  # "null" (a sandboxed page, a file), or no Host to compare with
        name, port = host_and_port(rest)
        host_name, host_port = host_and_port(host)
        default = DEFAULT_PORTS.get(scheme)
        return _normal(name) == _normal(host_name) and (port or default) == (host_port or default)


def host_and_port(value: str) -> tuple[str, int | None]:
    """A Host header or an origin's authority as (name, port): "[::1]:7860" -> ("::1", 7860), "Example.com." ->
    ("example.com", None). Anything else (a malformed port) gives a port of -1, which matches nothing."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        name, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if port and not port.isdigit():
        return name, -1
    return name.rstrip("."), int(port) if port else None


def _normal(name: str) -> str:
    """One spelling per address: "::ffff:127.0.0.1" and "127.0.0.1" are one, "0:0::1" and "::1" too."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name.lower().rstrip(".")
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _loopback(name: str) -> bool:
    """127.0.0.0/8 and ::1: addresses, never names, so no other site's page can be reached by them."""
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
