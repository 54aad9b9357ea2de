"""Start-up configuration shared by every entry point: the flags all
processes take, one-line errors for bad flags, and logging.

A bad flag or path is a ``ConfigError``: the entry point prints it as
one line and exits non-zero, never a traceback."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from ci.wire import (DEFAULT_AUTH_WINDOW, DEFAULT_MAX_BUFFERED, DEFAULT_MAX_CONNECTIONS,
                     DEFAULT_MAX_MESSAGE, DEFAULT_READ_TIMEOUT)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConfigError(Exception):
    """A bad flag or path: reported as one line and a non-zero exit."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a wrong flag is one line (not the whole usage block)
    followed by exit status 2, like every other start-up error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive(kind=float):
    """An argparse ``type=`` for a count or duration that must be above zero
    (and finite): every entry point checks such flags the same way, so the
    error reads the same everywhere, "argument --poll: must be positive" (an
    ``int`` flag: "must be at least 1"), one line and exit status 2.

    Only values given on the command line are checked; defaults are the
    code's own and already valid (``None`` stays "not given")."""

    return _at_least(kind, zero=False)


def non_negative(kind=float):
    """As ``positive``, but 0 is allowed ("must be 0 or more")."""
    return _at_least(kind, zero=True)


# The largest duration a float flag takes (about three years): every one is
# seconds, and socket timeouts past about 1e11 raise OverflowError.
MAX_SECONDS = 1e8


def _at_least(kind, zero: bool):
    def convert(text: str):
        value = kind(text)  # ValueError: argparse says "invalid float value: 'x'"
        above_floor = value >= 0 if zero else value > 0
        if not (above_floor and value < math.inf):
            raise argparse.ArgumentTypeError(
                "must be 0 or more" if zero else
                "must be at least 1" if kind is int else "must be positive")
        if kind is float and value > MAX_SECONDS:
            raise argparse.ArgumentTypeError(f"must be at most {MAX_SECONDS:.0f}")
        return value

    convert.__name__ = kind.__name__  # names the type in argparse's "invalid ... value"
    return convert


def whole_number(text: str) -> int:
    """An argparse ``type=`` for a count that may be 0 ("must be 0 or more")."""
    value = int(text)  # ValueError: argparse says "invalid whole_number value: 'x'"
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def grouped_parser(description: str, groups, *extra) -> ArgumentParser:
    """A daemon's parser: each (title, adder) a section of --help, then
    each of ``extra`` (a function that adds flags of its own), then the
    flags every daemon shares."""
    parser = ArgumentParser(description=description)
    for title, adder in groups:
        adder(parser.add_argument_group(title))
    for adder in extra:
        adder(parser)
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser, server: bool = True) -> None:
    """Flags every process shares: logging, secret, TLS and input limits
    (the listening-side ones only where something listens)."""
    group = parser.add_argument_group("security and limits")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging threshold for stderr (default: %(default)s)")
    group.add_argument("--secret-file", metavar="PATH",
                       help="file holding the cluster's shared secret; every message is "
                            "HMAC-signed with it (default: $CI_SECRET, else none)")
    if server:
        group.add_argument("--insecure", action="store_true",
                           help="allow binding to a non-loopback address without a secret")
    group.add_argument("--tls-cert", metavar="PEM", help="this process's TLS certificate")
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    group.add_argument("--tls-ca", metavar="PEM",
                       help="CA that signed every peer's certificate (enables mutual TLS)")
    group.add_argument("--max-message-size", type=positive(int), default=DEFAULT_MAX_MESSAGE,
                       metavar="BYTES",
                       help="largest message accepted (default: %(default)s)")
    group.add_argument("--read-timeout", type=positive(float), default=DEFAULT_READ_TIMEOUT,
                       metavar="SECONDS",
                       help="drop a connection that sends nothing for this long "
                            "(default: %(default)s)")
    if server:
        group.add_argument("--max-connections", type=positive(int),
                           default=DEFAULT_MAX_CONNECTIONS,
                           help="connections served at once; more are refused "
                                "(default: %(default)s)")
        add_per_client_argument(group, "connections")
        group.add_argument("--max-buffered", type=positive(int), default=DEFAULT_MAX_BUFFERED,
                           metavar="BYTES",
                           help="message bytes held at once over all connections (half "
                                "of it from one address); beyond it senders are told to "
                                "retry (default: %(default)s)")
    group.add_argument("--auth-window", type=positive(float), default=DEFAULT_AUTH_WINDOW,
                       metavar="SECONDS",
                       help="accepted clock difference for signed messages "
                            "(default: %(default)s)")


def add_per_client_argument(parser, what: str) -> None:
    """``--max-per-client``, shared by the daemons and the dashboard."""
    parser.add_argument("--max-per-client", type=int, default=None, metavar="N",
                        help=f"{what} served at once from one client address (an IPv6 "
                             "client's whole /64 counts as one); more are refused, so one "
                             "client cannot take every slot. Behind a proxy, whose address "
                             "every client then has, set it to --max-connections "
                             "(default: half of --max-connections)")


def check_per_client(args: argparse.Namespace) -> None:
    """ConfigError unless ``--max-per-client`` (if given) is 1..--max-connections."""
    value = getattr(args, "max_per_client", None)
    if value is not None and not 1 <= value <= args.max_connections:
        raise ConfigError("--max-per-client must be between 1 and --max-connections")


def check_port(args: argparse.Namespace) -> None:
    """ConfigError unless ``--port`` is 0-65535 (0: any free port)."""
    if not 0 <= args.port < 65536:
        raise ConfigError("--port must be 0-65535")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT, stream=sys.stderr)
