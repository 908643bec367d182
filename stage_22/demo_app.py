"""The demo's local app: a tiny web server that shows each visitor what reached it.

It stands in for the app on your laptop that you want to show the world (in real use,
`python3 -m http.server 8000` or your web framework's dev server). Only the standard library,
so `python3 -m stage_22` works with nothing installed.
"""

import asyncio
import contextlib
import html
import logging
import time

from .protocol import NETWORK_TIMEOUT

log = logging.getLogger(f"{__package__}.app")

PAGE = """<!doctype html>
<meta charset=utf-8><title>ngrok-- demo</title>
<h1>Hello from {name}, through the tunnel!</h1>
<p>You asked for <code>{method} {path}</code> at {clock}: request number {count}.</p>
<p>This page was made by the demo local app <b>{name}</b> on {app}. Your request went
user &rarr; server's public port, which read its Host header &rarr; a stream in the
connection of the client named {name}, inside TLS &rarr; client &rarr; local app, and this
page came back the same way.</p>
<p>Try another path, e.g. <a href="/hello/world">/hello/world</a>.</p>
"""


class DemoApp:
    """An HTTP server that answers every request with a page naming the method, path and time."""

    def __init__(self, name: str = "demo") -> None:
        self.name = name  # which app this is: the demo runs two
        self.requests = 0
        self.address = ("", 0)
        self._listener: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Bind (0 = any free port) and return the real address."""
        self._listener = await asyncio.start_server(self._accept, host, port)
        self.address = self._listener.sockets[0].getsockname()[:2]
        log.info("local app port listening on %s:%d (%s)", *self.address, self.name)
        return self.address

    async def serve(self) -> None:
        """Serve until cancelled; then close every connection."""
        assert self._listener is not None, "call listen() first"
        try:
            await asyncio.Event().wait()
        finally:
            self._listener.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._handle(reader, writer))
        self._tasks.add(task)  # a strong reference, as the servers keep
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(NETWORK_TIMEOUT):  # a visitor who sends nothing is let go
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.decode("latin-1").partition(" ")  # "GET /path HTTP/1.1\r\n..."
            path = rest.partition(" ")[0]
            self.requests += 1
            page = PAGE.format(
                name=html.escape(self.name),
                method=html.escape(method),
                path=html.escape(path),
                clock=time.strftime("%H:%M:%S"),
                count=self.requests,
                app="{}:{}".format(*self.address),
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(page), page)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # not a complete HTTP request (or the visitor left): nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
