"""A handshake in lines with streams, then the same connection handed to a Protocol.

`python3 docs/examples/asyncio_set_protocol.py` runs a server and a client that speaks to it.
"""

import asyncio


class Frames(asyncio.Protocol):
    def __init__(self, transport: asyncio.Transport, done: asyncio.Future[None]) -> None:
        self.transport, self.done = transport, done  # set_protocol does not call connection_made

    def data_received(self, data: bytes) -> None:
        print("protocol got", data)

    def eof_received(self) -> bool | None:
        self.done.set_result(None)
        return None  # close the transport


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    print("handshake:", await reader.readline())  # lines, with streams
    writer.write(b"welcome\n")
    await writer.drain()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    transport = writer.transport
    assert isinstance(transport, asyncio.Transport)
    transport.set_protocol(Frames(transport, done))  # from here on, the loop calls Frames
    await done


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello\n")
    print(await reader.readline())  # the welcome: only now does the server switch
    writer.write(b"\x00\x01frame bytes")
    writer.write_eof()
    await reader.read()  # until the server closes
    writer.close()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
