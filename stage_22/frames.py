"""The frame format: after the handshake, everything on the tunnel connection is a frame.

Every frame starts with the same 10-byte header, then `length` bytes of payload:

    +--------+--------+-------------------+-------------------+------------------+
    | type 1 | flags 1| stream id 4 bytes | length 4 bytes    | payload (length) |
    +--------+--------+-------------------+-------------------+------------------+
      network byte order (big-endian), as struct.Struct("!BBII") packs it

Types (`ProtocolError` for any other):

- DATA, on a stream (id >= 1): the payload is the next bytes of that stream. Flags: SYN opens the
  stream (the server does, one stream per user), and then the payload is the user's address
  (`host:port`, in text: the client shows it), not data; ACK accepts it (the client, once it
  reached the local app), FIN ends this direction (half-close), RST resets the stream, and then
  the payload is the reason, in text, not data.
- WINDOW, on a stream: "you may send me this many more bytes": a 4-byte increment (flow control).
- PING, on stream 0: an 8-byte payload that the peer echoes back with the ACK flag (heartbeats).
- GO_AWAY, on stream 0: the payload is the reason in text; the sender closes after it.

The header says how long a frame is *before* its payload arrives, so a bad length is refused at
once, not after buffering it: nobody can make us hold more than HEADER_SIZE + MAX_FRAME bytes of a
frame. The same checks run in `Parser`, the only code that turns bytes into frames.
"""

import struct
from typing import NamedTuple

from .protocol import MAX_LINE, ProtocolError

HEADER = struct.Struct("!BBII")  # type, flags, stream id, length
HEADER_SIZE = HEADER.size  # 10 bytes
# A frame carries at most this much payload. Small frames let the streams take turns on the one
# connection (a user's page is never stuck behind a megabyte of someone's download); big ones
# cost fewer trips through the loop per megabyte. HTTP/2 starts at 16 KiB; 64 KiB is yamux's window.
MAX_FRAME = 64 * 1024
# Each stream starts with this window each way: a sender may have at most this many bytes on
# their way to the receiver, or in its buffers, before the receiver grants more (WINDOW frames).
# HTTP/2's first window too: a page or a request of up to 64 KiB goes without waiting for a grant.
INITIAL_WINDOW = 64 * 1024
# A receiver that passes bytes on grows a stream's window up to this, within its memory budget
# (budget.py). WHY 1 MiB (it was 256 KiB, one read of the event loop): a stream can move at most
# one window per round trip of a grant, and between two processes on a busy machine that round
# trip is the time both take to be scheduled. With one read's worth in flight, the sender stopped
# after every read to wait for the grant: 1 MiB moved bulk transfers 1.2-1.4x faster (README,
# speed). It is also the most a stream can make its receiver buffer (a user who does not read),
# which is why windows start small: OpenSSH's channels use 2 MiB.
WINDOW = 1024 * 1024
# A window may never grow past this (HTTP/2's limit): a peer that grants more is broken.
MAX_WINDOW = 2**31 - 1
# Stream ids are 31 bits (the top bit is reserved, as in HTTP/2); 0 is the connection itself.
MAX_STREAM_ID = 2**31 - 1

DATA, WINDOW_UPDATE, PING, GO_AWAY = 0, 1, 2, 3
NAMES = {DATA: "DATA", WINDOW_UPDATE: "WINDOW", PING: "PING", GO_AWAY: "GO_AWAY"}
SYN, ACK, FIN, RST = 0x1, 0x2, 0x4, 0x8
# Which flags each type may carry; anything else is a protocol error, never silently ignored.
ALLOWED_FLAGS = {DATA: SYN | ACK | FIN | RST, WINDOW_UPDATE: 0, PING: ACK, GO_AWAY: 0}
FLAG_NAMES = ((SYN, "SYN"), (ACK, "ACK"), (FIN, "FIN"), (RST, "RST"))
PING_SIZE = 8


class Frame(NamedTuple):
    """One frame: its type, flags, stream id and payload."""

    kind: int
    flags: int
    stream_id: int
    payload: bytes | memoryview  # Parser gives a DATA frame's bytes as a view of the chunk read (no copy)

    def __str__(self) -> str:
        """E.g. 'DATA SYN|FIN stream 3, 12 bytes' (for debug logs and error messages)."""
        flags = "|".join(name for bit, name in FLAG_NAMES if self.flags & bit)
        kind = NAMES.get(self.kind, f"type {self.kind}")
        return f"{kind}{' ' + flags if flags else ''} stream {self.stream_id}, {len(self.payload)} bytes"


def encode(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    """The bytes of one frame on the wire: the header, then the payload."""
    # One bytes object, so that a frame goes to the kernel in one send, not two.
    return HEADER.pack(kind, flags, stream_id, len(payload)) + payload


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW frame: the receiver of `stream_id` may now send `increment` more bytes."""
    return encode(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def check_header(kind: int, flags: int, stream_id: int, length: int) -> None:
    """Raise ProtocolError if a frame with this header can't be valid, whatever its payload."""
    if kind not in NAMES:
        raise ProtocolError(f"unknown frame type {kind}")
    name = NAMES[kind]
    if flags & ~ALLOWED_FLAGS[kind]:
        raise ProtocolError(f"flags 0x{flags:02x} are not allowed on a {name} frame")
    if length > MAX_FRAME:
        raise ProtocolError(f"{name} frame of {length} bytes is larger than {MAX_FRAME}")
    if stream_id > MAX_STREAM_ID:
        raise ProtocolError(f"stream id {stream_id} is out of range")
    if (stream_id == 0) != (kind in (PING, GO_AWAY)):
        raise ProtocolError(f"{name} frame on stream {stream_id}")
    if kind == WINDOW_UPDATE and length != 4:
        raise ProtocolError(f"WINDOW frame of {length} bytes, not 4")
    if kind == PING and length != PING_SIZE:
        raise ProtocolError(f"PING frame of {length} bytes, not {PING_SIZE}")
    if (kind == GO_AWAY or flags & (RST | SYN)) and length > MAX_LINE:
        raise ProtocolError(f"a reason of {length} bytes is longer than {MAX_LINE}")


class Parser:
    """Turns the bytes of the connection, in whatever pieces they arrive, into frames (sans I/O).

    It holds at most one incomplete frame: HEADER_SIZE + MAX_FRAME bytes.
    """

    def __init__(self) -> None:
        self._rest = b""  # the start of a frame whose end has not arrived yet

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """The frames completed by `data`; ProtocolError at the first bad one.

        A DATA frame's payload is a memoryview of `data` (or of the held start of a frame), not a copy.
        """
        # WHY views: at hundreds of MB/s, copying every payload out of the chunk it arrived in
        # (and, with `self._rest + data`, the whole chunk again whenever a frame straddled two
        # chunks: nearly always) cost more CPU than parsing. Slicing a memoryview copies nothing.
        frames: list[Frame] = []
        view = memoryview(data)
        if self._rest:
            # A frame began in an earlier chunk: complete it with the front of this one, copying
            # at most one frame's worth, then go on in `data` itself.
            joined = self._rest + view[: HEADER_SIZE + MAX_FRAME]
            used = self._parse(memoryview(joined), frames)
            if used < len(self._rest):  # still incomplete: all of `data` is in `joined`
                self._rest = joined
                return frames
            view = view[used - len(self._rest) :]
        used = self._parse(view, frames)
        self._rest = bytes(view[used:])
        return frames

    @staticmethod
    def _parse(data: memoryview, frames: list[Frame]) -> int:
        """Append the whole frames at the start of `data` to `frames`; return how many bytes they took."""
        pos, end = 0, len(data)
        while end - pos >= HEADER_SIZE:
            kind, flags, stream_id, length = HEADER.unpack_from(data, pos)
            check_header(kind, flags, stream_id, length)  # before waiting for the payload
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            payload: bytes | memoryview = data[start : start + length]
            if kind != DATA or flags & RST:
                payload = bytes(payload)  # a few bytes (a window, a ping, a reason): a copy to keep and read
            if kind == WINDOW_UPDATE and not int.from_bytes(payload, "big"):
                raise ProtocolError(f"WINDOW frame of 0 bytes on stream {stream_id}")
            frames.append(Frame(kind, flags, stream_id, payload))
            pos = start + length
        return pos

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (at most HEADER_SIZE + MAX_FRAME)."""
        return len(self._rest)
