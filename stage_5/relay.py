"""Byte pump: copy two connections into each other, both directions at once.

Stage 3's pump, unchanged; since stage 5 a connection may also be a stream of the tunnel connection
(mux.Stream), which has what the pump uses of one (protocol.Reader and Writer): the pump cannot tell.
"""

import asyncio

from .protocol import Reader, Writer

# Big reads mean fewer trips through the event loop per megabyte: 256 KiB is
# what the event loop itself reads from a socket at most in one go.
CHUNK_SIZE = 256 * 1024


async def pipe(src: Reader, dst: Writer) -> int:
    """Copy `src` into `dst` until EOF, pass the EOF on, and return the bytes copied."""
    copied = 0
    try:
        while data := await src.read(CHUNK_SIZE):
            dst.write(data)
            # Backpressure: if `dst` reads slower than `src` writes, wait here
            # instead of buffering the difference in memory.
            await dst.drain()
            copied += len(data)
        if dst.can_write_eof():
            # Half-close: tell `dst` "no more data from this side" while the
            # other direction keeps flowing (an HTTP client may shut its write
            # side and still wait for the whole response).
            dst.write_eof()
    except OSError:
        # One peer vanished (reset, broken pipe). Closing `dst` ends the other
        # direction too: its reader sees EOF, so neither copy waits forever.
        dst.close()
    return copied


async def relay(a_reader: Reader, a_writer: Writer, b_reader: Reader, b_writer: Writer) -> tuple[int, int]:
    """Pipe a -> b and b -> a at once until both end; return (bytes a->b, bytes b->a)."""
    async with asyncio.TaskGroup() as tg:
        a_to_b = tg.create_task(pipe(a_reader, b_writer))
        b_to_a = tg.create_task(pipe(b_reader, a_writer))
    return a_to_b.result(), b_to_a.result()
