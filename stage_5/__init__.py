"""Stage 5: streams over one connection: every user a framed stream in the client's one connection, on tasks.

Layout (new in stage 5: DATA and FIN, the Mux's streams, relay.Stream; gone: stage 4's pairing.py and its proxy port):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`); the timeouts and limits.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/FIN), and
  `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, read in a loop (`Mux.run`).
- `relay.py`: the byte pump from stage 0, used on both sides of the tunnel, and `Stream`: a stream
  that reads and writes like a TCP connection, so the pump relays it unchanged.
- `session.py`: the server's side of the control connection: the handshake, one client at a time.
- `server.py`: the control and public ports; `python3 -m stage_5.server` runs it.
- `client.py`: keeps the tunnel connection and relays every stream to the local app;
  `python3 -m stage_5.client LOCAL [SERVER]` runs it.
- `pages.py`: the 502 page a user gets when the local app can't be reached.
- `demo_app.py` and `__main__.py`: `python3 -m stage_5` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
