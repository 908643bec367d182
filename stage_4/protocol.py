"""Wire format of the control and proxy connections: one message per line of text.

Text lines keep the protocol readable: you can speak it by hand with `nc localhost 60623`.
Only `read_message` and `write_message` touch bytes; the server and the client deal in messages.
A proxy connection starts with one message each way, `proxy <id>` from the client and `ok` (or
`error <reason>`) from the server; after them come the user's bytes. The client relays nothing
before the `ok`, so that nothing the server says can ever reach the local app as a user's bytes.

A control connection starts with a handshake, then carries heartbeats and requests:

    client: hello [<session_id>]      (the session id only when reconnecting)
    server: challenge <nonce>         (only if the server has a secret; see auth.py)
    client: auth <hmac>
    server: welcome <session_id>      (or `error <reason>`, then the server hangs up; or
                                      `busy <reason>`: not now, try again later)
    client: ping   server: pong       (every few seconds, so that both sides notice a dead peer)
"""

import asyncio
import contextlib
import re
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
# The client pings this often; a control connection silent for HEARTBEAT_TIMEOUT
# (three missed pings) is dead, even if TCP has not noticed: a laptop that went
# to sleep or a NAT that forgot the connection never sends a FIN.
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TIMEOUT = 15.0
# At most this many public connections may wait for their proxy connection at once.
# A waiting user costs a socket and a few KiB (its bytes wait in the kernel: see
# server.py), so this bounds memory; the descriptors are bounded too (see limits.py).
MAX_WAITING = 4096
# A relay with no byte either way for this long is closed (nginx's stream proxy waits
# 10 minutes too); so is a half-closed one whose other direction is silent this long.
IDLE_TIMEOUT = 600.0
HALF_CLOSED_TIMEOUT = 30.0
# Ids, nonces and digests are single words of these characters.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Public, proxy and private connections carry bulk data: a reader buffers up to
# twice this much before it stops reading the socket. 256 KiB, the most the event
# loop reads in one go, keeps that pause/resume dance rare (see docs: performance).
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


class TryLater(TunnelError):
    """The server said not now (our address guessed wrong too often lately): retrying later will help."""


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
class Busy:
    """Server -> client instead of `welcome`, "not now, try again later": `busy <reason>`.

    Where `error` means "this will never work" (a wrong secret), `busy` means the answer may change:
    a client that gets it keeps retrying with its backoff instead of giving up.
    """

    reason: str


@dataclass(frozen=True)
class Ping:
    """Client -> server, asks for a reply: `ping`."""


@dataclass(frozen=True)
class Pong:
    """Server -> client, the reply to a ping: `pong`."""


# --8<-- [start:proxy_messages]
@dataclass(frozen=True)
class CreateProxy:
    """Server -> client on control, a user is waiting: `create_proxy <conn_id>`."""

    conn_id: str


@dataclass(frozen=True)
class Proxy:
    """Client -> server, the first line of a new proxy connection: `proxy <conn_id>`."""

    conn_id: str
    # --8<-- [end:proxy_messages]


@dataclass(frozen=True)
class Ok:
    """Server -> client on a new proxy connection, the pairing is made: `ok` (what follows is the user's)."""


@dataclass(frozen=True)
class LocalError:
    """Client -> server on control, the local app refused a user: `local_error <conn_id> <reason>`."""

    conn_id: str
    reason: str


@dataclass(frozen=True)
class ProxyError:
    """Client -> server on control, a user's proxy connection failed: `proxy_error <conn_id> <reason>`."""

    conn_id: str
    reason: str


@dataclass(frozen=True)
class Error:
    """Either way, sent just before closing: `error <reason>`."""

    reason: str


Message = (
    Hello | Challenge | Auth | Welcome | Busy | Ping | Pong | CreateProxy | Proxy | Ok | LocalError | ProxyError | Error
)


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
        case Busy(reason):
            return f"busy {reason}\n".encode()
        case Ping():
            return b"ping\n"
        case Pong():
            return b"pong\n"
        case CreateProxy(conn_id):
            return f"create_proxy {conn_id}\n".encode()
        case Proxy(conn_id):
            return f"proxy {conn_id}\n".encode()
        case Ok():
            return b"ok\n"
        case LocalError(conn_id, reason):
            # The reason comes from the operating system; "replace" keeps the line ascii.
            return f"local_error {conn_id} {reason}\n".encode("ascii", "replace")
        case ProxyError(conn_id, reason):
            return f"proxy_error {conn_id} {reason}\n".encode("ascii", "replace")
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
        case "busy", reason if reason:
            return Busy(reason)
        case "ping", "":
            return Ping()
        case "pong", "":
            return Pong()
        case "create_proxy", conn_id if is_token(conn_id):
            return CreateProxy(conn_id)
        case "proxy", conn_id if is_token(conn_id):
            return Proxy(conn_id)
        case "ok", "":
            return Ok()
        case ("local_error" | "proxy_error") as kind, _:
            conn_id, _, reason = rest.partition(" ")
            if is_token(conn_id) and reason:
                return LocalError(conn_id, reason) if kind == "local_error" else ProxyError(conn_id, reason)
        case "error", reason if reason:
            return Error(reason)
    raise ProtocolError(f"unknown command {word[:32]!r}")


def is_token(text: str) -> bool:
    """True for an id, nonce or digest: one word of 1 to 128 letters, digits, '-' or '_'."""
    return TOKEN.fullmatch(text) is not None


# --8<-- [start:new_conn_id]
def new_conn_id() -> str:
    """A fresh id for one public connection: 128 random bits, so nobody can guess one."""
    return secrets.token_hex(16)
    # --8<-- [end:new_conn_id]


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


async def say_goodbye(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str, later: bool = False
) -> None:
    """Send `error <reason>` (`busy <reason>` if `later`) so that the peer gets to read it (the caller then closes)."""
    with contextlib.suppress(OSError):  # the peer may be gone already
        await write_message(writer, Busy(reason) if later else Error(reason))
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
