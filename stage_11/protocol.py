"""Wire format of the tunnel connection's handshake: one message per line of text; its ports and timeouts.

Stage 11 has one connection between the client and the server. It starts as stage 3's control
connection did, in text lines readable and speakable with `nc`, with a handshake:

    client: hello [<session_id>]      (the session id only when reconnecting)
    server: challenge <nonce>         (only if the server has a secret; see auth.py)
    client: auth <hmac>
    server: welcome <session_id>      (or `error <reason>`, then the server hangs up)

After `welcome`, both sides speak binary frames on the same connection (frames.py): the
heartbeats, and every user's bytes as a stream of its own. Nothing follows `auth` until
`welcome` comes, so each side knows exactly where the lines end and the frames begin.
Only `read_message` and `write_message` touch the lines' bytes.
"""

import asyncio
import contextlib
import re
from dataclasses import dataclass

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
# The client pings this often; a control connection silent for HEARTBEAT_TIMEOUT
# (three missed pings) is dead, even if TCP has not noticed: a laptop that went
# to sleep or a NAT that forgot the connection never sends a FIN.
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TIMEOUT = 15.0
# Ids, nonces and digests are single words of these characters.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
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


class AuthError(Refused):
    """The secrets don't match, or one side has none: fix the secret, retrying won't help."""


@dataclass(frozen=True)
class Hello:
    """Client -> server, the first line of a control connection: `hello` or `hello <session_id>`."""

    session_id: str | None = None


@dataclass(frozen=True)
class Challenge:
    """Server -> client, "prove you know the secret": `challenge <nonce>`."""

    nonce: str


@dataclass(frozen=True)
class Auth:
    """Client -> server, the answer to a challenge, HMAC-SHA256(secret, nonce) in hex: `auth <hmac>`."""

    digest: str


@dataclass(frozen=True)
class Welcome:
    """Server -> client, the handshake succeeded: `welcome <session_id>`."""

    session_id: str


@dataclass(frozen=True)
class Error:
    """Either way, sent just before closing: `error <reason>`."""

    reason: str


Message = Hello | Challenge | Auth | Welcome | Error


def encode(message: Message) -> bytes:
    """The exact bytes of one message on the wire, newline included."""
    match message:
        case Hello(None):
            return b"hello\n"
        case Hello(session_id):
            return f"hello {session_id}\n".encode()
        case Challenge(nonce):
            return f"challenge {nonce}\n".encode()
        case Auth(digest):
            return f"auth {digest}\n".encode()
        case Welcome(session_id):
            return f"welcome {session_id}\n".encode()
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
        case "hello", session_id if is_token(session_id):
            return Hello(session_id)
        case "challenge", nonce if is_token(nonce):
            return Challenge(nonce)
        case "auth", digest if is_token(digest):
            return Auth(digest)
        case "welcome", session_id if is_token(session_id):
            return Welcome(session_id)
        case "error", reason if reason:
            return Error(reason)
    raise ProtocolError(f"unknown command {word[:32]!r}")


def is_token(text: str) -> bool:
    """True for an id, nonce or digest: one word of 1 to 128 letters, digits, '-' or '_'."""
    return TOKEN.fullmatch(text) is not None


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


def printable(data: bytes) -> str:
    """`data` as text fit for a log line: every byte that is not printable ASCII becomes \\xNN.

    A path comes from anyone on the internet. Written raw, an ESC byte would start a
    terminal escape sequence in the terminal that shows the log, a BEL would ring it and
    a NUL would cut the line short for some tools.
    """
    return "".join(chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}" for byte in data)
