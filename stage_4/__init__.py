"""Stage 4: a tunnel you can leave running: stage 3's tunnel, hardened for a real server and real links.

Layout:

- `protocol.py`: the wire format: stage 3's messages plus the handshake (`hello`, `challenge`,
  `auth`, `welcome`), `ok` on the proxy connection, `local_error` and `proxy_error`; every
  timeout and limit, in one place.
- `auth.py`: the control handshake; with a secret, an HMAC challenge-response that proves
  the client knows the secret without sending it; a throttle on wrong answers.
- `relay.py`: the byte pump, now noting how each direction began (for the request log) and
  closing relays that stay silent too long.
- `limits.py`: file descriptors: the raised limit, and the server's own accept loop that
  stops accepting at the limit instead of spinning.
- `pairing.py`: joins each user to the proxy connection that names its id; reports failures.
- `session.py`: the server's side of the control connection: one client at a time, a
  reconnecting client resumes its session at once, a silent one is dropped.
- `pages.py`: the 502/503/504 pages an HTTP user gets when the tunnel can't serve them, and
  the request log's summary of a connection.
- `server.py`: the control, public and proxy ports; `python -m stage_4.server` runs it.
- `backoff.py`: how long the client waits between reconnect attempts.
- `private.py`: the client's side of one user: the private connection to the local app,
  joined to a proxy connection once the server confirms it.
- `client.py`: keeps the control connection up and relays every user to the local app;
  `python -m stage_4.client LOCAL [SERVER]` runs it.
- `cli.py`: the command lines' argument types: every number is range-checked.
- `demo_app.py` and `__main__.py`: `python -m stage_4` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
