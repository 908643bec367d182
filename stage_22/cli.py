"""The command lines' argument types: every number and name a user types is checked before it is used.

Shared by the server, the client and the demo (`python3 -m stage_22`). Each one turns a bad value
into argparse's one-line usage error and exit 2, instead of a traceback deep in the socket code
(a port of 99999 raises OverflowError there), a silent surprise (a client's port 99999 wraps
around to another one), or a flood (a heartbeat interval of 0 pings in a tight loop).

`listen_error` is here, not in server.py, because the client listens too (the inspector's page)
and a client module must never import the server's: the client would load all of it.
"""

import argparse
import contextlib
import errno
import ipaddress
import math
from collections.abc import Callable

from .protocol import ProtocolError, is_name


def listen_port(text: str) -> int:
    """argparse type for a port to listen on: 0 (any free port) to 65535."""
    # Checked here, not left to the socket: 99999 would end in an OverflowError traceback.
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def listen_error(exc: OSError, role: str, host: str, port: int) -> str:
    """A one-line, actionable message for a failed bind."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; stop the other program or pick another --{role}-port"
    if exc.errno == errno.EACCES:
        return f"permission denied to listen on {host}:{port}; use a --{role}-port above 1023"
    return f"cannot listen on {host}:{port} for the {role} port: {exc.strerror or exc}"


def positive_seconds(text: str) -> float:
    """argparse type for a timeout: a finite number of seconds, more than 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # not a number: refused just below
    if not 0 < value < math.inf:  # false for nan too
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for a whole number from `low` to `high` (a count, a size in MiB)."""

    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return int(text)

    return parse


def parse_address(text: str) -> tuple[str, int]:
    """Turn 'host:port' (or '[::1]:port') into a (host, port) pair for argparse."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port_text)


def parse_server(text: str) -> tuple[str, int | None]:
    """argparse type for SERVER: 'host' or 'host:port'; an IPv6 address alone or as '[::1]:port'."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.IPv6Address(text.strip("[]"))), None  # its colons are not a port
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return text, None
    if not host or (":" in host and not host.startswith("[")) or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected host or host:port, got {text!r}")
    # The port given here is the control port, as if given with --control-port.
    return host.strip("[]"), port(port_text)


def port(text: str) -> int:
    """argparse type for a port to connect to: 1 to 65535."""
    # Checked here: the socket would wrap 99999 around to another port without a word.
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def port_range(text: str) -> tuple[int, int] | None:
    """argparse type for --tcp-ports: 'LOW-HIGH', two ports from 1 to 65535, LOW <= HIGH; '0': any (None)."""
    if text == "0":
        return None  # as for every port flag: 0 is any free port
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high) <= 65535:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, ports from 1 to 65535, or 0 for any, got {text!r}")
    return int(low), int(high)


def name(text: str) -> str:
    """argparse type for --name: one DNS label, as it will appear in the URL (`myapp`)."""
    if not is_name(text.lower()):
        raise argparse.ArgumentTypeError(
            f"expected a name of 1 to 63 letters, digits or '-' (not first or last), got {text!r}"
        )
    return text.lower()  # host names are case-insensitive: MyApp and myapp are one tunnel


def domain(text: str) -> str:
    """argparse type for --domain: one or more DNS labels (`localhost`, `tunnel.example.com`)."""
    labels = text.lower().removesuffix(".").split(".")
    if not all(is_name(label) for label in labels):
        raise argparse.ArgumentTypeError(f"expected a domain name like tunnel.example.com, got {text!r}")
    return ".".join(labels)


def checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that checks a value as the server will (a CIDR, USER:PASS): the client says so first."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ProtocolError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check
