"""Stage 21: TLS tunnels by SNI: the server routes a user's TLS by the name in its ClientHello, unread.

Stage 20's tunnels and inspector, and a third port on the server: a TLS user's ClientHello names the
host it wants (SNI), in the clear; the server reads that name (sni.py, by hand, sans I/O), finds the
TLS tunnel that holds it (a client started with `--tls NAME`) and relays the raw bytes. The local
app terminates TLS with its own certificate: HTTP/2, gRPC and client certificates work end to end,
and the server never holds the app's key. The inspector lists each such connection, and no more.

- `protocol.py`: the handshake's text lines (`hello http myapp`, `welcome ...`); every timeout and limit.
- `tls.py`: the TLS contexts: the server's certificate, and what the client trusts (always checked).
- `certs.py`: `python3 -m stage_21.certs DIR` makes a private CA and a server certificate (with openssl).
- `auth.py`: the HMAC challenge-response that proves the client knows the secret, inside TLS.
- `frames.py`, `mux.py`: stage 8's frames and multiplexer: every user a stream in the client's connection.
- `relay.py`: one user's TCP connection joined to its stream, with flow control.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `tunnels.py`: who holds which name and which TCP port; the TCP tunnels' ports.
- `session.py`: the server's side of each client's connection: admit, resume, keep for a while, expire.
- `routing.py`: reads an HTTP user's request head and finds the tunnel its Host header names.
- `forwarding.py`: every request routed, guarded (basic auth, CIDR rules) and given X-Forwarded-* on its way.
- `sni.py`, `passthrough.py`: the ClientHello's server name, and the TLS port that routes by it (alerts if none).
- `pages.py`: the 400/401/403/404/408/421/431/502/503/504 pages, and the request log's summary.
- `limits.py`: the descriptor limit, accept loops with slots, and TLS only for so many strangers at once.
- `server.py`: the control port, the public port (HTTP or HTTPS), the TCP tunnels' users; `python3 -m stage_21.server`.
- `backoff.py`, `private.py`, `client.py`: the client; `python3 -m stage_21.client LOCAL [SERVER] --name NAME`.
- `observe.py`: HTTP/1.1 parsed by hand from a copy of the relayed bytes, never in their way.
- `capture.py`: the log line and the ring of the last exchanges (bounded in count and bytes); replay.
- `inspector.py`, `inspector.html`: the page at http://127.0.0.1:4040: the list, live (server-sent events).
- `demo_app.py` and `__main__.py`: `python3 -m stage_21` runs two named tunnels and an inspector on this machine.
"""
