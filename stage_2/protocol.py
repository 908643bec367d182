"""Wire format of the control and proxy connections: one message per line of text.

Text lines keep the protocol readable: you can speak it by hand with `nc localhost 60623`.
Only `read_message` and `write_message` touch bytes; the server and the client deal in messages.
A proxy connection carries exactly one message, its first line; after it come the user's bytes.
"""

import asyncio
import contextlib
import secrets
from dataclasses import dataclass

CONTROL_PORT = 60623
PUBLIC_PORT = 60624
PROXY_PORT = 60625
# A line longer than this is an error. Without a bound, a peer that never sends a
# newline would make us buffer its bytes forever.
MAX_LINE = 1024
# How long to wait for a connect or a reply before calling the peer dead.
NETWORK_TIMEOUT = 5.0
# How long a public connection waits for the client's proxy connection before
# the server gives up on it (and how long a proxy id stays valid).
PROXY_TIMEOUT = 10.0
# How long a closing connection keeps swallowing input so that our last words arrive.
LINGER = 1.0


class TunnelError(Exception):
    """Base of the errors a user can be told about in one line."""


class ProtocolError(TunnelError):
    """The peer sent something that breaks the protocol."""


@dataclass(frozen=True)
class Ping:
    """Client -> server, asks for a reply: `ping`."""


@dataclass(frozen=True)
class Pong:
    """Server -> client, the reply to a ping: `pong`."""


@dataclass(frozen=True)
class CreateProxy:
    """Server -> client on control, a user is waiting: `create_proxy <conn_id>`."""

    conn_id: str


@dataclass(frozen=True)
class Proxy:
    """Client -> server, the first line of a new proxy connection: `proxy <conn_id>`."""

    conn_id: str


@dataclass(frozen=True)
class Error:
    """Either way, sent just before closing: `error <reason>`."""

    reason: str


Message = Ping | Pong | CreateProxy | Proxy | Error


def encode(message: Message) -> bytes:
    """The exact bytes of one message on the wire, newline included."""
    match message:
        case Ping():
            return b"ping\n"
        case Pong():
            return b"pong\n"
        case CreateProxy(conn_id):
            return f"create_proxy {conn_id}\n".encode()
        case Proxy(conn_id):
            return f"proxy {conn_id}\n".encode()
        case Error(reason):
            return f"error {reason}\n".encode()


def decode(line: bytes) -> Message:
    """Parse one line (newline already stripped); raise ProtocolError if it is not a message."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("line is not ascii text") from None
    word, _, rest = text.partition(" ")
    match word, rest:
        case "ping", "":
            return Ping()
        case "pong", "":
            return Pong()
        case "create_proxy", conn_id if conn_id:
            return CreateProxy(conn_id)
        case "proxy", conn_id if conn_id:
            return Proxy(conn_id)
        case "error", reason if reason:
            return Error(reason)
    raise ProtocolError(f"unknown command {word[:32]!r}")


def new_conn_id() -> str:
    """A fresh id for one public connection: 128 random bits, so nobody can guess one."""
    return secrets.token_hex(16)


async def read_message(reader: asyncio.StreamReader) -> Message | None:
    """Read one message; None means the peer closed cleanly between messages."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed in the middle of a line") from None
        return None
    # A reader made with a bigger `limit` (the proxy port's: see server.py) can
    # hand us a longer line, so the bound is checked here as well.
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    # Accept "\r\n" too, so that `nc -C` or telnet can speak the protocol.
    return decode(line.rstrip(b"\r\n"))


async def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    """Send one message and wait until it is handed to the kernel."""
    writer.write(encode(message))
    await writer.drain()


async def say_goodbye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str) -> None:
    """Send `error <reason>` in a way the peer really gets to read it (the caller then closes)."""
    with contextlib.suppress(OSError):  # the peer may be gone already
        await write_message(writer, Error(reason))
    await linger(reader, writer)


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say "no more from us" (EOF) and swallow what the peer still sends, for a moment (the caller then closes)."""
    # Closing a socket that still has unread input makes the kernel send a reset,
    # and a reset can destroy our last words before the peer reads them (and shows
    # the peer "connection reset" instead of a clean end). So we end our side first.
    with contextlib.suppress(OSError):  # the peer may be gone already; TimeoutError is an OSError too
        writer.write_eof()
        async with asyncio.timeout(LINGER):
            while await reader.read(64 * 1024):
                pass
