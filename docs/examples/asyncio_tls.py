"""Dial a TLS server whose certificate a private CA signed: `python3 docs/examples/asyncio_tls.py HOST PORT ca.pem`."""

import asyncio
import ssl
import sys


async def dial(host: str, port: int, cafile: str) -> None:
    ctx = ssl.create_default_context(cafile=cafile)  # checks the CA and the host name
    _, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host, ssl_handshake_timeout=5.0)
    print("TLS up:", writer.get_extra_info("ssl_object").version())
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    asyncio.run(dial(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
