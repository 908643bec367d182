"""The name in a TLS ClientHello (SNI), read by hand, without decrypting anything, sans I/O.

A browser that opens `https://myapp.example.com/` speaks first, and in the clear: its first TLS
message, the ClientHello, names the host it wants in the `server_name` extension, so that one
address can serve many certificates (RFC 6066 section 3). That name is all the TLS port needs to
route a user to a TLS tunnel; the rest of the connection stays encrypted between the user and the
local app, which alone holds the key. The bytes we read on the way are relayed unchanged.

The ClientHello arrives in pieces of any size, inside one or more TLS *records*:

    record      type 22 (handshake) | version (2) | length (2) | fragment ...     RFC 8446 5.1
    handshake   type 1 (client_hello) | length (3) | body ...                     RFC 8446 4
    body        version (2) | random (32) | session id <1> | cipher suites <2>
                | compression methods <1> | extensions <2>                        RFC 8446 4.1.2
    extension   type (2) | data <2>; server_name is type 0                        RFC 8446 4.2
    server_name a list <2> of (name type (1): 0 = host_name | host name <2>)      RFC 6066 3

(`<n>`: a vector, its length in n bytes first.) `Parser.feed` takes the next bytes and answers:
None (need more), the host name, or a `Refusal` that says why and which fatal alert to send back
(RFC 8446 6.2). It never raises, it keeps at most `limit` bytes, and each byte is looked at a
bounded number of times, whatever the pieces: a fuzzer (Hypothesis) feeds it anything.
"""

import re
from dataclasses import dataclass

# WHY 16 KiB: a ClientHello is ~500 bytes, ~1.8 KB with a post-quantum key share (X25519MLKEM768),
# a few KB with many resumption tickets. 16 KiB (one record's most, 2^14 bytes) is 9 times that, as
# the HTTP head's cap is: a peer that sends more without a whole ClientHello is refused, not buffered.
MAX_HELLO = 16 * 1024
MAX_RECORD = 2**14  # a plaintext record's fragment may not be longer (RFC 8446 5.1)
HANDSHAKE, CLIENT_HELLO, SERVER_NAME, HOST_NAME = 22, 1, 0, 0  # record type, message type, extension, name type
# The fatal alerts we answer with (RFC 8446 6.2; 112 is RFC 6066's).
UNEXPECTED_MESSAGE, HANDSHAKE_FAILURE, RECORD_OVERFLOW = 10, 40, 22
ILLEGAL_PARAMETER, DECODE_ERROR, MISSING_EXTENSION, UNRECOGNIZED_NAME = 47, 50, 109, 112
ALERTS = {
    UNEXPECTED_MESSAGE: "unexpected_message",
    RECORD_OVERFLOW: "record_overflow",
    HANDSHAKE_FAILURE: "handshake_failure",
    ILLEGAL_PARAMETER: "illegal_parameter",
    DECODE_ERROR: "decode_error",
    MISSING_EXTENSION: "missing_extension",
    UNRECOGNIZED_NAME: "unrecognized_name",
}
# A host name: labels of letters, digits and hyphens, separated by dots (at least one: a TLS tunnel is NAME.DOMAIN).
HOST = re.compile(rb"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+", re.I)


@dataclass(frozen=True)
class Refusal:
    """Why the bytes name no host we can route by, and the fatal alert to answer with (None: not TLS at all)."""

    reason: str
    alert: int | None = DECODE_ERROR


class Malformed(Exception):
    """A length or a field that can't be right: the ClientHello can't be decoded (decode_error)."""


Result = str | Refusal | None  # the host name, a refusal, or None: need more bytes


class Parser:
    """Fed the first bytes of a connection, piece by piece, finds the SNI host name of its ClientHello."""

    def __init__(self, limit: int = MAX_HELLO) -> None:
        self.limit = limit
        self.raw = bytearray()  # every byte fed, up to `limit`: the records
        self.hello = bytearray()  # the handshake bytes of the records read so far, headers stripped
        self.at = 0  # where the next record begins in `raw`
        self.result: Result = None

    def feed(self, data: bytes | bytearray | memoryview) -> Result:
        """Take the next bytes; the host name, a Refusal, or None (need more). Once answered, the same answer."""
        if self.result is None:
            room = self.limit - len(self.raw)
            self.raw += data[:room]  # never more than `limit`: what is over is judged below
            self.result = self._records()
            if self.result is None and len(data) > room:
                self.result = Refusal(f"no whole ClientHello in the first {self.limit} bytes", HANDSHAKE_FAILURE)
        return self.result

    def _records(self) -> Result:
        """Move every whole record's fragment into `hello`; answer as soon as the bytes allow."""
        while True:
            header = self.raw[self.at : self.at + 5]
            if refusal := check_header(header, first=self.at == 0):
                return refusal
            if len(header) < 5:
                return None
            length = int.from_bytes(header[3:5])
            if length == 0 or length > MAX_RECORD:  # RFC 8446 5.1: no empty handshake fragments
                alert = DECODE_ERROR if length == 0 else RECORD_OVERFLOW
                return Refusal(f"a handshake record of {length} bytes", alert)
            end = self.at + 5 + length
            if len(self.raw) < end:
                return None  # the rest of this record is still on its way
            self.hello += self.raw[self.at + 5 : end]
            self.at = end
            if answer := self._message():
                return answer

    def _message(self) -> Result:
        """The ClientHello in `hello`, once it is whole; a Refusal as soon as its header is wrong."""
        if self.hello[0] != CLIENT_HELLO:  # RFC 8446 4.1.2: a client begins with its hello
            return Refusal(f"a handshake message of type {self.hello[0]}, not a ClientHello", UNEXPECTED_MESSAGE)
        if len(self.hello) < 4:
            return None
        length = int.from_bytes(self.hello[1:4])
        if 4 + length + 5 > self.limit:  # with one record's header, at the least
            return Refusal(f"a ClientHello of {length} bytes; at most {self.limit - 9} are read", HANDSHAKE_FAILURE)
        if len(self.hello) < 4 + length:
            return None
        try:
            return server_name(bytes(self.hello[4 : 4 + length]))
        except Malformed as exc:
            return Refusal(f"a malformed ClientHello: {exc}", DECODE_ERROR)


def check_header(header: bytes | bytearray, first: bool) -> Refusal | None:
    """A Refusal if a record's header (whole or not yet) can't begin a handshake record."""
    if header and header[0] != HANDSHAKE:
        if first:  # no alert: it would be a TLS record to a peer that speaks something else
            return Refusal(f"not TLS: a TLS client's first byte is 22 (a handshake record), not {header[0]}", None)
        # RFC 8446 5.1: handshake messages must not be interleaved with other record types.
        return Refusal(f"a record of type {header[0]} in the middle of the ClientHello", UNEXPECTED_MESSAGE)
    if len(header) >= 2 and header[1] != 3:  # every TLS version so far is 3.x (TLS 1.3 is 3.4)
        return Refusal(f"not TLS: record version {header[1]}.x", None if first else DECODE_ERROR)
    return None


class Reader:
    """A cursor over one message's bytes: each read checks that the bytes are there (Malformed if not)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise Malformed(f"{size} bytes wanted at offset {self.at}, {len(self.data) - self.at} left")
        self.at += size
        return self.data[self.at - size : self.at]

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size))

    def vector(self, size: int) -> "Reader":
        """A vector `<size>`: its length in `size` bytes, then that many bytes, read by a Reader of their own."""
        return Reader(self.take(self.number(size)))

    def done(self) -> bool:
        return self.at == len(self.data)


def server_name(body: bytes) -> str | Refusal:
    """The host name in a ClientHello's body (RFC 8446 4.1.2), or why there is none."""
    hello = Reader(body)
    hello.take(2 + 32)  # legacy_version, random: nothing to route by
    if len(hello.vector(1).data) > 32:
        raise Malformed("a session id longer than 32 bytes")
    suites = hello.vector(2).data
    if not suites or len(suites) % 2:
        raise Malformed("the cipher suites are not a list of 2-byte numbers")
    if not hello.vector(1).data:
        raise Malformed("no compression method")
    if hello.done():  # a TLS 1.2 hello may end here: no extensions, so no name
        return Refusal("the ClientHello has no extensions, so no server name (SNI)", MISSING_EXTENSION)
    extensions = hello.vector(2)
    if not hello.done():
        raise Malformed("bytes after the extensions")
    while not extensions.done():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind == SERVER_NAME:
            return host_name(data)
    # RFC 8446 9.2: a server that requires SNI answers a hello without it with missing_extension.
    return Refusal("the ClientHello names no server (no SNI)", MISSING_EXTENSION)


def host_name(extension: Reader) -> str | Refusal:
    """The host_name entry of a server_name extension's list (RFC 6066 3), lower case."""
    names = extension.vector(2)
    if not extension.done() or names.done():
        raise Malformed("a server_name extension that is not one non-empty list")
    while not names.done():
        kind, name = names.number(1), names.vector(2).data
        if kind == HOST_NAME:
            # ASCII, no trailing dot, never an IP address (RFC 6066 3): a name our tunnels can have.
            if HOST.fullmatch(name) is None or name.rsplit(b".", 1)[-1].isdigit():
                return Refusal(f"the server name {name[:100]!r} is not a host name", ILLEGAL_PARAMETER)
            return name.decode("ascii").lower()
    return Refusal("the server_name extension has no host name", MISSING_EXTENSION)


def alert(description: int) -> bytes:
    """A fatal alert record (RFC 8446 6): type 21, version 3.3, length 2, level 2 (fatal), the description."""
    return bytes([21, 3, 3, 0, 2, 2, description])


def alert_name(description: int) -> str:
    """'unrecognized_name (112)', for a log line."""
    return f"{ALERTS.get(description, 'alert')} ({description})"
