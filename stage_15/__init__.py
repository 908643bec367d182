"""Stage 15: many tunnels on one server, by name or by TCP port.

Layout (new in stage 15: routing.py; tunnels.py now holds names too):

- `protocol.py`: the handshake's text lines (`hello http myapp`, `welcome ...`); every timeout and limit.
- `auth.py`: the HMAC challenge-response that proves the client knows the secret.
- `frames.py`, `mux.py`: stage 8's frames and multiplexer: every user a stream in the client's connection.
- `relay.py`: one user's TCP connection joined to its stream, with flow control.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `tunnels.py`: who holds which name and which TCP port; the TCP tunnels' ports.
- `session.py`: the server's side of each client's connection: admit, resume, keep for a while, expire.
- `routing.py`: reads an HTTP user's request head and finds the tunnel its Host header names.
- `pages.py`: the 400/404/408/431/502/503/504 pages, and the request log's summary.
- `limits.py`: the descriptor limit, and accept loops with slots shared by every port of the users.
- `server.py`: the control port, the public port, the TCP tunnels' users; `python3 -m stage_15.server`.
- `backoff.py`, `private.py`, `client.py`: the client; `python3 -m stage_15.client LOCAL [SERVER] --name NAME`.
- `demo_app.py` and `__main__.py`: `python3 -m stage_15` runs two named tunnels on this machine.
"""
