"""Stage 6: a stream's answer and its reset: the client accepts (ACK) or refuses (RST) each stream, on tasks.

Layout (new in stage 6: the ACK and RST flags, the server's 502 page and its wait for the answer; nothing gone):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`); the timeouts and limits.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST),
  and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, read in a loop (`Mux.run`).
- `relay.py`: `Stream`, one user's TCP connection (or the local app's) joined to one stream with
  stage 0's pump (`await read()`, `write()`, `await drain()`); stage 7 puts it on callbacks.
- `session.py`: the server's side of the tunnel connection: one client at a time.
- `pages.py`: the 502 page an HTTP user gets when the local app can't be reached, from the server.
- `server.py`: the control and public ports; `python3 -m stage_6.server` runs it.
- `client.py`: keeps the tunnel connection and relays every stream to the local app;
  `python3 -m stage_6.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_6` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
