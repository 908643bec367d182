"""The control connection after the handshake: frames both ways, and the streams the server opens on it.

Both sides run one `Mux` on the control connection once the handshake is done. It reads frames
(frames.Parser) and hands each SYN to the client; it writes the server's.

- **Stream ids.** Only the server opens streams, one per user, numbered 1, 2, 3... in order, so
  that an id the server never used can be told from one it used before: a SYN for an old id is a
  broken peer (the connection ends).
- **A stream, so far.** In stage 4 a stream is only opened: its SYN carries the user's pairing id
  (pairing.py), and the user's bytes still take a proxy connection of their own. Stage 5 sends
  them as DATA frames of the stream, and this module becomes the multiplexer: many streams over
  one TCP connection.
"""

import asyncio
from collections.abc import Callable

from . import frames
from .frames import DATA, SYN, Frame, encode
from .protocol import ProtocolError

READ_SIZE = 256 * 1024  # the most the event loop reads from a socket in one go anyway


class Mux:
    """One control connection: its frames both ways, and the streams opened on it.

    `run` reads the connection in a loop, as stage 3's pump read a connection, and hands each SYN
    to the client (`on_open`); the server writes its SYNs (`open`).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer: str,
        on_open: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.peer = peer  # "the server" or "the client", for messages
        self._reader, self._writer = reader, writer
        self._on_open = on_open  # called with each SYN's id and payload; None: the peer may not open streams
        self.last_id = 0  # the highest stream id opened so far on this connection
        self._parser = frames.Parser()

    # --- streams ------------------------------------------------------------------------------

    async def open(self, conn_id: str) -> int:
        """Open a stream for a user (server side): a SYN whose payload is the user's pairing id."""
        self.last_id += 1
        self._writer.write(encode(DATA, SYN, self.last_id, conn_id.encode()))
        # A client that reads nothing fills the connection's buffer: then we wait here, not buffer more.
        await self._writer.drain()
        return self.last_id

    # --- reading ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay frames until the peer closes (return), or raise ProtocolError."""
        # Not readuntil(): a frame's length is in its header, so there is no end to scan for.
        while data := await self._reader.read(READ_SIZE):
            for frame in self._parser.feed(data):
                self._dispatch(frame)
        if self._parser.pending:
            raise ProtocolError("connection closed in the middle of a frame")

    def _dispatch(self, frame: Frame) -> None:
        _, flags, stream_id, payload = frame  # DATA: the only type so far
        if flags & SYN:
            if self._on_open is None:
                raise ProtocolError(f"{self.peer} may not open streams (SYN on stream {stream_id})")
            if stream_id <= self.last_id:
                raise ProtocolError(f"stream {stream_id} opened out of order (after {self.last_id})")
            self.last_id = stream_id
            self._on_open(stream_id, payload)  # the client dials a proxy connection for it
        else:  # stage 5's streams carry the users' bytes; stage 4's carry none: a broken peer
            raise ProtocolError(f"unexpected {frame}: streams carry no data here")
