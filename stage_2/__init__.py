"""Stage 2: public and proxy connections; the client echoes what users send.

Layout:

- `protocol.py`: the wire format: stage 1's messages plus `create_proxy <id>` and `proxy <id>`.
- `relay.py`: the byte pump from stage 0, now joining a public connection to its proxy connection.
- `pairing.py`: gives each user a fresh id and joins it to exactly the proxy connection that
  names that id (never "the next one to arrive").
- `server.py`: the control, public and proxy ports; relays each user through its proxy
  connection; `python3 -m stage_2.server` runs it.
- `client.py`: keeps the control connection, dials a proxy connection for every
  `create_proxy` and echoes each line back (`stop` ends a session); `python3 -m stage_2.client` runs it.
"""
