"""Stage 0: a client-side proxy, the smallest piece of a tunnel.

Layout:

- `relay.py`: the byte pump that copies two TCP connections into each other.
- `client.py`: listens on a local port and relays every connection to a target;
  `python3 -m stage_0.client TARGET` runs it.
"""
