"""Wire format of the control connection: one message per line of text.

Text lines keep the protocol readable: you can speak it by hand with `nc localhost 60623`.
Only `read_message` and `write_message` touch bytes; the server and the client deal in messages.
"""

import asyncio
import contextlib
from dataclasses import dataclass

CONTROL_PORT = 60623
# A line longer than this is an error. Without a bound, a peer that never sends a
# newline would make us buffer its bytes forever.
MAX_LINE = 1024
# How long to wait for a connect or a reply before calling the peer dead.
NETWORK_TIMEOUT = 5.0
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
class Error:
    """Either way, sent just before closing: `error <reason>`."""

    reason: str


Message = Ping | Pong | Error


def encode(message: Message) -> bytes:
    """The exact bytes of one message on the wire, newline included."""
    match message:
        case Ping():
            return b"ping\n"
        case Pong():
            return b"pong\n"
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
        case "error", reason if reason:
            return Error(reason)
    raise ProtocolError(f"unknown command {word[:32]!r}")


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
    # Closing a socket that still has unread input makes the kernel send a reset,
    # and a reset can destroy our error line before the peer reads it. So we say
    # "no more from us" (EOF) and swallow what the peer still sends, for a moment.
    with contextlib.suppress(OSError):  # the peer may be gone already; TimeoutError is an OSError too
        await write_message(writer, Error(reason))
        writer.write_eof()
        async with asyncio.timeout(LINGER):
            while await reader.read(64 * 1024):
                pass
