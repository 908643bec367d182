"""Stage 7: the data path on callbacks: stage 6's streams, with asyncio Protocols instead of a task per direction.

Layout (nothing new or gone since stage 6: `relay.Stream` and the `Mux` become asyncio Protocols):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`); the timeouts and limits.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST),
  and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, the connection's Protocol after the handshake.
- `relay.py`: `Stream`, a Protocol: one user's TCP connection (or the local app's) joined to one stream.
- `session.py`: the server's side of the tunnel connection: one client at a time.
- `pages.py`: the 502 page an HTTP user gets when the local app can't be reached.
- `server.py`: the control and public ports; `python3 -m stage_7.server` runs it.
- `client.py`: keeps the tunnel connection and relays every stream to the local app;
  `python3 -m stage_7.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_7` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
