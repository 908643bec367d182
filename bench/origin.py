"""The origin every path leads to: one port, four services chosen by the first bytes.

Every path under test (direct, socat, stage 0, the stage 3 and 8 tunnels) forwards to
one fixed address, so one port has to serve every scenario. The first bytes a
connection sends pick the service:

- `GET ...` / `HEAD ...`: HTTP/1.x with keep-alive, a small fixed page (ab, wrk, TTFB);
- `SINK\\n`: count every byte until EOF, then answer `<count>\\n` (bulk upload);
- `SINK <n>\\n`: the same, answered once `n` bytes came (TLS has no half-close to end an upload with);
- `SOURCE <n>\\n`: send `n` bytes, then close (bulk download);
- `ECHO\\n`: echo every byte (the idle-connections scenario).

It is written as an asyncio Protocol (callbacks, no per-connection task) so that
the origin is as cheap as Python allows: every path pays for the same origin,
and the faster it is the more of the measured cost is the path's own.

With `--cert` and `--key` it speaks TLS with that certificate, as an app behind a TLS tunnel does
(bench.tlstunnel): the same services inside TLS, asyncio's TLS (the `ssl` module's memory BIOs).

python -m bench.origin [--port 0] [--cert FILE --key FILE]   # logs "origin port listening on HOST:PORT"
"""

import argparse
import asyncio
import contextlib
import logging
import ssl

log = logging.getLogger("bench.origin")

PAGE = b"<!doctype html><title>local app</title><h1>Hello from the local app</h1>\n"
HEAD_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(PAGE)
HEAD_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(
    PAGE
)
# One buffer sent over and over for SOURCE: building data is not what we measure.
BLOCK = memoryview(b"\x5a" * (256 * 1024))
MAX_HEAD = 64 * 1024
# A BufferedProtocol lets the event loop recv_into one reused buffer, so the
# counting sink allocates nothing per read and is not what limits the direct
# path's upload. One buffer serves every connection: the loop runs one callback
# at a time and each callback is done with the buffer when it returns.
INBOX = bytearray(1024 * 1024)


class Origin(asyncio.BufferedProtocol):
    """One connection to the origin; the first line decides which service it gets."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.mode = b""
        self.buffer = b""
        self.count = 0
        self.expected = -1  # SINK <n>: answer once n bytes came; -1: at EOF
        self.remaining = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return INBOX

    def buffer_updated(self, nbytes: int) -> None:
        if self.mode == b"SINK":
            self.count += nbytes
            self._counted()
        else:
            self.data_received(bytes(INBOX[:nbytes]))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.mode == b"ECHO":
            self.transport.write(data)
        elif self.mode == b"HTTP":
            self._http(data)
        elif self.mode == b"SOURCE":
            pass  # nothing more is expected from a SOURCE client
        else:
            self._choose(self.buffer + data)

    def _choose(self, data: bytes) -> None:
        assert self.transport is not None
        if data.startswith((b"GET ", b"HEAD ", b"POST ")):
            self.mode, self.buffer = b"HTTP", b""
            self._http(data)
            return
        line, newline, rest = data.partition(b"\n")
        if not newline:
            self.buffer = data
            if len(data) > 64:
                self.transport.close()
            return
        self.buffer = b""
        if line == b"SINK":
            self.mode, self.count = b"SINK", len(rest)
        elif line.startswith(b"SINK ") and line[5:].isdigit():
            self.mode, self.count, self.expected = b"SINK", len(rest), int(line[5:])
            self._counted()
        elif line == b"ECHO":
            self.mode = b"ECHO"
            if rest:
                self.transport.write(rest)
        elif line.startswith(b"SOURCE ") and line[7:].isdigit():
            self.mode, self.remaining = b"SOURCE", int(line[7:])
            self._send_more()
        else:
            self.transport.write(b"unknown service\n")
            self.transport.close()

    def _counted(self) -> None:
        assert self.transport is not None
        if 0 <= self.expected <= self.count:
            self.transport.write(b"%d\n" % self.count)
            self.expected = -1

    def _http(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer + data if self.buffer else data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head, buffer = buffer[:end].lower(), buffer[end + 4 :]
            # HTTP/1.1 keeps the connection unless told otherwise; HTTP/1.0 (ab) closes unless asked to keep it.
            if head.split(b"\r\n", 1)[0].endswith(b"http/1.0"):
                keep = b"connection: keep-alive" in head
            else:
                keep = b"connection: close" not in head
            if keep:
                self.transport.write(HEAD_KEEP_ALIVE + PAGE)
            else:
                self.transport.write(HEAD_CLOSE + PAGE)
                self.transport.close()  # close() still sends what is buffered
                return
        if len(buffer) > MAX_HEAD:
            self.transport.close()
        self.buffer = buffer

    def _send_more(self) -> None:
        assert self.transport is not None
        # Write until the transport says its buffer is full (pause_writing), then
        # wait for resume_writing: backpressure, so memory stays flat.
        while self.remaining > 0 and not self.paused:
            size = min(self.remaining, len(BLOCK))
            self.transport.write(BLOCK[:size])
            self.remaining -= size
        if self.remaining == 0:
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == b"SOURCE":
            self._send_more()

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.mode == b"SINK":
            self.transport.write(b"%d\n" % self.count)
        self.transport.close()
        return True


async def serve(host: str, port: int, context: ssl.SSLContext | None = None) -> None:
    """Listen, log the real address, serve until cancelled; over TLS with `context`."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Origin, host, port, backlog=4096, ssl=context)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    log.info("origin port listening on %s:%d", bound_host, bound_port)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Command line: python -m bench.origin [--host H] [--port P] [--cert FILE --key FILE]."""
    parser = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", help="speak TLS with this certificate chain (PEM)")
    parser.add_argument("--key", help="its private key (PEM)")
    args = parser.parse_args()
    context = None
    if args.cert or args.key:
        if not (args.cert and args.key):
            parser.error("--cert and --key go together")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, context))


if __name__ == "__main__":
    main()
