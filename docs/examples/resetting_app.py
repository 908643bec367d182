"""A local app that crashes halfway through every answer: half a page, then a TCP reset.

`python3 docs/examples/resetting_app.py` listens on 127.0.0.1:8000. Stages 5 and 6 show what a
user of the tunnel sees: a clean end (stage 5, whose streams end only with FIN) or a reset.
"""

import contextlib
import socket
import struct

# SO_LINGER on, 0 seconds: close() then discards what is unsent and sends a reset (RST), as the
# kernel does for a process that crashed, instead of a clean end (FIN).
LINGER_0 = struct.pack("ii", 1, 0)


def main() -> None:
    with socket.create_server(("127.0.0.1", 8000)) as server:
        print("resetting app listening on 127.0.0.1:8000", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.recv(64 * 1024)  # the request
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\npartial")  # no length: the end says where it ends
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop quietly
        main()
