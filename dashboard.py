"""The CI's web dashboard: a read-only view of the results folder, plus the
dispatcher's live state (queue, running jobs, runners, live output) asked
over the signed protocol, and its test history store (``--history``, read
only: ci/history/queries.py).

    python dashboard.py --results-dir test_results --dispatcher-server localhost:8888

Result files stay the source of truth: they are indexed in memory
(ci/dashboard/index.py) and rendered by ci/dashboard/pages.py; the
dispatcher is asked (ci/dashboard/live.py) at most once per second for
``state`` (and per running commit for its ``log:``), so a page load costs
at most one call, and the pages still work while the dispatcher is down.
What each URL answers is ci/dashboard/app.py; this file is the entry
point: flags, the HTTP server and its request handler (login, security
headers, connection limits).
"""

from __future__ import annotations

import hashlib
import functools
import hmac
import http.server
import logging
import os
import secrets
import socket
import sys
import threading
import time
import urllib.parse

import helpers
from ci.dashboard import index as dashboard_index
from ci.dashboard import pages
from ci.dashboard.app import Dashboard, Response
from ci.dashboard.landqueue import QueueSource
from ci.dashboard.live import LiveState
from ci.history import store as history_store
from ci.dashboard.pruned import PrunedIndex
from ci.retention import tombstones
from ci.history.queries import HistoryReader
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, add_per_client_argument,
    check_per_client, check_port, configure_logging, positive)
from ci.security import is_loopback, security_from_args
from ci.wire import one_line, parse_address, read_secret_file

log = logging.getLogger("dashboard")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8080
DEFAULT_DISPATCHER = "localhost:8888"
# A client must send its whole request head within this time (seconds).
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 256
MAX_URL = 2048
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
        log.info("%s %s", self.address_string(), one_line(fmt % args, 300))

    def log_request(self, code="-", size="-") -> None:
        path = getattr(self, "path", "") or ""
        path = path.split("?", 1)[0] if path.startswith("/login") else path
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
                 insecure: bool = False, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_per_client: int | None = None):
        self.app = app
        self.token = token
        self.insecure = insecure
        self.bind_host = address[0]
        self.request_timeout = request_timeout
        self.init_cap(max_connections, max_per_client)
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


# --------------------------------------------------------------------------
# Entry point.

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description="Serve a read-only web dashboard of the CI's results and live state.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s; another than "
                             "loopback needs --token-file or --insecure)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on, 0 for any free one (default: %(default)s)")
    parser.add_argument("--results-dir", default="test_results",
                        help="the dispatcher's results folder (default: %(default)s)")
    parser.add_argument("--history", metavar="PATH",
                        help="the dispatcher's test history store, read-only, for the /tests "
                             "and /test pages (default: dispatcher_state/"
                             f"{history_store.FILE_NAME} beside the results folder, the "
                             "dispatcher's default state folder)")
    parser.add_argument("--pruned", metavar="PATH",
                        help="the dispatcher's tombstones of pruned results (--keep-results), "
                             "read-only, so a pruned commit's page says so (default: "
                             f"dispatcher_state/{tombstones.FILE_NAME} beside the results "
                             "folder)")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="the dispatcher to ask for live state (default: %(default)s)")
    parser.add_argument("--token-file", metavar="PATH",
                        help="file holding an access token; every request must then carry it "
                             "(bearer header, or the cookie /login?token= sets)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --token-file")
    parser.add_argument("--request-timeout", type=positive(float), default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help="cut off a client that has not sent its request by then "
                             "(default: %(default)s)")
    parser.add_argument("--max-connections", type=positive(int), default=DEFAULT_MAX_CONNECTIONS,
                        help="HTTP connections served at once; more get 503 "
                             "(default: %(default)s)")
    add_per_client_argument(parser, "HTTP connections (slow, half-sent requests "
                                    "included)")
    parser.add_argument("--scan-interval", type=positive(float), default=dashboard_index.SCAN_INTERVAL,
                        metavar="SECONDS",
                        help="look for new result files at most this often "
                             "(default: %(default)s)")
    add_common_arguments(parser, server=False)
    return parser


def load_token(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return read_secret_file(path, "token file", shortest=16)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_server(args) -> DashboardServer:
    """Check the flags and build the server (not yet serving)."""
    check_per_client(args)
    check_port(args)
    token = load_token(args.token_file)
    if not is_loopback(args.host) and token is None and not args.insecure:
        raise ConfigError(
            f"refusing to serve on {args.host} without --token-file: anyone who can reach "
            "the port could read every test's output. Give --token-file, or --insecure.")
    try:
        dispatcher = parse_address(args.dispatcher_server)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    security = security_from_args(args)
    if security.client_tls:
        # Only the dispatcher's certificate: a runner's must not pose as it.
        security.tls_server_role = "dispatcher"
    results = os.path.abspath(args.results_dir)
    if not os.path.isdir(results):
        raise ConfigError(f"results folder {args.results_dir} does not exist")
    state_dir = os.path.join(os.path.dirname(results), "dispatcher_state")
    pruned = PrunedIndex(args.pruned or os.path.join(state_dir, tombstones.FILE_NAME))
    index = dashboard_index.ResultIndex(results, args.scan_interval, pruned)
    history = args.history or os.path.join(state_dir, history_store.FILE_NAME)
    ask = functools.partial(helpers.call, security=security)  # the signed client call
    app = Dashboard(index, LiveState(dispatcher, ask), HistoryReader(history),
                    QueueSource(dispatcher, ask))
    try:
        return DashboardServer((args.host, args.port), app, token, args.insecure,
                               args.request_timeout, args.max_connections,
                               args.max_per_client)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: "
                                  f"{exc.strerror or exc}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        server = make_server(args)
    except ConfigError as exc:
        print(f"dashboard.py: error: {exc}", file=sys.stderr)
        return 2
    server.app.index.refresh(force=True)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("dashboard serving http://%s:%d/ (%d results indexed, dispatcher %s)", shown, port,
             server.app.index.count(), args.dispatcher_server)
    helpers.serve_until_signalled(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
