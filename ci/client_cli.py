"""A one-shot client on the command line: ``dispatcher.py status`` and
``retest``, the observer's land-queue commands and ``notify`` (the hook's
fallback for any flag it does not read itself) send one command to a
daemon through ``helpers.call`` and print its reply, for hooks and
scripts.  Apart from ``helpers.py`` because that module keeps only what
the card gives it: the server base and the client call."""

from __future__ import annotations

import dataclasses
import sys

import helpers
from ci.config import (ArgumentParser, ConfigError, add_common_arguments, configure_logging,
                       positive)
from ci.security import security_from_args
from ci.wire import DEFAULT_CONNECT_TIMEOUT, ProtocolError, parse_address


@dataclasses.dataclass(frozen=True)
class ClientCommand:
    """A one-shot client: its name and help, the command it sends, the flag
    naming the daemon (and its default), the name of its positional values
    (their values become the argument), and the role the daemon's TLS
    certificate must have."""
    prog: str
    description: str
    command: str
    flag: str
    default: str
    positional: str | None = None
    server_role: str = "dispatcher"


def client_main(spec: ClientCommand, argv) -> int:
    """Send ``spec.command`` to the daemon and print the reply (for hooks
    and scripts)."""
    prog, command, positional = spec.prog, spec.command, spec.positional
    parser = ArgumentParser(prog=prog, description=spec.description)
    if positional:
        parser.add_argument("values", nargs="+", metavar=positional,
                            help=f"one or more {positional.lower()} values")
    parser.add_argument(spec.flag, default=spec.default, metavar="HOST:PORT", dest="target",
                        help="the daemon's address (default: %(default)s)")
    parser.add_argument("--timeout", type=positive(float), default=DEFAULT_CONNECT_TIMEOUT,
                        metavar="SECONDS", help="give up after this long (default: %(default)s)")
    add_common_arguments(parser, server=False)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        address = parse_address(args.target)
        security = security_from_args(args)
        security.tls_server_role = spec.server_role if security.client_tls else None
        argument = " ".join(args.values) if positional else ""
        reply = helpers.call(address, command, argument, security=security, timeout=args.timeout)
    except (ValueError, ConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ProtocolError) as exc:
        print(f"{prog}: {args.target} unreachable: {exc}", file=sys.stderr)
        return 1
    if reply.command != "ok":
        print(f"{prog}: refused: {reply.command} {reply.argument}", file=sys.stderr)
        return 1
    sys.stdout.write(reply.body.decode("utf-8", "replace") or
                     (reply.argument + "\n" if reply.argument else ""))
    return 0
