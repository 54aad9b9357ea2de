"""The runner's start-up: its flags checked (one line of error each), and
what the daemon is built from them: the recipe defaults and environments,
the longest a job may take, the test user's checks, the listening socket."""

from __future__ import annotations

import math
import os
import shlex

import helpers
from ci.config import ConfigError, check_port
from ci.runner import environments, junit_capture, recipe
from ci.runner.sandbox import access
from ci.runner.sandbox.user import TestUser
from ci.runner.slot import child_env
from ci.wire import parse_address

DEFAULT_HOST = "localhost"
FIRST_PORT, LAST_PORT = 8900, 9000
DEFAULT_DISPATCHER = "localhost:8888"
DEFAULT_TIMEOUT = 600.0


def make_preparer(args, test_command: list[str] | None,
                  state_dir: str) -> environments.Preparer:
    """The recipe defaults and caps from the flags, and the environments."""
    setup = tuple(shlex.split(args.setup_command)) if args.setup_command else None
    limits = recipe.Limits(setup=setup, test=tuple(test_command) if test_command else None,
                           timeout=args.timeout, setup_timeout=args.setup_timeout,
                           max_timeout=args.max_timeout,
                           rerun_failures=args.rerun_failures,
                           max_rerun_failures=args.max_rerun_failures)
    cache = None
    # A matrix cell's interpreter gets an environment even without a setup.
    if setup or not args.ignore_repo_recipe or args.python:
        cache = environments.EnvironmentCache(args.env_dir or os.path.join(state_dir, "envs"),
                                              args.keep_envs)
    return environments.Preparer(limits, cache, read_recipe=not args.ignore_repo_recipe)


def bind_server(host: str, port: int | None, commands, security, max_connections):
    """Bind ``--port``, or the first free port from 8900 up."""
    ports = [port] if port is not None else range(FIRST_PORT, LAST_PORT + 1)
    error = None
    for candidate in ports:
        try:
            return helpers.MessageServer((host, candidate), commands, security,
                                         max_connections)
        except OSError as exc:
            error = exc
    where = port if port is not None else f"{FIRST_PORT}-{LAST_PORT}"
    raise ConfigError(f"cannot listen on {host}:{where}: {error.strerror}")


def longest_job(args, preparer: environments.Preparer) -> float:
    """The longest a job may take here by this runner's own limits: the
    checkout, a first build of an environment and the tests, each as far
    as a recipe may raise it.  The dispatcher's job deadline must not run
    out before it (a first build would be reassigned and built again)."""
    cap = None if args.ignore_repo_recipe else args.max_timeout
    # Reruns of failing tests share the tests' time limit (pipeline.py).
    test = max(args.timeout, cap or 0)
    setup = 0.0 if preparer.cache is None else max(args.setup_timeout, cap or 0)
    return args.checkout_timeout + setup + test


def check_args(args) -> tuple[str, tuple[str, int]]:
    """ConfigError unless the flags make sense together; the time limits
    not given are filled in.  Returns (the clone's path, the dispatcher's
    address)."""
    # A limit not given is its default, lowered to --max-timeout: only
    # a limit given above it is a contradiction.
    for name, default in (("timeout", DEFAULT_TIMEOUT),
                          ("setup_timeout", environments.DEFAULT_SETUP_TIMEOUT)):
        if getattr(args, name) is None:
            setattr(args, name, min(default, args.max_timeout or math.inf))
    if args.max_timeout is not None:
        for name in ("timeout", "setup_timeout"):
            if getattr(args, name) > args.max_timeout:
                raise ConfigError(f"--{name.replace('_', '-')} is larger than --max-timeout")
    if args.rerun_failures > args.max_rerun_failures:
        raise ConfigError("--rerun-failures is larger than --max-rerun-failures")
    if args.port is not None:
        check_port(args)
    for flag in ("test_command", "setup_command"):
        if getattr(args, flag) is None:
            continue
        try:
            if not shlex.split(getattr(args, flag)):
                raise ValueError("empty")
        except ValueError as exc:
            raise ConfigError(f"invalid --{flag.replace('_', '-')}: {exc}") from None
    try:
        if args.junit_xml is not None:
            junit_capture.check_pattern(args.junit_xml)
        dispatcher = parse_address(args.dispatcher_server)
        if args.advertise:
            parse_address(args.advertise)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    repo = os.path.abspath(args.repo)
    if not os.path.exists(os.path.join(repo, ".git")):
        raise ConfigError(f"{args.repo} is not a git clone (no .git folder)")
    return repo, dispatcher


def check_test_user(args, repo: str, state_dir: str) -> TestUser | None:
    """``--test-user``: the user, once it is known to own the clone and
    to be unable to read the runner's keys; None without the flag."""
    if not args.test_user:
        return None
    user = TestUser(args.test_user)
    user.check_clone(repo, state_dir)
    user.check_private(args.secret_file, "--secret-file")
    user.check_private(args.tls_key, "--tls-key")
    if os.path.commonpath([state_dir, repo]) == repo:
        raise ConfigError("with --test-user, give a --state-dir outside the clone (the test "
                          "user owns the clone)")
    return user


def open_to_test_user(runner, state_dir: str) -> None:
    """With --test-user, once the daemon is built: the runner's repository
    made, the folders the user passes through opened to it (the outbox
    stays closed), and a refusal to start if the user could not run or
    read what it is handed (every commit's verdict would be "error")."""
    if runner.private is not None:
        runner.private.setup()
    if runner.user is None:
        return
    os.chmod(state_dir, 0o711)
    if runner.preparer.cache is not None:
        os.chmod(runner.preparer.cache.folder, 0o711)
    access.provide_recorder(state_dir)
    # The checks start the user's Python: in a sandbox as a run does, not
    # with HOME at the user's own home (or /tmp), where a test could have
    # planted a user-site .pth; what they start is ended before any job.
    sandbox = runner.slot.sandbox
    env = sandbox.env(child_env(runner.user))
    try:
        access.check_test_user(runner.user, runner.repo, runner.preparer,
                               runner.test_command, env)
        access.check_interpreters(runner.user, runner.interpreters, runner.repo, env)
    finally:
        sandbox.end()
