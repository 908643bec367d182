"""Stage 4: frames and a handshake: after `hello` / `welcome`, the control connection speaks binary frames.

Layout (new in stage 4: frames.py, mux.py, session.py; gone: stage 3's `ping` / `pong` and `create_proxy` lines):

- `protocol.py`: the handshake's text lines (`hello`, `welcome`) and the proxy connection's
  (`proxy <id>`); the timeouts and limits.
- `frames.py`: after the handshake, binary frames with a 10-byte header (DATA with SYN), and
  `Parser`, the only code that turns bytes into frames.
- `mux.py`: both ends of the control connection after the handshake: the streams the server opens
  on it, one SYN frame per user, numbered 1, 2, 3...
- `relay.py`: the byte pump from stage 0, used on both sides of the tunnel.
- `pairing.py`: gives each user a fresh id and joins it to exactly the proxy connection that
  names that id (never "the next one to arrive").
- `session.py`: the server's side of the control connection: the handshake, one client at a time.
- `server.py`: the control, public and proxy ports; relays each user through its proxy
  connection; `python3 -m stage_4.server` runs it.
- `client.py`: keeps the control connection and, for every stream the server opens, dials the
  local app (the private connection) and a proxy connection, and relays one into the other;
  `python3 -m stage_4.client LOCAL [SERVER]` runs it.
- `pages.py`: the 502 page a user gets when the local app can't be reached.
- `demo_app.py` and `__main__.py`: `python3 -m stage_4` runs a demo app, the server and the
  client on this machine and prints the public URL.
"""
