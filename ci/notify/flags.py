"""The dispatcher's notification flags: their argparse table, and their
checks, which turn them into a ``Notifier`` (or None when no receiver is
given) and refuse a bad value with one clear ``ConfigError`` line before
the dispatcher starts, not with a failure at the first delivery.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import urllib.parse

from ci.notify.decider import DEFAULT_NOTIFY_ON, parse_notify_on
from ci.notify.notifier import Notifier, Options
from ci.notify.targets import DEFAULT_TIMEOUT, CommandTarget, WebhookTarget
from ci.notify.worker import DEFAULT_RETRY_FOR, DEFAULT_RETRY_MAX
from ci.config import ConfigError, positive
from ci.credentials import read_secret_file
from ci.wire import one_line


# The flags that take a duration (each checked positive as it is parsed): flag, default, help.
SECONDS_FLAGS = (
    ("--notify-timeout", DEFAULT_TIMEOUT,
     "a command or webhook that takes longer has failed and is retried"),
    ("--notify-retry-for", DEFAULT_RETRY_FOR,
     "keep retrying an undelivered notification this long after it was made, across "
     "restarts"),
    ("--notify-retry-max", DEFAULT_RETRY_MAX,
     "longest wait between two tries of one receiver; the wait doubles from 1 s up to it"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The "notifications" group of the dispatcher's flags."""
    group = parser.add_argument_group(
        "notifications", "tell people when a branch breaks or is fixed (off unless "
        "--notify-command or --webhook is given)")
    group.add_argument("--notify-command", metavar="COMMAND",
                       help="run for each notification, split like a shell would (never run "
                            "by one), with the facts in CI_* environment variables and the "
                            "result header on stdin")
    group.add_argument("--webhook", action="append", default=[], metavar="URL",
                       help="POST each notification as JSON to this http(s) URL; repeat for "
                            "several")
    group.add_argument("--webhook-secret-file", metavar="PATH",
                       help="sign webhook bodies with HMAC-SHA256 using this file's content "
                            "(header X-CI-Signature-256: sha256=<hex>)")
    group.add_argument("--notify-on", type=notify_on, default=notify_on(DEFAULT_NOTIFY_ON),
                       metavar="WHAT",
                       help="change: broken, fixed and rejected (a land queue entry turned "
                            "down); early: also, while a commit's tests still run, its first "
                            "failing test (once per run); failure: broken, fixed, rejected "
                            "and every still-failing or failing commit; all: every result and "
                            "every landed entry; or event names and presets joined by commas, "
                            "e.g. change,landed "
                            f"(default: {DEFAULT_NOTIFY_ON})")
    for flag, default, text in SECONDS_FLAGS:
        group.add_argument(flag, type=positive(float), default=default, metavar="SECONDS",
                           help=f"{text} (default: %(default)s)")
    group.add_argument("--dashboard-url", metavar="URL",
                       help="link given with each notification (CI_URL, 'url'); '{commit}' in "
                            "it is replaced by the commit id")


def notify_on(text: str) -> frozenset:
    """argparse type of --notify-on: the kinds of event it selects."""
    try:
        return parse_notify_on(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_http_url(flag: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url) if url.isprintable() and " " not in url else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{flag} {one_line(url, 200)!r}: only http:// or https:// URLs with a "
            "host are allowed")
    return url


def _webhook_secret(args: argparse.Namespace, webhooks: list[str]) -> bytes | None:
    """``--webhook-secret-file``'s content, or None without the flag."""
    if not args.webhook_secret_file:
        return None
    if not webhooks:
        raise ConfigError("--webhook-secret-file needs at least one --webhook")
    try:
        return read_secret_file(args.webhook_secret_file, "--webhook-secret-file")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _command_argv(command: str) -> list[str]:
    """``--notify-command`` split like a shell would, its program found now."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"invalid --notify-command: {exc}") from None
    if not argv:
        raise ConfigError("--notify-command is empty")
    if shutil.which(argv[0]) is None:
        raise ConfigError(f"--notify-command: cannot find program {argv[0]!r}")
    return argv


def from_args(args: argparse.Namespace, state_dir: str, results_dir: str) -> Notifier | None:
    """The notifier the flags ask for, or None; ConfigError for bad flags."""
    webhooks = [_check_http_url("--webhook", url) for url in args.webhook]
    if args.dashboard_url:
        _check_http_url("--dashboard-url", args.dashboard_url)
    secret = _webhook_secret(args, webhooks)
    targets: list = []
    if args.notify_command is not None:
        targets.append(CommandTarget(_command_argv(args.notify_command), args.notify_timeout))
    targets.extend(WebhookTarget(url, secret, args.notify_timeout)
                   for url in dict.fromkeys(webhooks))
    if not targets:
        return None
    return Notifier(state_dir, results_dir, targets,
                    Options(args.notify_on, args.dashboard_url,
                            args.notify_retry_for, args.notify_retry_max))
