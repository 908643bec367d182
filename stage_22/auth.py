"""Who may open the tunnel: the control handshake, with an optional shared secret.

The secret never crosses the wire. The server sends a fresh random nonce (`challenge <nonce>`)
and the client answers with HMAC-SHA256(secret, nonce) (`auth <hmac>`). Only someone who knows
the secret can compute the answer, and an answer someone overheard is useless later: the next
connection gets a different nonce.

    client: hello <kind> [<tunnel> [<session_id>]]
    server: challenge <nonce>     only when the server has a secret
    client: auth <hmac>
    ...the server then sends `welcome <session_id> <tunnel> <url>` or `error <reason>` (see session.py)

A server can also answer `busy <reason>` (not now) instead of a challenge: the throttle below turns
away an address that guessed wrong too often. That is not a verdict on the client, which may share
the address with the guesser (a NAT, a load balancer): it keeps retrying, and gets in.

All of it runs inside TLS now (tls.py): the challenge still matters, since TLS proves only
the server's identity to the client, not the client's to the server.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from .protocol import (
    NETWORK_TIMEOUT,
    Auth,
    AuthError,
    Busy,
    Challenge,
    Error,
    Hello,
    ProtocolError,
    Refused,
    TryLater,
    Welcome,
    read_message,
    write_message,
)

# A secret shorter than this can be guessed; the server says so when it starts.
MIN_SECRET_LENGTH = 16
# After this many wrong answers from one address within THROTTLE_WINDOW seconds, that
# address is told "busy" until the window has passed: an online guesser gets a handful of
# tries a minute instead of the ~1300 a second an unthrottled server answers. (OpenSSH's
# PerSourcePenalties does the same per address.) A client that got in before is let through.
MAX_FAILURES = 5
THROTTLE_WINDOW = 60.0
# At most this many addresses are remembered (the oldest are forgotten first), so an
# attacker with many addresses can't make the table itself eat our memory.
THROTTLE_TABLE_SIZE = 4096


def new_nonce() -> str:
    """A challenge that was never used before and can't be predicted: 128 random bits."""
    return secrets.token_hex(16)


def answer(secret: str, nonce: str) -> str:
    """The proof of knowing `secret` for this one nonce: HMAC-SHA256, as hex."""
    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def is_valid(secret: str, nonce: str, digest: str) -> bool:
    """Check an answer in constant time."""
    # `==` stops at the first differing character, so its timing tells an attacker
    # how much of a guess was right; compare_digest always looks at every byte.
    return hmac.compare_digest(answer(secret, nonce), digest)


async def server_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: str | None,
    timeout: float = NETWORK_TIMEOUT,
    screen: Callable[[Hello], None] = lambda hello: None,
) -> Hello:
    """Read the client's `hello` and, if we have a secret, make it prove it knows it.

    Returns the hello (it may carry a session id to resume). Raises AuthError for a wrong
    answer, ProtocolError for anything else unexpected, TimeoutError if the client is too
    slow: a peer that connects and says nothing must not hold a socket forever. `screen`
    sees the hello before any challenge, and may raise to turn the peer away (the throttle).
    """
    async with asyncio.timeout(timeout):
        hello = await read_message(reader)
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected 'hello', got {hello or 'nothing'}")
        screen(hello)
        if secret is None:
            return hello
        nonce = new_nonce()
        await write_message(writer, Challenge(nonce))
        reply = await read_message(reader)
    match reply:
        case Auth(digest) if is_valid(secret, nonce, digest):
            return hello
        case Auth():
            raise AuthError("wrong secret; check --secret or NGROK_SECRET on both sides")
    raise ProtocolError(f"expected 'auth <hmac>', got {reply or 'nothing'}")


async def client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    secret: str | None,
    hello: Hello,
    timeout: float = NETWORK_TIMEOUT,
) -> Welcome:
    """Say hello (the tunnel wanted, and the session to resume if any), answer a challenge, return the welcome.

    Raises AuthError or Refused when the server says no (retrying would not help), ProtocolError
    for a peer that does not speak our protocol, TimeoutError or OSError for network trouble,
    TryLater when it says not now (retrying later will help).
    """
    async with asyncio.timeout(timeout):
        await write_message(writer, hello)
        reply = await read_message(reader)
        if isinstance(reply, Challenge):
            if not secret:
                raise AuthError("the server requires a secret; pass --secret or set NGROK_SECRET")
            await write_message(writer, Auth(answer(secret, reply.nonce)))
            reply = await read_message(reader)
    match reply:
        case Welcome():
            return reply
        case Error(reason):
            raise Refused(f"the server refused the connection: {reason}")
        case Busy(reason):
            raise TryLater(f"the server says not now: {reason}")
        case None:
            raise ProtocolError("the server closed the connection during the handshake")
    raise ProtocolError(f"expected 'welcome', got {reply}")


class Throttle:
    """Counts wrong answers per source address, and turns away an address that has had too many lately."""

    def __init__(
        self, max_failures: int = MAX_FAILURES, window: float = THROTTLE_WINDOW, size: int = THROTTLE_TABLE_SIZE
    ) -> None:
        self.max_failures, self.window, self.size = max_failures, window, size
        # address -> (wrong answers, when the first of them came), oldest entry first
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def check(self, address: str) -> None:
        """Raise TryLater if `address` has given too many wrong answers within the window."""
        # TryLater, not Refused: the address may be a NAT that our own client shares with the
        # guesser. Told "not now", a correctly configured client waits its backoff and comes back.
        key = source(address)
        count, since = self._failures.get(key, (0, 0.0))
        wait = since + self.window - time.monotonic()
        if wait <= 0:
            self._failures.pop(key, None)  # the window has passed: a clean slate
        elif count >= self.max_failures:
            raise TryLater(f"too many wrong secrets from {key}; try again in {wait:.0f}s")

    def failed(self, address: str) -> None:
        """Count one wrong answer from `address`."""
        key = source(address)
        count, since = self._failures.pop(key, (0, time.monotonic()))
        self._failures[key] = (count + 1, since)  # (re)inserted last: the newest entry
        if len(self._failures) > self.size:
            self._failures.popitem(last=False)


def strength_warning(secret: str | None) -> str | None:
    """A warning if the secret is short enough to guess; else None."""
    if not secret or len(secret) >= MIN_SECRET_LENGTH:
        return None
    return (
        f"WARNING: the secret is only {len(secret)} characters long; use at least {MIN_SECRET_LENGTH}. "
        "Make a strong one with: python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
    )


def exposure_warning(host: str, secret: str | None) -> str | None:
    """A loud warning if the world can reach this server and no secret guards it; else None."""
    if secret or is_loopback(host):
        return None
    return (
        f"WARNING: listening on {host!r} without a secret: anyone who can reach this machine "
        "can connect as the client and receive your users' traffic. Set NGROK_SECRET or --secret."
    )


def source(host: str) -> str:
    """What a per-address bound counts: an IPv4 address, or the /64 network an IPv6 address is in."""
    # One IPv6 subscriber gets a whole /64 (2^64 addresses): counting single addresses would
    # let a guesser take a fresh one for every try.
    if ":" not in host:
        return host  # WHY first (stage 22): an IPv4 address, the usual user, is counted as it is: no parsing
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address (a Unix socket's path, a test's name): count it as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:198.51.100.7, an IPv4 client of a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


def is_loopback(host: str) -> bool:
    """True if only this machine can reach `host` (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "" for every interface: assume the world can reach it
        return False
