"""A BufferedProtocol that reads into one reused buffer: `python3 docs/examples/asyncio_buffered.py`."""

import asyncio

SCRATCH = memoryview(bytearray(64 * 1024))  # one buffer, reused for every read


class Counter(asyncio.BufferedProtocol):
    def __init__(self, done: asyncio.Future[int]) -> None:
        self.total, self.done = 0, done

    def get_buffer(self, sizehint: int) -> memoryview:
        return SCRATCH  # the loop reads into this: no new bytes object per read

    def buffer_updated(self, nbytes: int) -> None:
        chunk = SCRATCH[:nbytes]  # a view, not a copy: valid only until the next read
        self.total += len(chunk)

    def eof_received(self) -> bool | None:
        self.done.set_result(self.total)
        return None  # close the transport


async def main() -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    server = await loop.create_server(lambda: Counter(done), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x" * 1_000_000)
    writer.write_eof()
    print(await done, "bytes")
    writer.close()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
