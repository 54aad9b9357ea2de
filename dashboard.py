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
What each URL answers is ci/dashboard/app.py, the HTTP server and its
request handler (login, security headers, connection limits)
ci/dashboard/web.py; this file is the entry point: flags and wiring.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import helpers
from ci.dashboard import index as dashboard_index
from ci.dashboard.app import Dashboard
from ci.dashboard.web import (DEFAULT_MAX_CONNECTIONS, DEFAULT_REQUEST_TIMEOUT, DashboardServer,
                              ServeLimits)
from ci.dashboard.landqueue import QueueSource
from ci.dashboard.live import LiveState
from ci.history import store as history_store
from ci.dashboard.pruned import PrunedIndex
from ci.retention import tombstones
from ci.history.queries import HistoryReader
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, add_per_client_argument,
    check_per_client, check_port, configure_logging, positive)
from ci.security import is_loopback, security_from_args
from ci.credentials import read_secret_file
from ci.wire import parse_address

log = logging.getLogger("dashboard")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 8080
DEFAULT_DISPATCHER = "localhost:8888"


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
                               ServeLimits(args.request_timeout, args.max_connections,
                                           args.max_per_client))
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
