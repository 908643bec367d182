"""A slow link for loopback: a TCP relay that delays every chunk by a fixed time in each direction.

The kernel here has no netem, so latency is added in user space: the tunnel client dials
this relay instead of the server's ports, and the relay forwards each chunk it reads
`--delay` seconds later (order kept), in both directions. A new connection also pays
the TCP handshake a real link would cost: the relay accepts at once on loopback, so it
holds the client's first bytes, and only dials the server, until 1.5 round trips after
the accept (SYN, SYN-ACK, then the client's ACK with its first data), as if the client's
`connect()` had taken one round trip. The server's bytes come back `--delay` later.

    python -m bench.link --delay 0.025 --to 127.0.0.1:60623 --to 127.0.0.1:60625

logs one line per mapping, `link to HOST:PORT listening on 127.0.0.1:PORT`. Memory is
bounded: a direction with more than LIMIT bytes in flight stops reading until it drains.
"""

import argparse
import asyncio
import collections
import contextlib
import logging

log = logging.getLogger("bench.link")

LIMIT = 4 * 1024 * 1024  # bytes in flight per direction before the sending side is paused
CLOSE = b""  # queued after the last bytes of a side that closed (a read never returns b"")


class Direction:
    """Bytes read on one side, written to the other `delay` seconds later, in order."""

    def __init__(self, delay: float, source: "Side") -> None:
        self.loop = asyncio.get_running_loop()
        self.delay = delay
        self.source = source  # paused when too much is in flight
        self.sink: Side | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()  # None = EOF, or CLOSE
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.not_before = 0.0  # nothing is delivered before this time (the handshake)
        self.sink_paused = False

    def push(self, data: bytes | None) -> None:
        """Queue `data` (None for EOF) for delivery `delay` from now."""
        self.queue.append((self.loop.time() + self.delay, data))
        self.queued += len(data) if data else 0
        if self.queued > LIMIT:
            self.source.pause()
        self._schedule()

    def attach(self, sink: "Side") -> None:
        """The other side is connected: start delivering."""
        self.sink = sink
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None and self.queue and self.sink is not None and not self.sink_paused:
            when = max(self.queue[0][0], self.not_before)
            self.timer = self.loop.call_at(when, self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        now = self.loop.time()
        sink = self.sink
        while self.queue and self.queue[0][0] <= now and sink is not None and not self.sink_paused:
            _, data = self.queue.popleft()
            if sink.closed or sink.transport is None:
                self.queue.clear()
                self.queued = 0
                break
            if data is None:
                sink.send_eof()
                continue
            if data == CLOSE:
                sink.transport.close()
                continue
            self.queued -= len(data)
            sink.transport.write(data)
        if self.queued <= LIMIT // 2:
            self.source.resume()
        self._schedule()

    def sink_pause(self, paused: bool) -> None:
        """Backpressure from the sink's transport."""
        self.sink_paused = paused
        if not paused:
            self._schedule()

    def cancel(self) -> None:
        """Drop what is in flight: its receiver is gone."""
        self.queue.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Side(asyncio.Protocol):
    """One of the two TCP connections of a relayed pair."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.outgoing: Direction | None = None  # what this side reads
        self.incoming: Direction | None = None  # what this side is sent
        self.peer: Side | None = None
        self.reading = True
        self.closed = False
        self.eof_in = self.eof_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.outgoing is not None
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        assert self.outgoing is not None
        self.outgoing.push(None)
        self.eof_in = True
        self._close_if_done()
        return True  # keep the other direction open (half-close)

    def send_eof(self) -> None:
        """Forward a half-close; a connection closed both ways is done."""
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.eof_out = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.eof_in and self.eof_out and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.incoming is not None:
            self.incoming.cancel()  # nobody left to deliver to
        if self.outgoing is not None:
            self.outgoing.push(CLOSE)  # the peer is closed too, once what is in flight has arrived

    def pause_writing(self) -> None:
        if self.incoming is not None:
            self.incoming.sink_pause(True)

    def resume_writing(self) -> None:
        if self.incoming is not None:
            self.incoming.sink_pause(False)

    def pause(self) -> None:
        if self.reading and self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self.reading = False

    def resume(self) -> None:
        if not self.reading and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.reading = True


class Relayed:
    """One accepted connection: its upstream is dialled after the emulated handshake."""

    def __init__(self, target: tuple[str, int], delay: float, tasks: set["asyncio.Task[None]"]) -> None:
        self.target, self.delay, self.tasks = target, delay, tasks

    def __call__(self) -> Side:
        downstream = Side()
        upstream = Side()
        downstream.peer, upstream.peer = upstream, downstream
        loop = asyncio.get_running_loop()
        up = Direction(self.delay, downstream)  # client -> server
        down = Direction(self.delay, upstream)  # server -> client
        up.not_before = loop.time() + 3 * self.delay  # SYN, SYN-ACK, ACK with the first data
        downstream.outgoing = upstream.incoming = up
        upstream.outgoing = downstream.incoming = down
        task = loop.create_task(self._dial(downstream, upstream, up, down))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return downstream

    async def _dial(self, downstream: Side, upstream: Side, up: Direction, down: Direction) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, up.not_before - loop.time()))
        if downstream.closed:
            return
        try:
            transport, _ = await loop.create_connection(lambda: upstream, *self.target)
        except OSError as exc:
            log.info("link: cannot reach %s:%d: %s", *self.target, exc)
            if downstream.transport is not None:
                downstream.transport.close()
            return
        assert isinstance(transport, asyncio.Transport)
        if downstream.closed:
            transport.close()
            return
        up.attach(upstream)
        down.attach(downstream)


def parse_target(text: str) -> tuple[str, int]:
    """argparse type for HOST:PORT."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return host, int(port)


async def serve(host: str, targets: list[tuple[str, int]], delay: float) -> None:
    """One listening port per target; serve until cancelled."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    servers = []
    for target in targets:
        server = await loop.create_server(Relayed(target, delay, tasks), host, 0, backlog=1024)
        servers.append(server)
        bound = server.sockets[0].getsockname()
        log.info("link to %s:%d listening on %s:%d", *target, *bound[:2])
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()
        for task in tasks:
            task.cancel()


def main() -> None:
    """Command line: python -m bench.link --delay SECONDS --to HOST:PORT [--to ...]."""
    parser = argparse.ArgumentParser(prog="python -m bench.link", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="where to listen (default: %(default)s)")
    parser.add_argument("--delay", type=float, default=0.025, help="seconds added each way (default: %(default)s)")
    parser.add_argument("--to", type=parse_target, action="append", required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.to, args.delay))


if __name__ == "__main__":
    main()
