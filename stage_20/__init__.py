"""Stage 20: forwarded headers and a guarded tunnel: the app learns who asked, and the server keeps strangers out.

Stage 19's tunnel and inspector. New in stage 20 (forwarding.py): the server frames every request of
an HTTP user's connection and adds X-Forwarded-For, -Proto and -Host to its head (unless the client
says --no-forwarded-headers); a later request for another tunnel gets a 421; an HTTP/2 client gets
an answer it can read; and the client's --basic-auth, --allow-cidr and --deny-cidr (its hello's
Policy, protocol.py) are enforced at the server, so refused users never reach the client.

- `protocol.py`: the handshake's text lines (`hello http myapp`, `welcome ...`); every timeout and limit.
- `tls.py`: the TLS contexts: the server's certificate, and what the client trusts (always checked).
- `certs.py`: `python3 -m stage_20.certs DIR` makes a private CA and a server certificate (with openssl).
- `auth.py`: the HMAC challenge-response that proves the client knows the secret, inside TLS.
- `frames.py`, `mux.py`: stage 8's frames and multiplexer: every user a stream in the client's connection.
- `relay.py`: one user's TCP connection joined to its stream, with flow control.
- `budget.py`: the memory budget: every stream's window counted in one stated total.
- `tunnels.py`: who holds which name and which TCP port; the TCP tunnels' ports.
- `session.py`: the server's side of each client's connection: admit, resume, keep for a while, expire.
- `routing.py`: reads an HTTP user's request head and finds the tunnel its Host header names.
- `forwarding.py`: every request routed, guarded (basic auth, CIDR rules) and given X-Forwarded-* on its way.
- `pages.py`: the 400/401/403/404/408/421/431/502/503/504 pages, and the request log's summary.
- `limits.py`: the descriptor limit, accept loops with slots, and TLS only for so many strangers at once.
- `server.py`: the control port, the public port (HTTP or HTTPS), the TCP tunnels' users; `python3 -m stage_20.server`.
- `backoff.py`, `private.py`, `client.py`: the client; `python3 -m stage_20.client LOCAL [SERVER] --name NAME`.
- `observe.py`: HTTP/1.1 parsed by hand from a copy of the relayed bytes, never in their way.
- `capture.py`: the log line and the ring of the last exchanges (bounded in count and bytes); replay.
- `inspector.py`, `inspector.html`: the page at http://127.0.0.1:4040: the list, live (server-sent events).
- `demo_app.py` and `__main__.py`: `python3 -m stage_20` runs two named tunnels and an inspector on this machine.
"""
