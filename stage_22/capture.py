"""What the client does with the exchanges it observes: a log line each, a bounded ring, and replay.

- `ObservedStream` is the client's relay (relay.Stream) with one addition: after passing each
  chunk on, it hands a copy to an Observer (observe.py). The relay never waits for it.
- `Store` logs one line for each exchange once it is over: what was asked, the answer, the bytes
  and the time, for every request, where the server's request log has one line per connection.
- It also keeps the last `limit` exchanges for the inspector's page, and at most `byte_limit`
  bytes of their heads and bodies: the oldest go first. A tunnel left running for a week serves
  millions of requests; the inspector must not grow with them. The bound covers what the ring has
  let go of but can't free yet: an exchange still waiting for its answer stays with its
  connection's observer.
- It tells the page's live feeds (each a `Watcher`) what changed.
- `replay` sends a captured request again, to the local app and nowhere else, and captures the
  answer as a new exchange beside the old one.
"""

import asyncio
import logging
from collections import OrderedDict

from .observe import COMPLETE, PENDING, UPGRADED, Exchange, Observer
from .protocol import NETWORK_TIMEOUT, printable
from .relay import Stream, Timeouts

log = logging.getLogger(f"{__package__}.client")

# The ring: how many exchanges, and how many bytes of heads and bodies, the inspector keeps.
LIMIT = 500
BYTE_LIMIT = 32 * 1024 * 1024
# What an exchange costs besides its heads and bodies: the Python objects that hold them (two
# Messages, the Exchange, their lists and strings), measured with sys.getsizeof: about 1.4 KiB.
# It is also what a dropped exchange still waiting for its answer is counted at (see _evict).
ENTRY_OVERHEAD = 1536
# A replayed request waits this long for the local app's whole response.
REPLAY_TIMEOUT = 30.0
# The log shows this many exchanges a second, each on its line; past it, it says how many more once
# the second is over. WHY: at 17,000 exchanges a second nobody reads 17,000 lines, and making them took
# a fifth of the client's time (py-spy, wrk -c 16): a record, a clock reading and a line each.
LOG_RATE = 100


class ReplayError(Exception):
    """A request that can't be replayed, or a local app that can't be reached; the message says which."""


class ObservedStream(Stream):
    """A stream whose bytes, both ways, are also shown to an Observer: the client's side of a user."""

    __slots__ = ("observer",)  # as Stream's: a subclass without them would bring the dict back

    def __init__(self, timeouts: Timeouts, observer: Observer) -> None:
        super().__init__(timeouts)
        self.observer = observer

    def on_data(self, payload: bytes | memoryview, fin: bool) -> None:
        super().on_data(payload, fin)  # first the relay: it never waits for the observer
        if payload:
            self.observer.request_bytes(payload)  # from the user, on its way to the app

    def data_received(self, data: bytes | memoryview) -> None:
        super().data_received(data)
        self.observer.response_bytes(data)  # from the app, on its way to the user

    def reset(self, reason: str, notify: bool = True) -> None:
        super().reset(reason, notify)
        self.observer.close(reason)  # a stream reset before the app answered: its entry says why

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.observer.close()


class Watcher:
    """One live feed (a page open on the inspector): the ids of the exchanges changed since its last read."""

    def __init__(self) -> None:
        self.changed: dict[int, None] = {}  # an ordered set: the oldest change first
        self.wake = asyncio.Event()


class Store:
    """The last `limit` exchanges, holding at most `byte_limit` bytes: a ring (an observe.Sink)."""

    def __init__(self, limit: int = LIMIT, byte_limit: int = BYTE_LIMIT) -> None:
        self.limit, self.byte_limit = limit, byte_limit
        self.entries: OrderedDict[int, Exchange] = OrderedDict()  # oldest first
        self.bytes = 0  # what the entries hold, as `size` counts it, and the dropped ones still pending
        self._sizes: dict[int, int] = {}
        self._pending_dropped: set[int] = set()  # ids of exchanges dropped from the list before they ended
        self._next_id = 1
        self._going: set[int] = set()  # ids of the exchanges not over yet: each is logged once, when it ends
        self._logged = self._unlogged = 0  # lines in this second of the log, and exchanges past LOG_RATE
        self.watchers: set[Watcher] = set()

    @staticmethod
    def size(exchange: Exchange) -> int:
        """The bytes an exchange holds: its heads, trailers and kept bodies, and its objects."""
        request, response = exchange.request, exchange.response
        kept = len(request.head) + len(request.trailers) + len(request.body)
        return ENTRY_OVERHEAD + kept + len(response.head) + len(response.trailers) + len(response.body)

    def opened(self, exchange: Exchange) -> None:
        exchange.id, self._next_id = self._next_id, self._next_id + 1
        self._going.add(exchange.id)
        size = self.size(exchange)
        while self.entries and (len(self.entries) >= self.limit or self.bytes + size > self.byte_limit):
            self._evict()
        if self.bytes + size > self.byte_limit:
            # Dropped exchanges still waiting for their answers fill the ring by themselves: users
            # pipelining thousands of requests to an app that never answers. Keep nothing of this
            # one either; its observer sees keep_limit 0 and stops observing its connection.
            drop(exchange)
            return
        self.entries[exchange.id] = exchange
        self._sizes[exchange.id] = size
        self.bytes += size
        if self.watchers:
            self._notify(exchange)

    def grew(self, exchange: Exchange, size: int) -> None:
        # Counted as it grows, never recomputed: this runs for every piece of every body kept.
        if exchange.id in self._sizes:  # else dropped already: it keeps nothing any more (see drop)
            self._sizes[exchange.id] += size
            self.bytes += size
            while self.bytes > self.byte_limit and self.entries:
                self._evict()

    def changed(self, exchange: Exchange) -> None:
        if exchange.state != PENDING and exchange.id in self._going:
            self._going.discard(exchange.id)
            self._log(exchange)
        if exchange.state != PENDING and exchange.id in self._pending_dropped:
            self._pending_dropped.discard(exchange.id)  # its observer lets go of it now
            self.bytes -= ENTRY_OVERHEAD
        if self.watchers:
            self._notify(exchange)

    def _log(self, exchange: Exchange) -> None:
        if not self._logged:  # the first line of a second: at its end, say how many were left out
            asyncio.get_running_loop().call_later(1.0, self._second_over)
        if self._logged < LOG_RATE:
            self._logged += 1
            log.info("%s", line(exchange))
        else:
            self._unlogged += 1

    def _second_over(self) -> None:
        if self._unlogged:
            log.info("%d more exchanges in the last second (the log shows %d a second)", self._unlogged, LOG_RATE)
        self._logged = self._unlogged = 0

    def _evict(self) -> None:
        """Drop the oldest exchange from the list; if it is still going on, count what its observer still holds."""
        exchange_id, exchange = self.entries.popitem(last=False)
        self.bytes -= self._sizes.pop(exchange_id)
        # WHY count it: the observer of its connection holds it until its answer comes, to pair the
        # answers with the requests. 300 users pipelining 64 requests each to an app that never
        # answers left 19,200 such exchanges with their 30 KiB heads: 712 MB the ring never counted.
        if exchange.state == PENDING:
            self._pending_dropped.add(exchange_id)
            self.bytes += ENTRY_OVERHEAD
        drop(exchange)

    def _notify(self, exchange: Exchange) -> None:
        for watcher in self.watchers:
            watcher.changed[exchange.id] = None
            if len(watcher.changed) > self.limit:  # a feed that reads slowly: forget what was dropped
                watcher.changed = {i: None for i in watcher.changed if i in self.entries}
            watcher.wake.set()


def line(exchange: Exchange) -> str:
    """The log line of an exchange that is over: who asked what, the answer, the bytes, the time."""
    asked = f"{exchange.method} {printable(exchange.target.encode('latin-1'))}" if exchange.method else "-"
    answer = "no answer" if exchange.status is None else exchange.status
    took = "" if exchange.duration is None else f", {exchange.duration:.3f}s"
    state = "" if exchange.state == COMPLETE else f" ({exchange.state}{': ' if exchange.note else ''}{exchange.note})"
    up, down = exchange.request.wire, exchange.response.wire
    if exchange.sealed:  # a TLS tunnel's connection: no request, no answer, only its name and bytes
        return f"{exchange.user}: TLS {exchange.target}, {up} bytes up, {down} bytes down{took} ({exchange.note})"
    return f"{exchange.user}: {asked} -> {answer}, {up} bytes up, {down} bytes down{took}{state}"


def drop(exchange: Exchange) -> None:
    """Keep nothing of an exchange the ring let go of: no heads, bodies or path, only what framing needs."""
    exchange.keep_limit = 0  # its observer counts its bytes from now on, and keeps none
    exchange.target = ""
    if exchange.method not in ("HEAD", "CONNECT"):  # the observer still frames their answers by these two
        exchange.method = ""
    for message in (exchange.request, exchange.response):
        message.head, message.trailers, message.body = b"", b"", bytearray()


def replayable(exchange: Exchange) -> str | None:
    """None if the exchange's request can be sent again as it was; else why not."""
    request = exchange.request
    if exchange.sealed:
        return "it is a TLS tunnel's connection, encrypted end to end: the inspector never saw its requests"
    if exchange.state == UPGRADED:
        return "it switched protocols (a WebSocket): replaying its first request would not replay the rest"
    if not exchange.method or not request.done:
        return "its request was not captured whole"
    if len(request.body) < request.body_size:
        return f"its request body ({request.body_size} bytes) was only kept in part"
    return None


def request_bytes(exchange: Exchange) -> bytes:
    """The request again, as the app got it: its head as it came, then its body (chunked if it was)."""
    request = exchange.request
    if not request.chunked:
        return request.head + request.body
    chunk = b"%x\r\n%s\r\n" % (len(request.body), request.body) if request.body else b""
    return request.head + chunk + b"0\r\n" + request.trailers + b"\r\n"


async def replay(store: Store, local: tuple[str, int], exchange_id: int) -> Exchange:
    """Send a captured request to the local app again; return the new exchange, with its response.

    The address is the client's local app, fixed when the client started: a replay can never be
    aimed anywhere else (the page sends only an id).
    """
    original = store.entries.get(exchange_id)
    if original is None:
        raise ReplayError(f"no request {exchange_id} (the inspector keeps the last {store.limit})")
    if why := replayable(original):
        raise ReplayError(f"request {exchange_id} can't be replayed: {why}")
    data = request_bytes(original)  # now: while we connect, the ring may drop it (and its bytes)
    observer = Observer(store, "replay", replay_of=exchange_id)
    try:
        async with asyncio.timeout(NETWORK_TIMEOUT):
            reader, writer = await asyncio.open_connection(*local)
    except OSError as exc:
        raise ReplayError(f"the local app at {local[0]}:{local[1]} can't be reached ({exc})") from None
    try:
        writer.write(data)
        observer.request_bytes(data)
        exchange = observer.latest
        assert exchange is not None  # the head parsed once already
        try:  # a slow or broken answer is shown as it is, marked incomplete
            async with asyncio.timeout(REPLAY_TIMEOUT):
                while exchange.state == PENDING and (chunk := await reader.read(256 * 1024)):
                    observer.response_bytes(chunk)
        except TimeoutError:
            observer.close(f"no whole response from the local app within {REPLAY_TIMEOUT:g}s")
        except OSError as exc:
            observer.close(f"the connection to the local app failed ({exc})")
        return exchange
    finally:
        observer.close()  # a response that lasts until the close ends here (and a cancelled replay too)
        writer.close()
