"""What the tests of a tunnel "safe on a real network" share: the stage under test, and a process's
memory and CPU as the kernel reports them in /proc (Linux).

The tests run on the stage that brings their behaviour and every later one (support.stages_from):
test_backpressure.py and test_real_links.py from flow control on (stage 9), test_fd_limit.py and
test_idle_timeouts.py from the limits on (stage 13).
"""

import asyncio
import contextlib
import importlib
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Self

MiB = 1024 * 1024


def stage_module(stage: str, name: str) -> ModuleType:
    """`<stage>.<name>`, e.g. stage_module("stage_3", "server")."""
    return importlib.import_module(f"{stage}.{name}")


def has_proc() -> bool:
    """True where /proc tells a process's memory and CPU (Linux)."""
    return Path("/proc/self/status").is_file()


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS), in bytes; 0 once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return 0  # a zombie has no VmRSS line


def cpu_seconds(pid: int) -> float:
    """The CPU time process `pid` has used so far (user + system), in seconds."""
    # The command name (field 2) may hold spaces, so count the fields after its closing parenthesis.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


class RssWatch:
    """Samples the VmRSS of some processes in the background and keeps each one's peak.

    `async with RssWatch({"server": pid, ...}, alarm=...) as watch:`; `watch.alarm` is set as soon as
    a sample exceeds `alarm` bytes, so a test can stop a run that already failed instead of letting
    a process grow to gigabytes on a shared machine.
    """

    def __init__(self, pids: dict[str, int], alarm: int, interval: float = 0.1) -> None:
        self.pids = pids
        self.limit = alarm
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0)
        self.peak_at = dict.fromkeys(pids, 0.0)  # seconds after the start at which each peak was seen
        self.samples = 0
        self.alarm = asyncio.Event()
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _sample(self) -> None:
        while True:
            self.samples += 1
            for name, pid in self.pids.items():
                rss = rss_bytes(pid)
                if rss > self.peak[name]:
                    self.peak[name], self.peak_at[name] = rss, time.monotonic() - self._started
                if rss > self.limit:
                    self.alarm.set()
            await asyncio.sleep(self.interval)

    def report(self) -> str:
        """The peaks in a few words, e.g. 'server 21.3 MB at 4.1 s, client 19.8 MB at 40.2 s'."""
        return (
            ", ".join(f"{name} {self.peak[name] / 1e6:.1f} MB at {self.peak_at[name]:.1f} s" for name in self.pids)
            + f" ({self.samples} samples)"
        )
