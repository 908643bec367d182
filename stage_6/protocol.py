"""Wire format of the tunnel connection's handshake: one message per line of text; its ports and timeouts.

Stage 6 has one connection between the client and the server. It starts as stage 3's control
connection did, in text lines readable and speakable with `nc`, with a handshake:

    client: hello
    server: welcome                   (or `error <reason>`, then the server hangs up)

After `welcome`, both sides speak binary frames on the same connection (frames.py): every
user's bytes as a stream of its own. Nothing follows `hello` until `welcome` comes, so each
side knows exactly where the lines end and the frames begin.
Only `read_message` and `write_message` touch the lines' bytes.
"""

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Protocol

CONTROL_PORT = 60623
PUBLIC_PORT = 60624
# A line longer than this is an error. Without a bound, a peer that never sends a
# newline would make us buffer its bytes forever.
MAX_LINE = 1024
# How long to wait for a connect or a reply before calling the peer dead.
NETWORK_TIMEOUT = 5.0
# How long a user's new stream waits for the client to accept it (to reach the local
# app) before the server gives up on it and sends the user a 502 page.
PROXY_TIMEOUT = 10.0
# The buffer limit of the tunnel connection's reader, which frames may reach right after the
# handshake: one read of the event loop (256 KiB at most).
DATA_LIMIT = 256 * 1024
# How long a closing connection keeps swallowing input so that our last words arrive.
LINGER = 1.0


class TunnelError(Exception):
    """Base of the errors a user can be told about in one line."""


class ProtocolError(TunnelError):
    """The peer sent something that breaks the protocol."""


class Refused(TunnelError):
    """The server said no during the handshake (e.g. another client is connected): retrying won't help."""


@dataclass(frozen=True)
class Hello:
    """Client -> server, the first line of a control connection: `hello`."""


@dataclass(frozen=True)
class Welcome:
    """Server -> client, the handshake succeeded: `welcome`."""


@dataclass(frozen=True)
class Error:
    """Either way, sent just before closing: `error <reason>`."""

    reason: str


Message = Hello | Welcome | Error


def encode(message: Message) -> bytes:
    """The exact bytes of one message on the wire, newline included."""
    match message:
        case Hello():
            return b"hello\n"
        case Welcome():
            return b"welcome\n"
        case Error(reason):
            return f"error {reason}\n".encode()


def decode(line: bytes) -> Message:
    """Parse one line (newline already stripped); raise ProtocolError if it is not a message."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("line is not ascii text") from None
    if not text.isprintable():
        # A tab, escape or stray "\r" inside a line is never valid, and printing it
        # to a log or terminal could forge lines there.
        raise ProtocolError("line has control characters")
    word, _, rest = text.partition(" ")
    match word, rest:
        case "hello", "":
            return Hello()
        case "welcome", "":
            return Welcome()
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
    # The tunnel connection's reader has a bigger `limit` (it carries frames after the
    # handshake: see session.py), so it can hand us a longer line: the bound is checked here.
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    # Accept "\r\n" too, so that `nc -C` or telnet can speak the protocol.
    return decode(line.rstrip(b"\r\n"))


async def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    """Send one message and wait until it is handed to the kernel."""
    writer.write(encode(message))
    await writer.drain()


async def server_handshake(reader: asyncio.StreamReader, timeout: float = NETWORK_TIMEOUT) -> Hello:
    """Read the client's `hello`.

    Raises ProtocolError for anything else, TimeoutError if the client is too slow: a peer that
    connects and says nothing must not hold a socket forever.
    """
    async with asyncio.timeout(timeout):
        hello = await read_message(reader)
    if not isinstance(hello, Hello):
        raise ProtocolError(f"expected 'hello', got {hello or 'nothing'}")
    return hello


async def client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    timeout: float = NETWORK_TIMEOUT,
) -> Welcome:
    """Say hello, return the welcome.

    Raises Refused when the server says no (retrying would not help), ProtocolError for a peer
    that does not speak our protocol, TimeoutError or OSError for network trouble.
    """
    async with asyncio.timeout(timeout):
        await write_message(writer, Hello())
        reply = await read_message(reader)
    match reply:
        case Welcome():
            return reply
        case Error(reason):
            raise Refused(f"the server refused the connection: {reason}")
        case None:
            raise ProtocolError("the server closed the connection during the handshake")
    raise ProtocolError(f"expected 'welcome', got {reply}")


async def say_goodbye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str) -> None:
    """Send `error <reason>` in a way the peer really gets to read it (the caller then closes)."""
    with contextlib.suppress(OSError):  # the peer may be gone already
        await write_message(writer, Error(reason))
    await linger(reader, writer)


class Reader(Protocol):
    """What relay.pipe, pages.refuse and linger read: a StreamReader, or a relay.Stream (duck typing)."""

    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    """What they write: a StreamWriter, or a relay.Stream."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...


async def linger(reader: Reader, writer: Writer) -> None:
    """Say "no more from us" (EOF) and swallow what the peer still sends, for a moment (the caller then closes)."""
    # Closing a socket that still has unread input makes the kernel send a reset,
    # and a reset can destroy our last words before the peer reads them (and shows
    # the peer "connection reset" instead of a clean end). So we end our side first.
    with contextlib.suppress(OSError):  # the peer may be gone already; TimeoutError is an OSError too
        writer.write_eof()
        async with asyncio.timeout(LINGER):
            while await reader.read(64 * 1024):
                pass


def printable(data: bytes) -> str:
    """`data` as text fit for a log line: every byte that is not printable ASCII becomes \\xNN.

    A path comes from anyone on the internet. Written raw, an ESC byte would start a
    terminal escape sequence in the terminal that shows the log, a BEL would ring it and
    a NUL would cut the line short for some tools.
    """
    return "".join(chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}" for byte in data)
