"""The CI's web dashboard: a read-only view of the results folder, plus the
dispatcher's live state (queue, running jobs, runners, live output) asked
over the signed protocol.

    python dashboard.py --results-dir test_results --dispatcher-server localhost:8888

Result files stay the source of truth: they are indexed in memory
(dashboard_index) and rendered by dashboard_pages; the dispatcher is asked
(dashboard_live) at most once per second for ``state`` (and per running
commit for its ``log:``), so a page load costs at most one call, and the
pages still work while the dispatcher is down.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse

from ci.dashboard import index as dashboard_index
from ci.dashboard import pages as pages
import helpers
from ci.dashboard.live import LiveState, without_finished

log = logging.getLogger("dashboard")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8080
DEFAULT_DISPATCHER = "localhost:8888"
# A client must send its whole request head within this time (seconds).
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 256
MAX_URL = 2048
MAX_HTML_OUTPUT = 1024 * 1024
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
COOKIE = "ci_dashboard"
BRANCH_RE = pages.BRANCH_RE
COMMIT_PATH = r"([0-9a-f]{40}|[0-9a-f]{64})"


# --------------------------------------------------------------------------
# What each URL answers: pure of HTTP details, returns a Response.

class Response:
    def __init__(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8",
                 headers: dict | None = None):
        self.status, self.body, self.ctype = status, body, ctype
        self.headers = headers or {}


def json_response(data, status: int = 200) -> Response:
    return Response(status, json.dumps(data, indent=1, sort_keys=True).encode("utf-8"),
                    "application/json")


class BadRequest(Exception):
    """A query value that cannot be used (answered 400)."""


class Dashboard:
    """The read-only application: routes to pages and API answers."""

    ROUTES = [
        (re.compile(r"/"), "overview"),
        (re.compile(r"/api/status"), "api_status"),
        (re.compile(r"/api/commits"), "api_commits"),
        (re.compile(r"/api/commits/" + COMMIT_PATH), "api_commit"),
        (re.compile(r"/api/page/overview"), "fragments_overview"),
        (re.compile(r"/api/page/commit/" + COMMIT_PATH), "fragments_commit"),
        (re.compile(r"/commit/" + COMMIT_PATH), "commit_page"),
        (re.compile(r"/commit/" + COMMIT_PATH + r"/output\.txt"), "output_text"),
        (re.compile(r"/badge/([^/]{1,600})\.svg"), "badge"),
        (re.compile(r"/favicon\.svg"), "favicon"),
    ]

    def __init__(self, index: dashboard_index.ResultIndex, live: LiveState):
        self.index = index
        self.live = live

    def answer(self, path: str, query: dict[str, str], nonce: str) -> Response:
        # An API client gets its refusals as JSON too, not as an HTML page.
        api = path.startswith("/api/")
        for pattern, name in self.ROUTES:
            match = pattern.fullmatch(path)
            if match:
                try:
                    return getattr(self, name)(query, nonce, *match.groups())
                except BadRequest as exc:
                    if api:
                        return json_response({"error": str(exc)}, 400)
                    return Response(400, pages.message_page("Bad request", nonce, str(exc)))
        return json_response({"error": "not found"}, 404) if api else self.not_found(nonce)

    def not_found(self, nonce: str, what: str = "There is no such page.") -> Response:
        return Response(404, pages.message_page("Not found", nonce, what))

    # ---- query values

    @staticmethod
    def _filters(query: dict) -> dict:
        branch = query.get("branch") or None
        if branch is not None and not BRANCH_RE.fullmatch(branch):
            raise BadRequest("branch: letters, digits and . _ / - + @ only")
        verdict = query.get("verdict") or None
        if verdict is not None and verdict not in helpers.VERDICTS:
            raise BadRequest(f"verdict: one of {', '.join(helpers.VERDICTS)}")
        before = query.get("before") or None
        if before is not None and not helpers.valid_full_commit(before):
            raise BadRequest("before: a full commit id")
        try:
            limit = int(query.get("limit") or DEFAULT_LIMIT)
        except ValueError:
            raise BadRequest("limit: a number") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit: 1 to {MAX_LIMIT}")
        return {"branch": branch, "verdict": verdict, "before": before, "limit": limit}

    def _commits(self, filters: dict) -> tuple[list[dict], str | None]:
        try:
            return self.index.query(**filters)
        except dashboard_index.UnknownCursor:
            raise BadRequest("before: no result for that commit; start from the newest "
                             "results") from None

    # ---- overview

    def _live_state(self) -> tuple[dict | None, str | None]:
        """The dispatcher's state without the commits whose result the
        index holds; the index is refreshed first, so that every part of
        one answer reads the same results."""
        self.index.refresh()
        state, error = self.live.state()
        return without_finished(state, self.index.finished_of), error

    @staticmethod
    def _page_params(filters: dict) -> dict:
        """What a link to the same listing keeps (all but the cursor), so
        that paging links and live updates ask for the page as it was."""
        params = {k: filters[k] for k in ("branch", "verdict") if filters[k]}
        if filters["limit"] != DEFAULT_LIMIT:
            params["limit"] = filters["limit"]
        return params

    def _overview_sections(self, filters: dict) -> dict:
        state, error = self._live_state()
        branches = self.index.branches()
        running_branches = {j["branch"] for j in (state or {}).get("running", [])}
        for item in branches:
            item["running"] = item["branch"] in running_branches
        commits, cursor = self._commits(filters)
        title = "Results"
        if filters["branch"] or filters["verdict"]:
            title = "Results: " + " ".join(v for v in (filters["branch"], filters["verdict"]) if v)
        sections = {
            "sec-banner": pages.banner_section(error),
            "sec-branches": pages.branches_section(branches),
            "sec-active": pages.active_section(state),
            "sec-commits": pages.commits_section(commits, cursor, self._page_params(filters),
                                                 bool(filters["before"]), title),
            "sec-runners": pages.runners_section(state),
        }
        return sections

    def overview(self, query, nonce) -> Response:
        filters = self._filters(query)
        sections = self._overview_sections(filters)
        endpoint = ""
        if not filters["before"]:
            params = self._page_params(filters)
            endpoint = "/api/page/overview" + ("?" + urllib.parse.urlencode(params)
                                              if params else "")
        return Response(200, pages.page("CI dashboard", nonce, sections, endpoint))

    def fragments_overview(self, query, nonce) -> Response:
        sections = self._overview_sections(self._filters(query))
        return json_response({"sections": sections, "final": False})

    # ---- one commit

    def _commit_view(self, commit: str):
        """(status, sections, final) or None when nothing is known."""
        item = self.index.get(commit)
        if item is not None:
            output = self.index.read_output(commit, MAX_HTML_OUTPUT) or ("", False)
            sections = {
                "sec-summary": pages.fields_section(item, "finished " + pages.when(
                    item["finished"]) + " UTC"),
                "sec-tests": pages.tests_section(self.index.test_report(commit)),
                "sec-output": pages.output_section(output[0], output[1], commit),
            }
            return "finished", sections, True
        # The cached state if fresh, else asked for (a commit's page may be
        # the first page anyone opened).
        state = self.live.state()[0] or {}
        job = self._running_job(state, commit)
        status, tail = self.live.log(commit) if job is not None else ("idle", "")
        if status == "running":
            item = {"commit": commit, "verdict": "running", "branch": job.get("branch"),
                    "runner": job.get("runner")}
            elapsed = job.get("elapsed")
            return "running", {
                "sec-summary": pages.fields_section(item, "running" if elapsed is None else
                                                    f"running, {pages.seconds(elapsed)} elapsed"),
                "sec-tests": pages.Safe(""),
                "sec-output": pages.output_section(tail, False, commit, live=True)}, False
        job = next((j for j in state.get("queue", []) if j["commit"] == commit), None)
        if job is not None:
            item = {"commit": commit, "verdict": "queued", "branch": job.get("branch")}
            return "queued", {
                "sec-summary": pages.fields_section(item, f"queued, position {job['position']}"),
                "sec-tests": pages.Safe(""), "sec-output": pages.Safe("")}, False
        return None

    @staticmethod
    def _running_job(state: dict, commit: str) -> dict | None:
        """The commit's row in the live state's ``running``, or None.  Its
        output is asked for only then: a ``log:`` call per page poll of a
        queued or unknown commit would be a dispatcher call each, made
        one at a time and not spared by the state's failure backoff."""
        return next((j for j in state.get("running", []) if j["commit"] == commit), None)

    def commit_page(self, query, nonce, commit) -> Response:
        view = self._commit_view(commit)
        if view is None:
            return self.not_found(nonce, "No result for this commit, and it is not running.")
        status, sections, final = view
        endpoint = "" if final else f"/api/page/commit/{commit}"
        return Response(200, pages.page(f"{commit[:pages.SHORT]} · {status}", nonce, sections,
                                        endpoint))

    def fragments_commit(self, query, nonce, commit) -> Response:
        view = self._commit_view(commit)
        if view is None:
            return json_response({"error": "unknown commit"}, 404)
        status, sections, final = view
        return json_response({"sections": sections, "final": final, "status": status,
                              "title": f"{commit[:pages.SHORT]} · {status}"})

    def output_text(self, query, nonce, commit) -> Response:
        output = self.index.read_output(commit) if self.index.get(commit) else None
        if output is None:
            return self.not_found(nonce)
        return Response(200, output[0].encode("utf-8"), "text/plain; charset=utf-8")

    # ---- JSON API

    @staticmethod
    def _api_item(item: dict) -> dict:
        item = dict(item)
        item["finished"] = pages.when(item.get("finished")).replace(" ", "T") + "Z"
        item["url"] = f"/commit/{item['commit']}"
        return item

    def api_status(self, query, nonce) -> Response:
        state, error = self._live_state()
        state = state or {}
        return json_response({
            "dispatcher": {"reachable": error is None, "error": error},
            "queue": state.get("queue", []), "running": state.get("running", []),
            "runners": state.get("runners", []), "counts": state.get("counts", {}),
            "branches": self.index.branches(), "results": self.index.count()})

    def api_commits(self, query, nonce) -> Response:
        commits, cursor = self._commits(self._filters(query))
        return json_response({"commits": [self._api_item(c) for c in commits], "next": cursor})

    def api_commit(self, query, nonce, commit) -> Response:
        item = self.index.get(commit)
        if item is None:
            state = self.live.state()[0] or {}
            running = self._running_job(state, commit) is not None
            status, tail = self.live.log(commit) if running else ("idle", "")
            if status != "running":
                return json_response({"error": "no result for this commit"}, 404)
            return json_response({"commit": commit, "status": "running", "live_output": tail})
        output = self.index.read_output(commit, MAX_HTML_OUTPUT) or ("", False)
        data = self._api_item(item)
        data.update(status="finished", failing_tests=self.index.test_report(commit),
                    output=output[0], output_truncated=output[1])
        return json_response(data)

    def favicon(self, query, nonce) -> Response:
        return Response(200, pages.FAVICON, "image/svg+xml")

    def badge(self, query, nonce, quoted) -> Response:
        branch = urllib.parse.unquote(quoted)
        if not BRANCH_RE.fullmatch(branch):
            return self.not_found(nonce)
        states = {b["branch"]: b["state"] for b in self.index.branches()}
        return Response(200, pages.badge_svg(branch, states.get(branch, "unknown")),
                        "image/svg+xml")


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
        log.info("%s %s", self.address_string(), helpers.one_line(fmt % args, 300))

    def log_request(self, code="-", size="-") -> None:
        path = getattr(self, "path", "") or ""
        path = path.split("?", 1)[0] if path.startswith("/login") else path
        # Open pages poll once a second: successes only at DEBUG.
        level = logging.INFO if isinstance(code, int) and code >= 400 else logging.DEBUG
        log.log(level, "%s %s %s %s", self.address_string(),
                helpers.one_line(self.command or "", 10), helpers.one_line(path, 200), code)

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
            log.exception("internal error serving %s", helpers.one_line(self.path, 200))
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
        return helpers.is_loopback(name) or name == self.server.bind_host.lower()

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

def build_parser() -> helpers.ArgumentParser:
    parser = helpers.ArgumentParser(
        description="Serve a read-only web dashboard of the CI's results and live state.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default: %(default)s; another than "
                             "loopback needs --token-file or --insecure)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on, 0 for any free one (default: %(default)s)")
    parser.add_argument("--results-dir", default="test_results",
                        help="the dispatcher's results folder (default: %(default)s)")
    parser.add_argument("--dispatcher-server", default=DEFAULT_DISPATCHER, metavar="HOST:PORT",
                        help="the dispatcher to ask for live state (default: %(default)s)")
    parser.add_argument("--token-file", metavar="PATH",
                        help="file holding an access token; every request must then carry it "
                             "(bearer header, or the cookie /login?token= sets)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without --token-file")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help="cut off a client that has not sent its request by then "
                             "(default: %(default)s)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="HTTP connections served at once; more get 503 "
                             "(default: %(default)s)")
    helpers.add_per_client_argument(parser, "HTTP connections (slow, half-sent requests "
                                    "included)")
    parser.add_argument("--scan-interval", type=float, default=dashboard_index.SCAN_INTERVAL,
                        metavar="SECONDS",
                        help="look for new result files at most this often "
                             "(default: %(default)s)")
    helpers.add_common_arguments(parser, server=False)
    return parser


def load_token(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return helpers.read_secret_file(path, "token file", shortest=16)
    except ValueError as exc:
        raise helpers.ConfigError(str(exc)) from None


def make_server(args) -> DashboardServer:
    """Check the flags and build the server (not yet serving)."""
    for name in ("request_timeout", "scan_interval"):
        if getattr(args, name) <= 0:
            raise helpers.ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.max_connections < 1:
        raise helpers.ConfigError("--max-connections must be at least 1")
    helpers.check_per_client(args)
    if not 0 <= args.port < 65536:
        raise helpers.ConfigError("--port must be 0-65535")
    token = load_token(args.token_file)
    if not helpers.is_loopback(args.host) and token is None and not args.insecure:
        raise helpers.ConfigError(
            f"refusing to serve on {args.host} without --token-file: anyone who can reach "
            "the port could read every test's output. Give --token-file, or --insecure.")
    try:
        dispatcher = helpers.parse_address(args.dispatcher_server)
    except ValueError as exc:
        raise helpers.ConfigError(str(exc)) from None
    security = helpers.security_from_args(args)
    if security.client_tls:
        # Only the dispatcher's certificate: a runner's must not pose as it.
        security.tls_server_role = "dispatcher"
    results = os.path.abspath(args.results_dir)
    if not os.path.isdir(results):
        raise helpers.ConfigError(f"results folder {args.results_dir} does not exist")
    index = dashboard_index.ResultIndex(results, args.scan_interval)
    app = Dashboard(index, LiveState(dispatcher, security))
    try:
        return DashboardServer((args.host, args.port), app, token, args.insecure,
                               args.request_timeout, args.max_connections,
                               args.max_per_client)
    except OSError as exc:
        raise helpers.ConfigError(f"cannot listen on {args.host}:{args.port}: "
                                  f"{exc.strerror or exc}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    helpers.configure_logging(args.log_level)
    try:
        server = make_server(args)
    except helpers.ConfigError as exc:
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
