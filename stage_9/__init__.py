"""Stage 9: flow control and fair turns: every stream has a window, and the streams take turns.

Layout (new in stage 9: budget.py; stage 8's streams each get a window, and take turns):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`) and the two sides of it; the
  ports and timeouts, in one place.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST,
  WINDOW), and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, sent in turns, each with its window.
- `relay.py`: `Stream`, one user's TCP connection (or the local app's) joined to one stream,
  with flow control both ways.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `session.py`: the server's side of the tunnel connection: one client at a time.
- `pages.py`: the 502 page an HTTP user gets when the tunnel can't serve them.
- `server.py`: the control and public ports; `python3 -m stage_9.server` runs it.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection and relays every stream to the local app;
  `python3 -m stage_9.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_9` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
