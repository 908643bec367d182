"""Stage 3: the private connection: the client relays each user to the local app. The whole tunnel.

Layout:

- `protocol.py`: the wire format, stage 2's unchanged: `ping`/`pong`, `create_proxy <id>`, `proxy <id>`.
- `relay.py`: the byte pump from stage 0, now used on both sides of the tunnel.
- `pairing.py`: gives each user a fresh id and joins it to exactly the proxy connection that
  names that id (never "the next one to arrive").
- `server.py`: the control, public and proxy ports; relays each user through its proxy
  connection; `python3 -m stage_3.server` runs it (stage 2's server, unchanged).
- `client.py`: keeps the control connection and, for every `create_proxy`, dials the local
  app (the private connection) and a proxy connection, and relays one into the other;
  `python3 -m stage_3.client LOCAL [SERVER]` runs it.
- `pages.py`: the 502 page a user gets when the local app can't be reached.
- `demo_app.py` and `__main__.py`: `python3 -m stage_3` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
