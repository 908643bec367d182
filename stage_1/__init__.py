"""Stage 1: a server, a client, and the control connection between them.

Layout:

- `protocol.py`: the wire format: the messages, their exact lines, and how to read and write them.
- `server.py`: accepts control connections and answers every `ping` with `pong`;
  `python3 -m stage_1.server` runs it.
- `client.py`: opens the control connection, sends `ping`s and prints each round trip;
  `python3 -m stage_1.client` runs it.
"""
