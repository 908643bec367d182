"""Every request on its way to an HTTP tunnel: routed, guarded, and told who asked (X-Forwarded-*).

The app behind a tunnel sees every request come from 127.0.0.1 (the client dials it) over plain
http. A reverse proxy tells it more in lines it adds to each request's head: `X-Forwarded-For` (the
user's address, after the ones the head may carry already), `X-Forwarded-Proto` (`http` or `https`,
as the user came) and `X-Forwarded-Host` (the Host the user asked for). A user can write those
lines too, so an app must believe only the last value: ours (werkzeug's ProxyFix(x_for=1)).

Every request of a connection, not only the first: the user's direction goes through stage 17's
framing (observe.py), each head is checked and rewritten as it passes, bodies pass as they came.
The answers are framed too: after an upgrade (a WebSocket), what the user sends waits for the 101.

The guards a client asks for (protocol.Policy) are kept here, at the server, so a refused user never
reaches the client's link: CIDR rules when a user connects (403), basic auth on every request (401).
"""

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from . import routing
from .observe import HOLD, NO_BODY, NOT_HTTP, TUNNEL, Exchange, Framing, Observer
from .pages import error_page
from .protocol import Policy, network
from .relay import Stream, Timeouts
from .routing import BadRequest
from .tunnels import Session

log = logging.getLogger(f"{__package__}.server")

# The lines the server writes, by their names in lower case: the user's values of the same name come first.
FORWARDED = {
    b"x-forwarded-for": b"X-Forwarded-For",
    b"x-forwarded-proto": b"X-Forwarded-Proto",
    b"x-forwarded-host": b"X-Forwarded-Host",
}
# What an HTTP/2 client sends first when it assumes HTTP/2 without asking (h2c "prior knowledge").
H2_PREFACE = b"PRI * HTTP/2.0\r\n"
H2_ADVICE = (
    b"This tunnel server's HTTP port speaks HTTP/1.1, not HTTP/2.\n"
    b"Use HTTP/1.1 (curl --http1.1), or a TLS tunnel for HTTP/2 end to end.\n"
)


class Forwarding(Stream):
    """The server's side of an HTTP user: each request head is routed, guarded and rewritten on its way.

    It is also the observer's Sink, one that keeps nothing: the server frames, it doesn't record.
    """

    __slots__ = (
        *("find", "domain", "user", "proto", "session", "refusal", "broken", "out", "_page", "_unanswered"),
        "observer",
    )

    def __init__(
        self, timeouts: Timeouts, find: Callable[[str], Session | None], domain: str, user: str, proto: str
    ) -> None:
        super().__init__(timeouts)
        self.find, self.domain, self.user, self.proto = find, domain, plain(user), proto
        self.session: Session | None = None  # the tunnel the first request named: the connection's
        self.refusal: BadRequest | None = None  # why a request was refused
        self.broken = ""  # why the framing stopped: these bytes are not HTTP/1.1 (any more)
        self.out: list[bytes | memoryview] = []  # what the framing let through: heads rewritten, the rest as it came
        self._page = b""  # the page of a later refused request: it goes after the app's answers to the ones before
        self._unanswered: set[int] = set()  # the requests that went on and wait for their answer (ids)
        self.observer = Observer(self, user, up=lambda *args: Heads(self, *args))

    def first(self) -> Session:
        """The tunnel the connection's first request names; BadRequest if that request is refused."""
        if self.session is None or not self.sent.copied:
            raise self.refusal or BadRequest(400, f"that is not HTTP/1.1 as this server reads it: {self.broken}")
        return self.session

    def check(self, head: bytes) -> bytes | None:
        """The head that goes on for `head`; None if its request is refused (`refusal` says why)."""
        try:
            return self._check(head)
        except BadRequest as exc:
            self.refusal = exc
            return None

    def _check(self, head: bytes) -> bytes:
        if len(head) > routing.MAX_HEAD:
            raise BadRequest(431, f"the request's head is longer than {routing.MAX_HEAD} bytes")
        name = routing.tunnel_name(head, self.domain)
        if self.session is None:  # the connection's first request: it picks the tunnel
            self.session = self.find(name)
            if self.session is None:
                raise BadRequest(404, f"no tunnel is named {name!r} on this server")
            if not admits(self.session.policy, self.user):
                raise BadRequest(403, f"this tunnel does not admit users from {self.user}")
        elif name != self.session.tunnel:  # the app behind this connection is not that tunnel's
            where = f"{self.session.tunnel}.{self.domain}"
            raise BadRequest(421, f"this connection is for {where}; open a new one for {name}.{self.domain}")
        policy = self.session.policy
        if policy.basic_auth is not None and not authorized(head, policy.basic_auth):
            realm = f'WWW-Authenticate: Basic realm="{name}.{self.domain}", charset="UTF-8"\r\n'
            raise BadRequest(401, "this tunnel asks for a user name and a password", realm)
        ours = {}
        if policy.forwarded:
            host = next(value.strip() for key, value in routing.headers(head) if key.lower() == b"host")
            ours = dict(zip(FORWARDED, (self.user.encode(), self.proto.encode(), host), strict=True))
        return rewrite(head, ours, {b"authorization"} if policy.basic_auth else set())

    # --- the two directions: the framing's verdicts act here --------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if not self.refusing:  # refusing: read and dropped (relay.py)
            self.observer.request_bytes(data)
            self._pass(data, up=True)
        else:
            super().data_received(data)

    def on_data(self, payload: bytes | memoryview, fin: bool) -> None:
        super().on_data(payload, fin and not self._page)
        if payload:
            self.observer.response_bytes(payload)  # pairs answers with requests: a 101 ends the framing
            self._pass(b"", up=False)  # what waited for the answer to an upgrade
        if fin and self._page:  # after the app's last byte, the page that says why no more requests go
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(self._page)
            super().on_data(b"", True)

    def _pass(self, data: bytes | memoryview, up: bool) -> None:
        out, self.out = self.out, []
        if out:  # one read is usually one piece, body bytes or a rewritten head: no copy for the first
            whole = len(out) == 1 and isinstance(out[0], memoryview) and out[0].obj is data and len(out[0]) == len(data)
            super().data_received(data if whole else b"".join(out))
        if self.refusing or not (self.refusal or self.broken) or not self.sent.copied:
            return  # nothing to refuse, or refused at the first request: the server answers that one
        if self.refusal is not None:
            refusal = self.refusal
        elif up:
            refusal = BadRequest(400, f"that is not HTTP/1.1 as this server reads it: {self.broken}")
        else:  # a page after an answer that is not HTTP would be garbage too: the user gets the app's bytes
            log.warning("%s: the app's answer is not HTTP/1.1 (%s); no more requests on it", self.user, self.broken)
            self._stop(b"")
            return
        log.warning("%s: %s; a %d page after the app's answers", self.user, refusal.cause, refusal.status)
        self._stop(error_page(refusal.status, refusal.cause, refusal.headers))

    def _stop(self, page: bytes) -> None:
        """Forward nothing more from the user: the app gets our FIN, and the user `page` after the app's answers."""
        self._page, self.refusing, self.fin_pending = page, True, True
        if self.mux is not None:
            self.mux.schedule(self)
        self._update_reading()  # reads on, and drops (relay.py)
        self._answered()

    def _answered(self) -> None:
        """Once the requests before a refused one have their answers, the page goes: no wait for the app's close."""
        if self._page and not self._unanswered and self.transport is not None and self.mux is not None:
            self.reset_reason = "refused: " + self.refusal.cause if self.refusal else "refused"
            self.mux.forget(self, self.reset_reason)  # the client lets the app's connection go
            self.transport.write(self._page)
            self.transport.close()

    # --- observe.Sink -------------------------------------------------------------------------------

    def opened(self, exchange: Exchange) -> None:
        self._unanswered.add(id(exchange))
        exchange.keep_limit = -1  # no byte of a body is kept (0 would say the inspector is full)
        exchange.request.head = b""  # nor the head: up to 64 wait for their answers

    def grew(self, exchange: Exchange, size: int) -> None:
        exchange.response.head = exchange.request.trailers = exchange.response.trailers = b""

    def changed(self, exchange: Exchange) -> None:
        if exchange.state == NOT_HTTP and not self.broken:
            self.broken = exchange.note
        if exchange.response.done or exchange.state == NOT_HTTP:
            self._unanswered.discard(id(exchange))
            self._answered()


def passing(step: Callable[[Any, memoryview], memoryview]) -> Callable[[Any, memoryview], memoryview]:
    """A step of Framing's for Heads: what it consumed goes on to the app, unless a head was refused."""

    def through(heads: "Heads", view: memoryview) -> memoryview:
        rest = step(heads, view)
        if heads.owner.refusal is None:  # after a refused head, nothing goes on
            heads.owner.out.append(view[: len(view) - len(rest)])
        return rest

    return through


class Heads(Framing):
    """The user's direction, framed: each head goes through Forwarding.check, every other byte as it came."""

    __slots__ = ("owner",)

    def __init__(self, owner: Forwarding, *args: Any) -> None:
        super().__init__(*args)
        self.owner = owner

    # Each step as Framing's, and what it consumed goes on; but a head is replaced by its rewrite
    # (_begin), and held bytes wait for the answer to their upgrade (tunnel).
    STEPS: ClassVar[dict[int, Callable[[Any, memoryview], memoryview]]] = {
        state: step if state in (NO_BODY, HOLD) else passing(step) for state, step in Framing.STEPS.items()
    }

    def _begin(self, head: bytes, rest: memoryview) -> memoryview:
        new = self.owner.check(head)
        if new is None:  # refused: the framing goes on for the answers to the requests before it
            self.state = TUNNEL
            return rest[len(rest) :]
        after = super()._begin(head, rest)  # NotHttp: the observer says why (Sink.changed)
        self.owner.out += (new, rest[: len(rest) - len(after)])  # the body bytes that came with the head
        return after

    def tunnel(self) -> None:
        if self.state == HOLD and not self.owner.broken:  # the app said 101: what waited is the new protocol's
            self.owner.out.append(bytes(self.buffer))
        super().tunnel()


def rewrite(head: bytes, ours: dict[bytes, bytes], drop: set[bytes]) -> bytes:
    """`head` with our value last in each X-Forwarded-* line of `ours`, and the lines named in `drop` removed."""
    if not ours and not drop:
        return head
    start, *lines = head.rstrip(b"\r\n").split(b"\n")
    kept, chains = [start.rstrip(b"\r")], {name: list[bytes]() for name in ours}
    for line in lines:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "a header line is folded onto the next (obsolete, RFC 9112 section 5.2)")
        name, _, value = line.partition(b":")
        key = name.lower().replace(b"_", b"-")  # X_Forwarded_For: an app may take it for X-Forwarded-For
        if key in chains:
            chains[key] += [part.strip() for part in value.split(b",") if part.strip()]
        elif key not in drop:
            kept.append(line)
    kept += [FORWARDED[key] + b": " + b", ".join([*chains[key], value]) for key, value in ours.items()]
    return b"\r\n".join(kept) + b"\r\n\r\n"


def authorized(head: bytes, credentials: str) -> bool:
    """True if the head's one Authorization line is `Basic` with `credentials` (USER:PASS), checked in constant time."""
    given = [value.strip() for name, value in routing.headers(head) if name.lower() == b"authorization"]
    scheme, _, token = given[0].partition(b" ") if len(given) == 1 else (b"", b"", b"")
    try:
        sent = base64.b64decode(token.strip(), validate=True)
    except binascii.Error:
        sent = b""
    # WHY hashes: compare_digest takes as long whichever bytes differ, so a guesser can't time its way
    # to the password letter by letter; comparing two digests, it takes as long whatever the lengths.
    same = hmac.compare_digest(hashlib.sha256(sent).digest(), hashlib.sha256(credentials.encode()).digest())
    return scheme.lower() == b"basic" and same


def admits(policy: Policy, host: str) -> bool:
    """True if a user from `host` may use the tunnel: no deny rule holds it, and an allow rule does if any."""
    if not (policy.allow or policy.deny):
        return True  # most tunnels have no rules: parse no address on every user's way in
    try:
        address = ipaddress.ip_address(plain(host))
    except ValueError:  # not an IP address: no rule can say whether it is in, so a tunnel with rules refuses it
        return False
    if any(address in network(rule) for rule in policy.deny):
        return False
    return not policy.allow or any(address in network(rule) for rule in policy.allow)


def plain(host: str) -> str:
    """The user's address as rules and apps read it: ::ffff:203.0.113.7 (IPv4 on a dual-stack socket) is 203.0.113.7."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


def h2_answer() -> bytes:
    """What an HTTP/2 client can read (RFC 9113): our SETTINGS, a 505 on its stream 1 saying why, a GOAWAY.

    Measured with curl --http2-prior-knowledge: an HTTP/1.1 page is "Empty reply from server" to it, a
    GOAWAY alone "Error in the HTTP2 framing layer"; this one prints H2_ADVICE.
    """

    def frame(kind: int, payload: bytes, flags: int = 0, stream: int = 0) -> bytes:
        return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload

    # The answer's head in HPACK (RFC 7541) by hand: ":status: 505" and "content-type: text/plain", each
    # a literal whose name is entry 8 or 31 of the static table (0x0f 0x10: 15 + 16), not Huffman-coded.
    content_type = b"text/plain; charset=utf-8"
    fields = b"\x08\x03505" + b"\x0f\x10" + bytes((len(content_type),)) + content_type
    settings, headers, data, goaway = 0x4, 0x1, 0x0, 0x7  # frame types
    end_stream, end_headers, http_1_1_required = 0x1, 0x4, 0xD
    goodbye = (1).to_bytes(4, "big") + http_1_1_required.to_bytes(4, "big") + H2_ADVICE.rstrip()
    return (
        frame(settings, b"")
        + frame(headers, fields, end_headers, stream=1)
        + frame(data, H2_ADVICE, end_stream, stream=1)
        + frame(goaway, goodbye)
    )
