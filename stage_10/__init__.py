"""Stage 10: heartbeats, reconnect and resume: a tunnel that outlives a sleeping laptop or a lost Wi-Fi.

Layout (new in stage 10: backoff.py, cli.py; PING and GO_AWAY frames, and a session a client can resume):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`) and the two sides of it; the
  ports and timeouts, in one place.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST,
  WINDOW, PING, GO_AWAY), and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, sent in turns, each with its window.
- `relay.py`: `Stream`, one user's TCP connection (or the local app's) joined to one stream,
  with flow control both ways.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `session.py`: the server's side of the tunnel connection: one client at a time, a reconnecting
  client resumes its session at once, a silent one is dropped.
- `pages.py`: the 502 page an HTTP user gets when the tunnel can't serve them.
- `server.py`: the control and public ports; `python3 -m stage_10.server` runs it.
- `backoff.py`, `cli.py`: the wait between reconnect attempts; the command lines' argument types.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection up and relays every stream to the local app;
  `python3 -m stage_10.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_10` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
