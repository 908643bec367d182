"""Stage 22: speed: the tunnel on uvloop when it is installed, and a cheaper new connection.

Stage 21's tunnels and inspector. New in stage 22: `--loop uvloop|asyncio|auto` on every program
(loops.py), code that relies only on asyncio's API and never on a loop's concrete classes, a reset
that libuv reports as an EOF kept a reset (relay.py), and fewer timers, futures, turns of the loop
and log costs on the path of each new connection (server.py, private.py, budget.py, loops.py).

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
- `forwarding.py`: every request routed, guarded (basic auth, CIDR rules) and given X-Forwarded-* on its way.
- `sni.py`, `passthrough.py`: the ClientHello's server name, and the TLS port that routes by it (alerts if none).
- `pages.py`: the 400/401/403/404/408/421/431/502/503/504 pages, and the request log's summary.
- `limits.py`: the descriptor limit, accept loops with slots, and TLS only for so many strangers at once.
- `server.py`: the control port, the public port (HTTP or HTTPS), the TCP tunnels' users; `python3 -m stage_22.server`.
- `backoff.py`, `private.py`, `client.py`: the client; `python3 -m stage_22.client LOCAL [SERVER] --name NAME`.
- `observe.py`: HTTP/1.1 parsed by hand from a copy of the relayed bytes, never in their way.
- `capture.py`: the log line and the ring of the last exchanges (bounded in count and bytes); replay.
- `inspector.py`, `inspector.html`: the page at http://127.0.0.1:4040: the list, live (server-sent events).
- `loops.py`: `--loop`, the event loop's factory and runner, the log written once per turn.
- `demo_app.py` and `__main__.py`: `python3 -m stage_22` runs two named tunnels and an inspector on this machine.
"""
