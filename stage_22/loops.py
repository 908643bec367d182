"""Which event loop runs stage 22: asyncio's own, or uvloop (libuv's loop, what uvicorn uses) when installed.

Every stage so far ran on asyncio's loop, written in Python over the selectors module. uvloop does
the same job in C: the same asyncio API, so the same code runs on it, if that code relies only on
the API and never on the loop's concrete classes (an `isinstance(transport, asyncio.Transport)` fails
there: uvloop's transports are not subclasses). `--loop auto` (the default) takes uvloop if it can
be imported and asyncio otherwise: the standard library stays the only dependency.

`NGROK_LOOP=uvloop|asyncio` sets the default too, for every command at once: the tests run the
shared suite on both loops that way (subprocesses inherit it).
"""

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .protocol import TunnelError

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

try:
    import uvloop

    UVLOOP: LoopFactory | None = uvloop.new_event_loop
except ImportError:  # not installed: asyncio's loop it is
    UVLOOP = None

CHOICES = ("auto", "uvloop", "asyncio")
ENV = "NGROK_LOOP"  # the default of --loop, when set to one of CHOICES


class LoopError(TunnelError):
    """The loop asked for can't be had (uvloop is not installed)."""


def add_option(parser: argparse.ArgumentParser) -> None:
    """The --loop option, for the server, the client and the demo."""
    default = os.environ.get(ENV, "auto")
    parser.add_argument(
        "--loop",
        choices=CHOICES,
        default=default if default in CHOICES else "auto",
        help=f"the event loop: uvloop, asyncio, or auto: uvloop if installed (default: %(default)s, or ${ENV})",
    )


def factory(choice: str) -> LoopFactory:
    """What makes the loop `choice` (one of CHOICES) names; LoopError if it is uvloop and uvloop is missing."""
    if choice == "asyncio" or (choice == "auto" and UVLOOP is None):
        return asyncio.new_event_loop
    if UVLOOP is None:
        raise LoopError("--loop uvloop: uvloop is not installed (pip install uvloop, or use --loop asyncio)")
    return UVLOOP


def running() -> str:
    """The running loop's name, for the log: 'uvloop' or 'asyncio' (the package its class comes from)."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def run(main: Coroutine[Any, Any, T], loop: LoopFactory) -> T:
    """asyncio.run on the loop that `loop` makes: Ctrl-C cancels `main`, and every task ends before the loop closes."""
    for i, handler in enumerate(logging.root.handlers):  # basicConfig's: to stderr, a write per line
        if type(handler) is logging.StreamHandler:
            logging.root.handlers[i] = TurnHandler(handler.stream, handler.formatter)
    # WHY (the logging HOWTO's "Optimization"): every log record looked up its thread, its process and
    # the file and line that logged it, which no line of ours shows: 40% of a record's cost, and the
    # server logs one per user (the request log), the client one per stream and per exchange.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    # asyncio.Runner (3.11) takes the factory: no global event loop policy to set and forget.
    try:
        with asyncio.Runner(loop_factory=loop) as runner:
            return runner.run(main)
    finally:
        for handler in logging.root.handlers:  # the last lines, before an error message that sys.exit prints
            handler.flush()


class TurnHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the log lines of one turn of the event loop in one write, at the end of that turn.

    WHY (stage 22): stderr is line-buffered, so every log line was a system call of its own: the
    server's request log, the client's line per stream and per exchange. As Mux._write does for
    frames, the lines of one turn now leave together, at once after the turn: no timer, no delay.
    """

    def __init__(self, stream: Any, formatter: logging.Formatter | None) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
            if len(self._lines) == 1:
                asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop runs (before it starts, after it ends): write it now
            self.flush()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            if lines:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
