"""Stage 8: streams over one connection: every user a framed stream in the client's one connection.

Layout (new in stage 8: frames.py, mux.py, session.py, private.py; gone: stage 3's pairing.py and its proxy port):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`); the timeouts and limits.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST),
  and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection.
- `relay.py`: `Stream`, one user's TCP connection (or the local app's) joined to one stream.
- `session.py`: the server's side of the tunnel connection: one client at a time.
- `pages.py`: the 502 page an HTTP user gets when the local app can't be reached.
- `server.py`: the control and public ports; `python3 -m stage_8.server` runs it.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection and relays every stream to the local app;
  `python3 -m stage_8.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_8` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
