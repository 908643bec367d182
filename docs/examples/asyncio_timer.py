"""A silence timeout with one timer, as the heartbeat check does: `python3 docs/examples/asyncio_timer.py`."""

import asyncio
import time
from collections.abc import Callable


class Silence:
    """Calls on_dead() when touch() has not been called for `timeout` seconds."""

    def __init__(self, timeout: float, on_dead: Callable[[], None]) -> None:
        self.timeout, self.on_dead = timeout, on_dead
        self.last = time.monotonic()
        self.timer = asyncio.get_running_loop().call_later(timeout, self.check)

    def touch(self) -> None:  # on every frame: cheap, no timer touched
        self.last = time.monotonic()

    def check(self) -> None:
        silent = time.monotonic() - self.last
        if silent >= self.timeout:
            self.on_dead()
        else:  # heard something meanwhile: look again when the rest of the timeout is up
            self.timer = asyncio.get_running_loop().call_later(self.timeout - silent, self.check)

    def stop(self) -> None:
        self.timer.cancel()  # a TimerHandle cancelled before it fires never runs


async def main() -> None:
    dead = asyncio.Event()
    watch = Silence(0.3, dead.set)
    for _ in range(3):
        await asyncio.sleep(0.2)
        watch.touch()
    await dead.wait()  # 0.3 s after the last touch
    print("silent for 0.3 s")


if __name__ == "__main__":
    asyncio.run(main())
