"""An echo server on asyncio Protocols, with backpressure.

`python3 docs/examples/asyncio_echo.py`, then `nc 127.0.0.1 8007` in another terminal.
"""

import asyncio


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # never blocks: the bytes wait in the transport's buffer

    def pause_writing(self) -> None:  # the buffer passed its high-water mark: the peer reads slowly
        self.transport.pause_reading()  # so stop taking more from it

    def resume_writing(self) -> None:  # the buffer drained to its low-water mark
        self.transport.resume_reading()


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 8007)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
