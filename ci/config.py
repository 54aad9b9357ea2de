"""Start-up configuration shared by every entry point: the flags all
processes take, one-line errors for bad flags, and logging.

A bad flag or path is a ``ConfigError``: the entry point prints it as
one line and exits non-zero, never a traceback."""

from __future__ import annotations

import argparse
import logging
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
    group.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE,
                       metavar="BYTES",
                       help="largest message accepted (default: %(default)s)")
    group.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                       metavar="SECONDS",
                       help="drop a connection that sends nothing for this long "
                            "(default: %(default)s)")
    if server:
        group.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                           help="connections served at once; more are refused "
                                "(default: %(default)s)")
        add_per_client_argument(group, "connections")
        group.add_argument("--max-buffered", type=int, default=DEFAULT_MAX_BUFFERED,
                           metavar="BYTES",
                           help="message bytes held at once over all connections; beyond "
                                "it senders are told to retry (default: %(default)s)")
    group.add_argument("--auth-window", type=float, default=DEFAULT_AUTH_WINDOW,
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


def flag_name(attribute: str) -> str:
    """``ping_interval`` -> ``--ping-interval``: the flag an argparse
    attribute came from, for error messages."""
    return "--" + attribute.replace("_", "-")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """ConfigError for the first of ``names`` (argparse attributes) that is
    set but not a positive number; NaN is not positive.  One check for
    every "must be positive" flag, so each says it the same way."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{flag_name(name)} must be positive")


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    """ConfigError for the first of ``names`` (counts) that is below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"{flag_name(name)} must be at least 1")


def check_port(args: argparse.Namespace) -> None:
    """ConfigError unless ``--port`` is 0-65535 (0: any free port)."""
    if not 0 <= args.port < 65536:
        raise ConfigError("--port must be 0-65535")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format=LOG_FORMAT, stream=sys.stderr)
