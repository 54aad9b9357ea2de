"""The dashboard's HTTP side: the threaded server (connection caps shared
with the daemons' ``helpers.ConnectionCap``, idle sockets reaped) and the
request handler (host check, login by token and cookie, security
headers).  What each URL answers is ci/dashboard/app.py; the flags and
the wiring are the entry point, ``dashboard.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.server
import logging
import re
import secrets
import socket
import threading
import time
import urllib.parse

import helpers
from ci.dashboard import pages
from ci.dashboard.app import Dashboard, Response
from ci.security import is_loopback
from ci.wire import one_line

log = logging.getLogger(__name__)

# A client must send its whole request head within this time (seconds).
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 256
MAX_URL = 2048
# A token in any query string (``/login?token=``, but also an absolute-form
# ``GET http://host/login?token=`` or a garbled request line) is never logged.
_TOKEN_IN_QUERY = re.compile(r"(?i)((?:^|[?&;/\s])token=)[^&;#\s]*")


def redact(text: str) -> str:
    return _TOKEN_IN_QUERY.sub(r"\1<redacted>", text)
COOKIE = "ci_dashboard"


# --------------------------------------------------------------------------
# HTTP.

def cookie_value(token: bytes) -> str:
    """What the login cookie holds: derived from the token, so the cookie
    jar never stores the token itself."""
    return hmac.new(token, b"ci-dashboard-cookie", hashlib.sha256).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "ci-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.timeout = self.server.request_timeout
        super().setup()
        self.server.watch(self.connection)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.unwatch(self.connection)
        return ok

    def finish(self) -> None:
        self.server.unwatch(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args) -> None:
        log.info("%s %s", self.address_string(), one_line(redact(fmt % args), 300))

    def log_request(self, code="-", size="-") -> None:
        path = redact(getattr(self, "path", "") or "")
        # Open pages poll once a second: successes only at DEBUG.
        level = logging.INFO if isinstance(code, int) and code >= 400 else logging.DEBUG
        log.log(level, "%s %s %s %s", self.address_string(),
                one_line(self.command or "", 10), one_line(path, 200), code)

    def _refuse_method(self) -> None:
        self._send(Response(405, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                            {"Allow": "GET, HEAD"}))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        self._head = head
        nonce = secrets.token_urlsafe(16)
        self._nonce = nonce
        app: Dashboard = self.server.app
        try:
            if len(self.path) > MAX_URL:
                self._send(Response(414, b"URL too long\n", "text/plain; charset=utf-8"))
                return
            split = urllib.parse.urlsplit(self.path)
            query = {k: v[0] for k, v in urllib.parse.parse_qs(
                split.query, max_num_fields=20).items()}
            if not self._host_allowed():
                self._send(Response(421, b"unexpected Host header\n",
                                    "text/plain; charset=utf-8"))
                return
            if split.path == "/login":
                self._send(self._login(query.get("token", ""), nonce))
                return
            if not self._authorised():
                self._send(Response(401, pages.message_page(
                    "Token required", nonce, "This dashboard needs its access token: open "
                    "/login?token=... once, or send 'Authorization: Bearer <token>'."),
                    headers={"WWW-Authenticate": "Bearer"}))
                return
            self._send(app.answer(split.path, query, nonce))
        except ValueError:
            self._send(Response(400, b"bad request\n", "text/plain; charset=utf-8"))
        except Exception:
            log.exception("internal error serving %s", one_line(self.path, 200))
            self._send(Response(500, b"internal error\n", "text/plain; charset=utf-8"))

    def _host_allowed(self) -> bool:
        """Without a token, only loopback names reach the pages: a web site
        that rebinds its own name to 127.0.0.1 cannot read them."""
        if self.server.token or self.server.insecure:
            return True
        host = (self.headers.get("Host") or "").strip()
        if not host:
            return True  # an HTTP/1.0 client; browsers always send one
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        return is_loopback(name) or name == self.server.bind_host.lower()

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        header = self.headers.get("Authorization") or ""
        if header.startswith("Bearer "):
            given = header[7:].strip().encode("utf-8", "replace")
            return hmac.compare_digest(given, token)
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return hmac.compare_digest(value.encode("ascii", "replace"),
                                           cookie_value(token).encode("ascii"))
        return False

    def _login(self, given: str, nonce: str) -> Response:
        token = self.server.token
        if token is None:
            return Response(303, b"", headers={"Location": "/"})
        if not hmac.compare_digest(given.encode("utf-8", "replace"), token):
            return Response(401, pages.message_page("Wrong token", nonce,
                                                    "That token is not this dashboard's."))
        return Response(303, b"", headers={
            "Location": "/",
            "Set-Cookie": f"{COOKIE}={cookie_value(token)}; HttpOnly; SameSite=Strict; Path=/"})

    def _send(self, response: Response) -> None:
        nonce = getattr(self, "_nonce", "")
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.ctype)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Content-Security-Policy",
                             f"default-src 'none'; script-src 'nonce-{nonce}'; "
                             f"style-src 'nonce-{nonce}'; img-src 'self'; connect-src 'self'; "
                             "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                             if response.ctype.startswith("text/html") else
                             "default-src 'none'; style-src 'unsafe-inline'; sandbox")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            for key, value in response.headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not getattr(self, "_head", False):
                self.wfile.write(response.body)
        except OSError as exc:
            log.debug("could not answer %s: %s", self.address_string(), exc)

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own refusals (bad request line, headers too long)
        with this server's headers and no reflected input."""
        self.close_connection = True
        if not hasattr(self, "_nonce"):
            self._nonce = ""
        self._head = self.command == "HEAD"
        text = self.responses.get(code, ("error",))[0]
        self._send(Response(code, f"{code} {text}\n".encode(), "text/plain; charset=utf-8"))


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """How long a client may take to send its request head, and how many
    connections are served at once, in all and per client address (None:
    a share of the whole, see helpers.default_per_client)."""
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_client: int | None = None


class DashboardServer(helpers.ConnectionCap, http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections (in all, and per
    client address: one address holding slow requests cannot shut out a
    client with the token) and a reaper that cuts off clients that have
    not sent their request head in time."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, app: Dashboard, token: bytes | None = None,
                 insecure: bool = False, limits: ServeLimits = ServeLimits()):
        self.app = app
        self.token = token
        self.insecure = insecure
        self.bind_host = address[0]
        self.request_timeout = limits.request_timeout
        self.init_cap(limits.max_connections, limits.max_per_client)
        self._watch_lock = threading.Lock()
        self._deadlines: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self._reaper = threading.Thread(target=self._reap, name="reaper", daemon=True)
        self._reaper.start()

    def watch(self, sock) -> None:
        with self._watch_lock:
            self._deadlines[sock] = time.monotonic() + self.request_timeout

    def unwatch(self, sock) -> None:
        with self._watch_lock:
            self._deadlines.pop(sock, None)

    def _reap(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._watch_lock:
                late = [s for s, deadline in self._deadlines.items() if deadline < now]
                for sock in late:
                    del self._deadlines[sock]
            for sock in late:
                log.info("cutting off a client that sent no request in %.0fs",
                         self.request_timeout)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def refuse(self, request, client_address) -> bool:
        try:
            request.setblocking(False)
            request.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                         b"Retry-After: 1\r\nConnection: close\r\n\r\n")
        except OSError:
            pass
        return False

    def handle_error(self, request, client_address):
        log.exception("error serving %s", client_address[0] if client_address else "?")

    def server_close(self):
        self._stop.set()
        super().server_close()
