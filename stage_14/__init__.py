"""Stage 14: many clients on one server, each with a tunnel of its own: the public port, or a TCP port.

Layout (new in stage 14: tunnels.py):

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
- `tunnels.py`: who holds the public port and which TCP port; the TCP tunnels' ports.
- `session.py`: the server's side of each client's connection: admit, resume, keep for a while, expire.
- `pages.py`: the 502/503/504 pages an HTTP user gets when the tunnel can't serve them, and the
  request log's summary of each request.
- `limits.py`: the descriptor limit, and accept loops with slots shared by every port of the users.
- `server.py`: the control port, the public port, the TCP tunnels' users; `python3 -m stage_14.server`.
- `backoff.py`, `cli.py`: the wait between reconnect attempts; the command lines' argument types.
- `private.py`: the client's side of one user: the private connection to the local app.
- `client.py`: keeps the tunnel connection up and relays every stream to the local app;
  `python3 -m stage_14.client LOCAL [SERVER] [--tcp]` runs it.
- `demo_app.py` and `__main__.py`: `python3 -m stage_14` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
