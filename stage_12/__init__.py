"""Stage 12: error pages and the request log: every failure named to the user, one log line per request.

Layout (no new module in stage 12: pages.py gains the 503/504 pages and the log line; the settings become objects):

- `protocol.py`: the handshake's text lines (`hello`, `challenge`, `auth`, `welcome`); the ports
  and timeouts, in one place.
- `auth.py`: with a secret, an HMAC challenge-response that proves the client knows the secret
  without sending it.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN/ACK/FIN/RST,
  WINDOW, PING, GO_AWAY), and `Parser`, the only code that turns bytes into frames.
- `mux.py`: the multiplexer: many streams over one connection, sent in turns, each with its window.
- `relay.py`: `Stream`, one user's TCP connection (or the local app's) joined to one stream,
  with flow control both ways.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `session.py`: the server's side of the tunnel connection: one client at a time, a reconnecting
  client resumes its session at once, a silent one is dropped.
- `pages.py`: the 502/503/504 pages an HTTP user gets when the tunnel can't serve them, and the
  request log's summary of each request.
- `server.py`: the control and public ports; `python3 -m stage_12.server` runs it.
- `backoff.py`, `cli.py`: the wait between reconnect attempts; the command lines' argument types.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection up and relays every stream to the local app;
  `python3 -m stage_12.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_12` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
