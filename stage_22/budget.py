"""The memory budget: how many bytes of users' data all the streams together may make us hold.

A stream's receiver promises its sender a window (frames.py): the bytes it may send before it
hears back. A promise is memory: a user who reads nothing leaves a window's worth in our buffers.
A window per stream bounded each stream, not all of them: 2,000 users who read nothing took a
server from 25 to 477 MB in 80 s, still rising (1 MiB windows; 17,472 streams would be 17 GiB).

So every stream's window is counted in one Budget, whose total is stated (`--memory-budget`):

- A stream starts with INITIAL_WINDOW. On the server, a new user waits until the budget has that
  much room (Budget.reserve); the client takes it at once (Budget.take), since the server has
  already sent the first bytes.
- As its receiver passes bytes on, a stream's window grows toward frames.WINDOW (Budget.grow),
  while no more than GROWTH_SHARE of the budget is spent: the rest stays for new streams.
- Past that share, windows shrink back to INITIAL_WINDOW as their bytes are passed on (relay.py).
- A stream's window goes back to the budget when its connection is gone.

What a stream has read from its TCP connection and not yet sent is bounded by the peer's
window (relay.py reads no more than that), so the peer's budget bounds it.
"""

import asyncio
from collections import deque

MiB = 1024 * 1024
# The default total: 4,096 streams at their first window, or 128 of them at their full one (and
# the first windows of 2,048 more). A production tunnel would size it from the machine's memory.
MEMORY_BUDGET = 256 * MiB
# Windows grow past INITIAL_WINDOW only while at most this share of the budget is spent.
GROWTH_SHARE = 0.5


class Budget:
    """Bytes that all the streams' windows may add up to; `used` is what they add up to now."""

    def __init__(self, total: int = MEMORY_BUDGET) -> None:
        self.total = total
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()  # in order of arrival

    async def reserve(self, size: int) -> None:
        """Take `size` bytes, waiting (first come, first served) until they fit in the total."""
        if not self._waiting and self.used + size <= self.total:
            self.used += size
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append((size, waiter))
        try:
            await waiter  # give() takes the bytes for us before it wakes us
        except asyncio.CancelledError:  # timed out: hand back what give() may have taken for us meanwhile
            if waiter.done() and not waiter.cancelled():
                self.give(size)
            elif (size, waiter) in self._waiting:
                self._waiting.remove((size, waiter))
            raise

    def take_now(self, size: int) -> bool:
        """Take `size` bytes if they are free now and nobody waits before us; False (nothing taken) if not."""
        if self._waiting or self.used + size > self.total:
            return False
        self.used += size
        return True

    def take(self, size: int) -> None:
        """Take `size` bytes now, even past the total (a stream the peer has opened already)."""
        self.used += size

    def grow(self, wanted: int) -> int:
        """Take up to `wanted` bytes for a growing window, within GROWTH_SHARE; return how many."""
        if self._waiting:
            return 0  # a new stream waits for its first window: it goes first
        granted = max(0, min(wanted, int(self.total * GROWTH_SHARE) - self.used))
        self.used += granted
        return granted

    def crowded(self) -> bool:
        """True once more than GROWTH_SHARE is spent (or a stream waits): windows should shrink."""
        return bool(self._waiting) or self.used > self.total * GROWTH_SHARE

    def give(self, size: int) -> None:
        """Bytes back: a window shrank, or its stream is gone. Wake the streams waiting, if they now fit."""
        self.used -= size
        while self._waiting and self.used + self._waiting[0][0] <= self.total:
            wanted, waiter = self._waiting.popleft()
            if not waiter.done():  # else cancelled: it gave up waiting
                self.used += wanted
                waiter.set_result(None)
