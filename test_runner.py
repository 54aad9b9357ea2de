"""The test runner's entry point: its flags and the wiring of the daemon.

A runner registers with the dispatcher, takes one commit at a time,
checks it out in its own clone (``test_runner_script.sh``), runs the tests
in a child process group and reports the verdict.  The parts live in
``ci/runner/``: ``daemon`` (the runner itself), ``pipeline`` (one job:
checkout, setup, tests), ``command_line``, ``verdict``, ``slot`` (the
child process group), ``jobs`` (the job held), ``outbox`` (results not
yet delivered), ``startup`` (flag checks) and ``sandbox`` (``--test-user``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import helpers
from ci import state_schema
from ci.config import ConfigError, configure_logging, grouped_parser, positive, whole_number
from ci.files import ensure_dir
from ci.runner import daemon, environments, interpreters, pipeline, recipe, startup
from ci.security import check_bind_allowed, persist_nonces, security_from_args
from ci.wire import format_address

log = logging.getLogger(__name__)


def runner_name(text: str) -> str:
    """``--name``: checked here, so a bad one is a usage error at start-up
    rather than a refusal of every ``register``."""
    try:
        return state_schema.check_runner_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _where_flags(group) -> None:
    """The runner's own address and the dispatcher's: a runner may sit on another machine."""
    group.add_argument("repo", metavar="REPO",
                        help="this runner's own clone of the repository under test")
    group.add_argument("--host", default=startup.DEFAULT_HOST,
                        help="address to listen on (default: %(default)s)")
    group.add_argument("--port", type=int,
                        help=f"port to listen on (default: first free from {startup.FIRST_PORT})")
    group.add_argument("--advertise", metavar="HOST:PORT",
                        help="address the dispatcher should use to reach this runner "
                             "(default: --host, or the local address of the link to the "
                             "dispatcher when bound to 0.0.0.0)")
    group.add_argument("--dispatcher-server", default=startup.DEFAULT_DISPATCHER,
                        metavar="HOST:PORT",
                        help="the dispatcher's address (default: %(default)s)")
    group.add_argument("--name", type=runner_name,
                        help="what the dashboard and the dispatcher's state call this runner "
                             "(1 to 64 letters, digits, '.', '_' or '-'; default: none, "
                             "shown as its address)")


def _test_flags(group) -> None:
    """The defaults a repository's .ci.ini may change, and the limits it may not pass."""
    group.add_argument("--test-command", metavar="COMMAND",
                        help="command run in the clone's root (split like a shell would, "
                             "never run by one; default: python -m unittest discover -s tests"
                             " [-t .])")
    group.add_argument("--junit-xml", metavar="PATTERN",
                        help="JUnit XML file(s) the test command writes, a glob relative to "
                             "the clone (e.g. 'reports/*.xml'), read for per-test results; "
                             "not needed for unittest and pytest commands, whose results "
                             "are recorded anyway")
    group.add_argument("--timeout", type=positive(float), metavar="SECONDS",
                        help="kill the tests after this long; verdict 'timeout' "
                             f"(default: {startup.DEFAULT_TIMEOUT:g}, or --max-timeout if lower)")
    group.add_argument("--setup-command", metavar="COMMAND",
                        help="command that installs what the tests need, run in a cached "
                             "virtual environment in the clone's root (split like a shell "
                             "would, never run by one; e.g. \"python -m pip install -e "
                             ".[test]\"; default: none; a repository's .ci.ini may set it)")
    group.add_argument("--setup-timeout", type=positive(float), metavar="SECONDS",
                        help="limit for building an environment; verdict 'error' "
                             f"(default: {environments.DEFAULT_SETUP_TIMEOUT:g}, or "
                             "--max-timeout if lower)")
    group.add_argument("--max-timeout", type=positive(float), metavar="SECONDS",
                        help="the most a repository's .ci.ini may raise timeout and "
                             "setup_timeout to (default: it may only lower them)")
    group.add_argument("--rerun-failures", type=whole_number, default=recipe.DEFAULT_RERUNS,
                        metavar="N",
                        help="run the tests that failed again, up to N times, to tell flaky "
                             "tests (failed, then passed) from failing ones; a .ci.ini's "
                             "rerun_failures overrides it (default: %(default)s)")
    group.add_argument("--max-rerun-failures", type=whole_number,
                        default=recipe.DEFAULT_MAX_RERUNS, metavar="N",
                        help="the most a .ci.ini's rerun_failures may ask for "
                             "(default: %(default)s)")
    group.add_argument("--ignore-repo-recipe", action="store_true",
                        help="do not read .ci.ini from the commits: only these flags decide")


def _state_flags(group) -> None:
    """Where the runner keeps what outlives a run (its cached environments, its outbox)."""
    group.add_argument("--keep-envs", type=positive(int), default=environments.DEFAULT_KEEP,
                        metavar="N",
                        help="keep the N most recently used environments, delete older ones "
                             "(default: %(default)s)")
    group.add_argument("--env-dir", metavar="DIR",
                        help="folder for this runner's environments, not shared with another "
                             "runner (default: STATE_DIR/envs)")
    group.add_argument("--checkout-timeout", type=positive(float),
                        default=pipeline.DEFAULT_CHECKOUT_TIMEOUT,
                        metavar="SECONDS",
                        help="limit for fetch and checkout (default: %(default)s)")
    group.add_argument("--state-dir",
                        help="folder for the outbox of undelivered results "
                             "(default: REPO/.git/ci-runner)")


def _link_flags(group) -> None:
    """How often it reports, and how it waits for a dispatcher that is away."""
    group.add_argument("--heartbeat", type=positive(float), default=daemon.DEFAULT_HEARTBEAT,
                        metavar="SECONDS",
                        help="seconds between re-registrations with the dispatcher "
                             "(default: %(default)s)")
    group.add_argument("--retry-max", type=positive(float), default=daemon.DEFAULT_RETRY_MAX,
                        metavar="SECONDS",
                        help="longest wait between retries while the dispatcher is away "
                             "(default: %(default)s)")
    group.add_argument("--dispatcher-timeout", type=float, metavar="SECONDS",
                        help="exit when the dispatcher has been unreachable this long "
                             "(default: wait forever)")
    group.add_argument("--progress-interval", type=positive(float),
                        default=daemon.DEFAULT_PROGRESS_INTERVAL,
                        metavar="SECONDS",
                        help="send the running test's new output to the dispatcher this "
                             "often, for live logs (default: %(default)s)")


def _isolation_flags(group) -> None:
    """What tests may reach, and which jobs this runner is fit for."""
    group.add_argument("--test-user", metavar="USER",
                        help="run setup and tests as this unprivileged user (Linux; the "
                             "runner runs as root), so tests cannot read the runner's key, "
                             "environment, outbox or state, nor change its repository; the "
                             "clone must belong to USER, --state-dir must lie outside it, and "
                             "the repository moves to STATE-DIR/git; each run gets a private "
                             "HOME and TMPDIR, and after it every process of USER is killed "
                             "and its files in /tmp, /var/tmp, /dev/shm removed (give each "
                             "runner its own USER)")
    group.add_argument("--label", action="append", type=interpreters.runner_label,
                        metavar="NAME",
                        help="a label this runner has (repeatable; 1 to 64 letters, digits, "
                             "'.', '_' or '-'), e.g. gpu: a matrix cell whose recipe asks for "
                             "labels goes only to a runner with all of them")
    group.add_argument("--python", action="append", type=interpreters.python_flag,
                        metavar="VERSION[=PATH]|auto",
                        help="an interpreter matrix cells may ask for (repeatable): "
                             "3.12=/opt/py312/bin/python3, or 3.12 for python3.12 on PATH, "
                             "or auto for every python3.X on PATH; each is run at start and "
                             "used as the interpreter it reports (a version shim is resolved "
                             "or refused) and advertised as the label python3.X (default: "
                             "this runner's own Python only)")
    group.add_argument("--exclusive", action="store_true",
                        help="take only jobs that ask for one of this runner's labels "
                             "(keeps a big or special machine free of generic jobs)")


def build_parser() -> argparse.ArgumentParser:
    """Every flag, with its help: the table the README's flag list follows."""
    return grouped_parser(
        "CI test runner: runs the tests of the commits the dispatcher sends.",
        [("where it listens and whom it serves", _where_flags),
         ("what it runs", _test_flags),
         ("environments and state", _state_flags),
         ("the link to the dispatcher", _link_flags),
         ("isolation, labels and interpreters", _isolation_flags)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        repo, dispatcher = startup.check_args(args)
        security = security_from_args(args)
        check_bind_allowed(args.host, security, args.insecure)
        if security.server_tls:
            # Only the dispatcher may send us work, and only it is trusted
            # with our results.
            security.tls_client_roles = frozenset({"dispatcher"})
            security.tls_server_role = "dispatcher"
        state_dir = os.path.abspath(args.state_dir or os.path.join(repo, ".git", "ci-runner"))
        test_user = startup.check_test_user(args, repo, state_dir)
        ensure_dir(state_dir, "state folder")
        os.chmod(state_dir, 0o700)
        persist_nonces(security, state_dir, "runner")
        runner = daemon.TestRunner(args, security, dispatcher, state_dir, test_user)
        startup.open_to_test_user(runner, state_dir)
        server = startup.bind_server(args.host, args.port, runner.commands, security,
                                     args.max_connections)
    except ConfigError as exc:
        print(f"test_runner: error: {exc}", file=sys.stderr)
        return 2
    address = server.server_address[:2]
    log.info("runner listening on %s, clone %s; secret %s, TLS %s, test user %s",
             format_address(address), repo,
             f"on (key {security.key_id})" if security.key_id else
             "on (shared)" if security.secret else "off",
             "on" if security.server_tls else "off",
             f"{args.test_user} ({runner.slot.sandbox.describe()})" if runner.slot.sandbox
             else "off (tests run as this runner's user and can read what it can)")
    # What --python auto found is otherwise only told by what it left out.
    log.info("labels %s%s; interpreters %s", " ".join(runner.labels),
             " (exclusive)" if args.exclusive else "",
             ", ".join(f"{v}={i.executable}" for v, i in sorted(runner.interpreters.items())))
    runner.start(address)
    helpers.serve_until_signalled(server, on_stop=runner.stop, stop=runner.stop_event)
    log.info("runner stopped")
    return 1 if runner.gave_up else 0


if __name__ == "__main__":
    sys.exit(main())
