"""Stage 7: the private connection to the local app: the real tunnel, hardened for a real server.

Layout:

- `protocol.py`: the wire format: stage 2's messages plus the handshake (`hello`, `challenge`,
  `auth`, `welcome`) and `local_error`; every timeout and limit, in one place.
- `auth.py`: the control handshake; with a secret, an HMAC challenge-response that proves
  the client knows the secret without sending it.
- `relay.py`: the byte pump, now also noting how each direction began (for the request log).
- `pairing.py`: joins each user to the proxy connection that names its id; reports failures.
- `session.py`: the server's side of the control connection: one client at a time, a
  reconnecting client resumes its session at once, a silent one is dropped.
- `pages.py`: the 502/503/504 pages an HTTP user gets when the tunnel can't serve them.
- `server.py`: the control, public and proxy ports; `python -m stage_7.server` runs it.
- `backoff.py`: how long the client waits between reconnect attempts.
- `private.py`: the client's side of one user: the private connection to the local app,
  joined to a proxy connection.
- `client.py`: keeps the control connection up and relays every user to the local app;
  `python -m stage_7.client LOCAL [SERVER]` runs it.
- `demo_app.py` and `__main__.py`: `python -m stage_7` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
