"""Byte pump: copy two TCP connections into each other, both directions at once; end silent ones.

Stage 0's pump, plus what a server on the internet needs: a relay where nothing moves for
`idle` seconds is closed (nginx's stream proxy does the same, by default after 10 minutes),
and so is a half-closed one whose other direction stays silent for `half_closed` seconds
(HAProxy's `timeout client-fin`). Without them, a peer that opens connections and goes quiet
holds our sockets for as long as it likes, until we run out of them (see limits.py).
"""

import asyncio
import time
from dataclasses import dataclass, field

# Big reads mean fewer trips through the event loop per megabyte: 256 KiB is
# what the event loop itself reads from a socket at most in one go.
CHUNK_SIZE = 256 * 1024
# How much of each direction's first bytes to keep for the server's request log:
# enough for an HTTP request line ("GET /path HTTP/1.1") or status line.
HEAD_SIZE = 1024


@dataclass(frozen=True)
class Timeouts:
    """How long a relay may stay silent: both ways open, and after one direction has ended."""

    idle: float
    half_closed: float


@dataclass
class Flow:
    """One direction of a relay: how many bytes it carried, how they began, and whether it ended."""

    copied: int = 0
    head: bytes = b""
    done: bool = False


@dataclass
class Activity:
    """When a relay last moved a byte, either way, and why the watchdog ended it (if it did)."""

    last: float = field(default_factory=time.monotonic)
    expired: str = ""


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flow: Flow, activity: Activity) -> None:
    """Copy `src` into `dst` until EOF and pass the EOF on, counting in `flow`."""
    try:
        while data := await src.read(CHUNK_SIZE):
            activity.last = time.monotonic()
            if len(flow.head) < HEAD_SIZE:
                # Peeking costs nothing here: we keep a copy of the first bytes for the log and pass
                # them on unchanged, so the far end misses nothing. Over as many reads as it takes:
                # a "100 Continue" comes alone, and the log wants the status that follows it.
                flow.head += data[: HEAD_SIZE - len(flow.head)]
            dst.write(data)
            # Backpressure: if `dst` reads slower than `src` writes, wait here
            # instead of buffering the difference in memory.
            await dst.drain()
            flow.copied += len(data)
        if dst.can_write_eof():
            # Half-close: tell `dst` "no more data from this side" while the
            # other direction keeps flowing (an HTTP client may shut its write
            # side and still wait for the whole response).
            dst.write_eof()
    except OSError:
        # One peer vanished (reset, broken pipe). Closing `dst` ends the other
        # direction too: its reader sees EOF, so neither copy waits forever.
        dst.close()
    flow.done = True
    activity.last = time.monotonic()  # a half-closed relay's clock starts now


# --8<-- [start:watchdog]
async def watchdog(
    activity: Activity, flows: tuple[Flow, Flow], timeouts: Timeouts, writers: tuple[asyncio.StreamWriter, ...]
) -> None:
    """Close the relay's connections once it has been silent too long (both ways open, or half-closed)."""
    while True:
        half_closed = any(flow.done for flow in flows)
        limit = timeouts.half_closed if half_closed else timeouts.idle
        remaining = activity.last + limit - time.monotonic()
        if remaining <= 0:
            activity.expired = f"{'half-closed' if half_closed else 'idle'} for {limit:g}s"
            for writer in writers:  # both pipes then see the end of their connection and stop
                writer.close()
            return
        # Then look again: bytes may have moved meanwhile, or one direction ended, which
        # brings the (shorter) half-closed limit into play: so never sleep past it.
        await asyncio.sleep(min(remaining, timeouts.half_closed))
        # --8<-- [end:watchdog]


async def relay(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    timeouts: Timeouts,
) -> tuple[Flow, Flow, Activity]:
    """Pipe a -> b and b -> a at once until both end (or the watchdog ends them); return the flows and activity."""
    a_to_b, b_to_a, activity = Flow(), Flow(), Activity()
    async with asyncio.TaskGroup() as tg:
        timer = tg.create_task(watchdog(activity, (a_to_b, b_to_a), timeouts, (a_writer, b_writer)))
        await asyncio.gather(pipe(a_reader, b_writer, a_to_b, activity), pipe(b_reader, a_writer, b_to_a, activity))
        timer.cancel()
    return a_to_b, b_to_a, activity
