"""How long the client waits before each reconnect: exponential backoff with full jitter.

Retrying at once, in a tight loop, would hammer a server that is restarting (and flood the
log). Doubling the wait after each failure keeps the load low; a cap keeps the wait bounded,
so the tunnel comes back soon after the server does. "Full jitter" then picks a random wait
between 0 and that bound, so that many clients cut off at the same moment don't all come
back in the same instant (the "thundering herd").
"""

import random

# The first retry waits up to BASE seconds, then 2x, 4x, ... never more than CAP.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def bound(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """The longest wait before retry number `attempt` (0 = the first retry)."""
    # The exponent is capped too: 2.0 ** attempt overflows a float after ~1000 retries.
    return min(cap, base * 2.0 ** min(attempt, 32))


def delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """How long to wait before retry number `attempt`: anywhere from 0 to bound(attempt)."""
    return random.uniform(0, bound(attempt, base, cap))
