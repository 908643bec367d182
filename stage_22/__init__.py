"""Stage 22: the inspector, live and with replay: each request shows up as it happens, and can be sent again.

Stage 16's tunnel (many tunnels on one server, by name or TCP port, over TLS); in the client, stage
17's observer of the HTTP it relays and stage 18's page that lists it. New in stage 22: the page's
live feed (server-sent events) and replay (capture.py, inspector.py, inspector.html); the SYN frame
names the user's address; the observer follows what live traffic also holds (observe.py): bodies
that last until the connection closes, 1xx responses and protocol switches (WebSocket, CONNECT),
garbage refused at its first byte, and a fast path for the usual small message.

- `protocol.py`: the handshake's text lines (`hello http myapp`, `welcome ...`); every timeout and limit.
- `tls.py`: the TLS contexts: the server's certificate, and what the client trusts (always checked).
- `certs.py`: `python3 -m stage_22.certs DIR` makes a private CA and a server certificate (with openssl).
- `auth.py`: the HMAC challenge-response that proves the client knows the secret, inside TLS.
- `frames.py`, `mux.py`: stage 8's frames and multiplexer: every user a stream in the client's connection.
- `relay.py`: one user's TCP connection joined to its stream, with flow control.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `tunnels.py`: who holds which name and which TCP port; the TCP tunnels' ports.
- `session.py`: the server's side of each client's connection: admit, resume, keep for a while, expire.
- `routing.py`: reads an HTTP user's request head and finds the tunnel its Host header names.
- `pages.py`: the 400/404/408/431/502/503/504 pages, and the request log's summary.
- `limits.py`: the descriptor limit, accept loops with slots, and TLS only for so many strangers at once.
- `server.py`: the control port, the public port (HTTP or HTTPS), the TCP tunnels' users; `python3 -m stage_22.server`.
- `backoff.py`, `private.py`, `client.py`: the client; `python3 -m stage_22.client LOCAL [SERVER] --name NAME`.
- `observe.py`: HTTP/1.1 parsed by hand from a copy of the relayed bytes, never in their way.
- `capture.py`: the log line and the ring of the last exchanges (bounded in count and bytes); replay.
- `inspector.py`, `inspector.html`: the page at http://127.0.0.1:4040: the list, live (server-sent events).
- `demo_app.py` and `__main__.py`: `python3 -m stage_22` runs two named tunnels and an inspector on this machine.
"""
