"""Wire format of the tunnel connection's handshake: one message per line of text; every limit and timeout.

Each client has one connection to the server, inside TLS. It starts as stage 13's did, with a handshake in
text lines; the hello now says which tunnel the client wants:

    client: hello http [<name> [<session_id>]] [<key>=<value> ...]   a tunnel for HTTP users of NAME.<domain>
            hello tcp [<port> [<session_id>]] [<key>=<value> ...]    a public TCP port of its own (ssh, a database)
            hello tls [<name> [<session_id>]] [<key>=<value> ...]    TLS users of NAME.<domain>, by SNI, untouched
    server: challenge <nonce>                     (only if the server has a secret; see auth.py)
    client: auth <hmac>
    server: welcome <session_id> <tunnel> <url>   (tunnel: the name or the port it got)
            or `error <reason>`, then the server hangs up
            or `busy <reason>`: not now, try again later

Without a name or port, the server picks one. The `key=value` words ask the server to guard the
tunnel and say what to tell the app (Policy, stage 20): the server enforces them, so a refused user
never reaches the client. A reconnecting client names the tunnel it had
and its session id: that proves it is the same client, so it gets its tunnel back.

After `welcome`, both sides speak binary frames on the same connection (frames.py): the
heartbeats, and every user's bytes as a stream of its own. Nothing follows `auth` until
`welcome` comes, so each side knows exactly where the lines end and the frames begin.
Only `read_message` and `write_message` touch the lines' bytes.
"""

import asyncio
import base64
import binascii
import contextlib
import functools
import ipaddress
import re
from dataclasses import dataclass, field

CONTROL_PORT = 60623
PUBLIC_PORT = 60624
TLS_PORT = 60626  # TLS tunnels' users (60625 is the proxy port of stages 2 to 4)
# A line longer than this is an error. Without a bound, a peer that never sends a
# newline would make us buffer its bytes forever.
MAX_LINE = 1024
# How long to wait for a connect or a reply before calling the peer dead.
NETWORK_TIMEOUT = 5.0
# How long a user's new stream waits for the client to accept it (to reach the local
# app) before the server gives up on it and sends the user a 504 page.
PROXY_TIMEOUT = 10.0
# The client pings this often; a control connection silent for HEARTBEAT_TIMEOUT
# (three missed pings) is dead, even if TCP has not noticed: a laptop that went
# to sleep or a NAT that forgot the connection never sends a FIN.
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_TIMEOUT = 15.0
# At most this many users may wait for the client to accept their stream at once, and
# the client serves at most MAX_STREAMS streams at once. Each stream may hold one window
# of bytes (WINDOW in frames.py) each way, so these bound memory; see limits.py for descriptors.
MAX_WAITING = 4096
MAX_STREAMS = 4096
# One source address (an IPv6 /64) holds at most this many of a tunnel's streams at once: one
# source opened 4200 kept-alive connections in 2.3 s, and every later user got a 502 (issue 23).
# A browser opens at most 6 connections to a host, so 256 is some 40 busy browsers behind one
# NAT, and 16 sources are needed to fill a tunnel; a crowd behind one NAT (a conference's Wi-Fi
# on a demo) can raise it with --max-streams-per-address.
MAX_STREAMS_PER_ADDRESS = 256
# A relay with no byte either way for this long is closed (nginx's stream proxy waits
# 10 minutes too); so is a half-closed one whose other direction is silent this long.
IDLE_TIMEOUT = 600.0
HALF_CLOSED_TIMEOUT = 30.0
# ...and users of the public port who got their answer and say nothing more, after this long: a kept-alive
# connection waiting for a next request. nginx's keepalive_timeout is 75 s too; a user still
# waiting for its answer (a long poll) keeps IDLE_TIMEOUT.
KEEPALIVE_TIMEOUT = 75.0
# Ids, nonces and digests are single words of these characters.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# The buffer limit of the tunnel connection's reader, which frames may reach right after the
# handshake: one read of the event loop (256 KiB at most).
DATA_LIMIT = 256 * 1024
# How long a closing connection keeps swallowing input so that our last words arrive.
LINGER = 1.0
# A tunnel whose client's connection ended stays reserved this long, so that the client
# can come back (a Wi-Fi hiccup, a laptop lid) and keep its name; then the name is free.
# WHY 5 minutes (it was 30 s): a client away 45 s, its heartbeat timeout and 30 s, lost its name
# to the first stranger who asked (issue 23). 5 minutes covers an outage of the Wi-Fi or of the
# line, a laptop closed for a coffee, a train through a tunnel. A client that stops on purpose
# says goodbye and frees its name at once; one that crashed and starts again is told how long.
RESUME_WINDOW = 300.0
# At most this many tunnels at once, held or kept for a client to resume. Each TCP tunnel holds
# a listening socket, and a client that connects and leaves in a loop would otherwise pile up
# kept tunnels (one per RESUME_WINDOW) until the server ran out of descriptors.
MAX_TUNNELS = 1024
# At most this many of them for one source address (an IPv6 /64 counts as one): without it, one
# stranger (no secret) or one tenant (with it) took all 1024 names in 1.5 s, connecting and leaving
# (issue 23). 16 is more than a developer's machine runs, and 64 addresses are needed to fill the
# server; an office behind one NAT can raise it (--max-tunnels-per-address).
MAX_TUNNELS_PER_ADDRESS = 16
# A tunnel name is one DNS label in lower case: it becomes NAME.<domain> in the users' URL.
NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The kinds of tunnel: HTTP users routed by name (Host), a TCP port of the tunnel's own, TLS users routed by SNI.
KINDS = ("http", "tcp", "tls")
# At most this many --allow-cidr and --deny-cidr rules together, and this many bytes of USER:PASS: with
# the longest name and session id, the hello stays within MAX_LINE (12 IPv6 rules of 43 characters).
MAX_RULES = 12
MAX_CREDENTIALS = 128


class TunnelError(Exception):
    """Base of the errors a user can be told about in one line."""


class ProtocolError(TunnelError):
    """The peer sent something that breaks the protocol."""


class GoneAway(TunnelError):
    """The peer said goodbye (a GO_AWAY frame): it ends the connection on purpose, e.g. a client stopped."""


class Refused(TunnelError):
    """The server said no during the handshake (e.g. another client is connected): retrying won't help."""


class AuthError(Refused):
    """The secrets don't match, or one side has none: fix the secret, retrying won't help."""


class TryLater(TunnelError):
    """The server said not now (our address guessed wrong too often, or holds its share): retrying will help."""


@dataclass(frozen=True)
class Policy:
    """What the client asks the server to do for its tunnel's users: the hello's `key=value` words.

    `forwarded=off` (no X-Forwarded-* headers), `basic=<base64 of USER:PASS>` (users log in: HTTP
    tunnels only), `allow=<CIDR>,...` and `deny=<CIDR>,...` (users' addresses; a deny rule wins).
    """

    forwarded: bool = True
    basic_auth: str | None = field(default=None, repr=False)  # "USER:PASS"; kept out of repr(), as secrets are
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hello:
    """Client -> server, the first line: `hello <kind> [<tunnel> [<session_id>]] [<key>=<value> ...]`."""

    kind: str = "http"
    tunnel: str | None = None  # the name (http) or port (tcp) asked for; None: the server picks
    session_id: str | None = None
    policy: Policy = Policy()


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
    """Server -> client, the handshake succeeded: `welcome <session_id> <tunnel> <url>`."""

    session_id: str
    tunnel: str
    url: str


@dataclass(frozen=True)
class Busy:
    """Server -> client instead of `welcome`, "not now, try again later": `busy <reason>`.

    Where `error` means "this will never work" (a wrong secret), `busy` means the answer may change:
    a client that gets it keeps retrying with its backoff instead of giving up.
    """

    reason: str


@dataclass(frozen=True)
class Error:
    """Either way, sent just before closing: `error <reason>`."""

    reason: str


Message = Hello | Challenge | Auth | Welcome | Busy | Error


def encode(message: Message) -> bytes:
    """The exact bytes of one message on the wire, newline included."""
    match message:
        case Hello(kind, tunnel, session_id, policy):
            options = (
                "" if policy.forwarded else "forwarded=off",
                "basic=" + base64.b64encode(policy.basic_auth.encode()).decode() if policy.basic_auth else "",
                "allow=" + ",".join(policy.allow) if policy.allow else "",
                "deny=" + ",".join(policy.deny) if policy.deny else "",
            )
            return " ".join(word for word in ("hello", kind, tunnel, session_id, *options) if word).encode() + b"\n"
        case Challenge(nonce):
            return f"challenge {nonce}\n".encode()
        case Auth(digest):
            return f"auth {digest}\n".encode()
        case Welcome(session_id, tunnel, url):
            return f"welcome {session_id} {tunnel} {url}\n".encode()
        case Busy(reason):
            return f"busy {reason}\n".encode()
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
    match word, rest.split(" "):  # the hello and the welcome have several words...
        case "hello", [kind, *more] if kind in KINDS and sum("=" not in word for word in more) <= 2:
            tunnel, session_id = (*(word for word in more if "=" not in word), None, None)[:2]  # each may be left out
            if tunnel is not None and not is_tunnel(kind, tunnel):
                raise ProtocolError(f"not a valid {kind} tunnel: {tunnel[:64]!r}")
            if session_id is not None and not is_token(session_id):
                raise ProtocolError("not a valid session id")
            return Hello(kind, tunnel, session_id, read_policy(kind, [word for word in more if "=" in word]))
        case "welcome", [session_id, tunnel, url] if is_token(session_id) and is_token(tunnel):
            return Welcome(session_id, tunnel, url)
    match word, rest:  # ...the others one token, or a reason of any words
        case "challenge", nonce if is_token(nonce):
            return Challenge(nonce)
        case "auth", digest if is_token(digest):
            return Auth(digest)
        case "busy", reason if reason:
            return Busy(reason)
        case "error", reason if reason:
            return Error(reason)
    raise ProtocolError(f"unknown command {word[:32]!r}")


def read_policy(kind: str, words: list[str]) -> Policy:
    """The Policy that a hello's `key=value` words ask for; ProtocolError for one the server can't honour.

    WHY refuse, never ignore: a client that asked for a password must not get an open tunnel because
    the server misread its request. (An older server refuses the whole hello, for the same reason.)
    """
    options: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        if key not in ("forwarded", "basic", "allow", "deny") or key in options:
            raise ProtocolError(f"unknown or repeated option {key[:32]!r}")
        options[key] = value
    if kind != "http" and ("forwarded" in options or "basic" in options):  # a TCP or TLS tunnel: no head to touch
        raise ProtocolError("forwarded headers and basic auth are for HTTP tunnels only")
    if options.get("forwarded", "off") != "off":
        raise ProtocolError("forwarded= takes only 'off'")
    basic_auth = None
    if "basic" in options:
        try:
            basic_auth = base64.b64decode(options["basic"], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ProtocolError("basic= is not the base64 of a UTF-8 USER:PASS") from None
        basic_auth = credentials(basic_auth)
    allow, deny = (tuple(options[key].split(",")) if key in options else () for key in ("allow", "deny"))
    if len(allow) + len(deny) > MAX_RULES:
        raise ProtocolError(f"more than {MAX_RULES} CIDR rules")
    for rule in allow + deny:
        network(rule)
    return Policy("forwarded" not in options, basic_auth, allow, deny)


def credentials(text: str) -> str:
    """`text` if it is a valid USER:PASS for basic auth (RFC 7617), else ProtocolError saying why."""
    user, colon, password = text.partition(":")
    if not (user and colon and password) or not text.isprintable():
        raise ProtocolError("basic auth wants USER:PASS, both not empty, no control characters")
    if len(text.encode()) > MAX_CREDENTIALS:
        raise ProtocolError(f"basic auth's USER:PASS is longer than {MAX_CREDENTIALS} bytes")
    return text


@functools.lru_cache(maxsize=1024)  # checked for every user: parsed once per rule
def network(rule: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network a CIDR rule names (`203.0.113.0/24`, `2001:db8::/32`, an address alone); else ProtocolError."""
    try:
        return ipaddress.ip_network(rule, strict=False)  # 203.0.113.7/24 is 203.0.113.0/24
    except ValueError:
        raise ProtocolError(f"not a CIDR network: {rule[:64]!r}") from None


def is_token(text: str) -> bool:
    """True for an id, nonce or digest: one word of 1 to 128 letters, digits, '-' or '_'."""
    return TOKEN.fullmatch(text) is not None


def is_name(text: str) -> bool:
    """True for a tunnel name: one DNS label, lower case (`myapp`, `my-app-2`)."""
    return NAME.fullmatch(text) is not None


def is_tunnel(kind: str, text: str) -> bool:
    """True if `text` can name a tunnel of this kind: a name for http and tls, a port for tcp."""
    if kind == "tcp":
        return text.isdigit() and 1 <= int(text) <= 65535
    return is_name(text)


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
        if writer.can_write_eof():  # TLS has no half-close: there, the close itself says "no more"
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
    text = data.decode("latin-1")
    if text.isascii() and text.isprintable():  # the usual case: nothing to replace, no loop in Python
        return text
    return "".join(chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}" for byte in data)
