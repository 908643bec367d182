"""Stage 17: the observer: the client finds each HTTP request in the bytes it relays, and logs it.

Layout (new in stage 17: observe.py and capture.py, the client's observer of the HTTP it relays):

- `protocol.py`: the handshake's text lines (`hello http myapp`, `welcome ...`); every timeout and limit.
- `tls.py`: the TLS contexts: the server's certificate, and what the client trusts (always checked).
- `certs.py`: `python3 -m stage_17.certs DIR` makes a private CA and a server certificate (with openssl).
- `auth.py`: the HMAC challenge-response that proves the client knows the secret, inside TLS.
- `frames.py`, `mux.py`: stage 8's frames and multiplexer: every user a stream in the client's connection.
- `relay.py`: one user's TCP connection joined to its stream, with flow control.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `tunnels.py`: who holds which name and which TCP port; the TCP tunnels' ports.
- `session.py`: the server's side of each client's connection: admit, resume, keep for a while, expire.
- `routing.py`: reads an HTTP user's request head and finds the tunnel its Host header names.
- `pages.py`: the 400/404/408/431/502/503/504 pages, and the request log's summary.
- `limits.py`: the descriptor limit, accept loops with slots, and TLS only for so many strangers at once.
- `server.py`: the control port, the public port (HTTP or HTTPS), the TCP tunnels' users; `python3 -m stage_17.server`.
- `backoff.py`, `private.py`, `client.py`: the client; `python3 -m stage_17.client LOCAL [SERVER] --name NAME`.
- `observe.py`: HTTP/1.1 parsed by hand from a copy of the relayed bytes, never in their way.
- `capture.py`: the streams that show their bytes to an observer, and a log line for each exchange.
- `demo_app.py` and `__main__.py`: `python3 -m stage_17` runs two named tunnels on this machine, and logs each request.
"""
