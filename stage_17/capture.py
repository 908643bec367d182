"""What the client does with the exchanges it observes: a log line each.

- `ObservedStream` is the client's relay (relay.Stream) with one addition: after passing each
  chunk on, it hands a copy to an Observer (observe.py). The relay never waits for it.
- `Store` logs one line for each exchange once it is over: what was asked, the answer, the bytes
  and the time, for every request, where the server's request log has one line per connection.
"""

import logging

from .observe import COMPLETE, PENDING, Exchange, Observer
from .protocol import printable
from .relay import Stream, Timeouts

log = logging.getLogger(f"{__package__}.client")


class ObservedStream(Stream):
    """A stream whose bytes, both ways, are also shown to an Observer: the client's side of a user."""

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


class Store:
    """Every exchange of the client's streams, logged once it is over (an observe.Sink)."""

    def __init__(self) -> None:
        self._next_id = 1
        self._going: set[int] = set()  # ids of the exchanges not over yet: each is logged once, when it ends

    def opened(self, exchange: Exchange) -> None:
        exchange.id, self._next_id = self._next_id, self._next_id + 1
        self._going.add(exchange.id)

    def changed(self, exchange: Exchange) -> None:
        if exchange.state != PENDING and exchange.id in self._going:
            self._going.discard(exchange.id)
            log.info("%s", line(exchange))


def line(exchange: Exchange) -> str:
    """The log line of an exchange that is over: who asked what, the answer, the bytes, the time."""
    asked = f"{exchange.method} {printable(exchange.target.encode('latin-1'))}" if exchange.method else "-"
    answer = "no answer" if exchange.status is None else exchange.status
    took = "" if exchange.duration is None else f", {exchange.duration:.3f}s"
    state = "" if exchange.state == COMPLETE else f" ({exchange.state}{': ' if exchange.note else ''}{exchange.note})"
    up, down = exchange.request.wire, exchange.response.wire
    return f"{exchange.user}: {asked} -> {answer}, {up} bytes up, {down} bytes down{took}{state}"
