"""Stage 8: the fast paths: stage 7's streams, with four costs a tunnel need not pay measured and taken out.

Layout (new in stage 8: private.py, the client's side of a user, which remembers the local app's address):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`) and the two sides of it; the
  ports and timeouts, in one place.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST),
  and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, the connection's Protocol after the handshake.
- `relay.py`: `Stream`, a Protocol: one user's TCP connection (or the local app's) joined to one stream.
- `session.py`: the server's side of the tunnel connection: one client at a time.
- `pages.py`: the 502 page an HTTP user gets when the tunnel can't serve them.
- `server.py`: the control and public ports; `python3 -m stage_8.server` runs it.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection and relays every stream to the local app;
  `python3 -m stage_8.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_8` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
