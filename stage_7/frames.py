"""The frame format: after the handshake, everything on the tunnel connection is a frame.

Every frame starts with the same 10-byte header, then `length` bytes of payload:

    +--------+--------+-------------------+-------------------+------------------+
    | type 1 | flags 1| stream id 4 bytes | length 4 bytes    | payload (length) |
    +--------+--------+-------------------+-------------------+------------------+
      network byte order (big-endian), as struct.Struct("!BBII") packs it

One type so far (`ProtocolError` for any other; stage 9 adds WINDOW):

- DATA, on a stream (id >= 1): the payload is the next bytes of that stream. Flags: SYN opens the
  stream (the server does, one stream per user), ACK accepts it (the client, once it reached the
  local app), FIN ends this direction (half-close), RST resets the stream, and then the payload is
  the reason, in text, not data.

The header says how long a frame is *before* its payload arrives, so a bad length is refused at
once, not after buffering it: nobody can make us hold more than HEADER_SIZE + MAX_FRAME bytes of a
frame. The same checks run in `Parser`, the only code that turns bytes into frames.
"""

import struct
from typing import NamedTuple

from .protocol import MAX_LINE, ProtocolError

HEADER = struct.Struct("!BBII")  # type, flags, stream id, length
HEADER_SIZE = HEADER.size  # 10 bytes
# A frame carries at most this much payload: the most a peer can make us hold before its frame is
# whole (see Parser), while big frames cost fewer trips through the loop per megabyte. HTTP/2
# starts at 16 KiB; 64 KiB is yamux's window.
MAX_FRAME = 64 * 1024
# Stream ids are 31 bits (the top bit is reserved, as in HTTP/2); 0 is the connection itself.
MAX_STREAM_ID = 2**31 - 1

DATA = 0
NAMES = {DATA: "DATA"}
SYN, ACK, FIN, RST = 0x1, 0x2, 0x4, 0x8
# Which flags each type may carry; anything else is a protocol error, never silently ignored.
ALLOWED_FLAGS = {DATA: SYN | ACK | FIN | RST}
FLAG_NAMES = ((SYN, "SYN"), (ACK, "ACK"), (FIN, "FIN"), (RST, "RST"))


class Frame(NamedTuple):
    """One frame: its type, flags, stream id and payload."""

    kind: int
    flags: int
    stream_id: int
    payload: bytes

    def __str__(self) -> str:
        """E.g. 'DATA SYN|FIN stream 3, 12 bytes' (for debug logs and error messages)."""
        flags = "|".join(name for bit, name in FLAG_NAMES if self.flags & bit)
        kind = NAMES.get(self.kind, f"type {self.kind}")
        return f"{kind}{' ' + flags if flags else ''} stream {self.stream_id}, {len(self.payload)} bytes"


def encode(kind: int, flags: int, stream_id: int, payload: bytes | memoryview = b"") -> bytes:
    """The bytes of one frame on the wire: the header, then the payload."""
    # One bytes object, so that a frame goes to the kernel in one send, not two.
    return HEADER.pack(kind, flags, stream_id, len(payload)) + payload


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
    if stream_id == 0:
        raise ProtocolError(f"{name} frame on stream {stream_id}")
    if flags & RST and length > MAX_LINE:
        raise ProtocolError(f"a reason of {length} bytes is longer than {MAX_LINE}")


class Parser:
    """Turns the bytes of the connection, in whatever pieces they arrive, into frames (sans I/O).

    It holds at most one incomplete frame: HEADER_SIZE + MAX_FRAME bytes.
    """

    def __init__(self) -> None:
        self._rest = b""  # the start of a frame whose end has not arrived yet

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by `data`; ProtocolError at the first bad one."""
        frames: list[Frame] = []
        data = self._rest + data  # a frame that began in an earlier chunk goes on in this one
        used = self._parse(data, frames)
        self._rest = data[used:]
        return frames

    @staticmethod
    def _parse(data: bytes, frames: list[Frame]) -> int:
        """Append the whole frames at the start of `data` to `frames`; return how many bytes they took."""
        pos, end = 0, len(data)
        while end - pos >= HEADER_SIZE:
            kind, flags, stream_id, length = HEADER.unpack_from(data, pos)
            check_header(kind, flags, stream_id, length)  # before waiting for the payload
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append(Frame(kind, flags, stream_id, data[start : start + length]))
            pos = start + length
        return pos

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (at most HEADER_SIZE + MAX_FRAME)."""
        return len(self._rest)
