"""Stage 13: limits: descriptors, timeouts and bounds, so that no user can take the tunnel from the others.

Layout (new in stage 13: limits.py; relay.py gains the idle and half-closed timeouts):

- `protocol.py`: the handshake's text lines (`hello`, `challenge`, `auth`, `welcome`); every
  timeout and limit, in one place.
- `auth.py`: with a secret, an HMAC challenge-response that proves the client knows the secret
  without sending it.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST,
  WINDOW, PING, GO_AWAY), and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, sent in turns, each with its window.
- `relay.py`: `Stream`, one user's TCP connection (or the local app's) joined to one stream,
  with flow control both ways and the idle and half-closed timeouts.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `session.py`: the server's side of the tunnel connection: one client at a time, a reconnecting
  client resumes its session at once, a silent one is dropped.
- `pages.py`: the 502/503/504 pages an HTTP user gets when the tunnel can't serve them, and the
  request log's summary of each request.
- `limits.py`: the descriptor limit, and accept loops with slots.
- `server.py`: the control and public ports; `python3 -m stage_13.server` runs it.
- `backoff.py`, `cli.py`: the wait between reconnect attempts; the command lines' argument types.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection up and relays every stream to the local app;
  `python3 -m stage_13.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_13` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
