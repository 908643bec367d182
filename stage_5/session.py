"""The server side of the tunnel connection: who holds the tunnel.

Stage 3's control connection, which now carries everything: after the handshake, this module
runs a Mux on it (mux.py), and the server opens a stream on it for each user.

- One tunnel: a second client is refused while one is connected.
- Users whose streams ran on the tunnel connection lose their connections with it: with one
  connection for everything, nothing of a user survives that connection (stage 3's proxy
  connections did).
"""

import asyncio
import logging
from dataclasses import dataclass

from .mux import Mux
from .protocol import NETWORK_TIMEOUT, Refused, TunnelError, Welcome, say_goodbye, server_handshake, write_message

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The client that holds the tunnel, and its tunnel connection."""

    peer: str
    writer: asyncio.StreamWriter
    mux: Mux | None = None  # its streams, once the handshake is done


class Sessions:
    """Admits clients on the control port, one session at a time."""

    def __init__(self, handshake_timeout: float = NETWORK_TIMEOUT) -> None:
        self.handshake_timeout = handshake_timeout
        self.current: Session | None = None

    @property
    def mux(self) -> Mux | None:
        """The current client's connection, to open users' streams on; None while no client holds the tunnel."""
        return self.current.mux if self.current is not None else None

    async def handle_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One control connection, from handshake to close: the task the control port spawns."""
        host, port = writer.get_extra_info("peername")[:2]
        peer, session, mux = f"{host}:{port}", None, None
        try:
            await server_handshake(reader, self.handshake_timeout)
            session = self._admit(peer, writer)
            # The welcome is the last line: from here on, both sides speak frames (frames.py).
            mux = Mux(reader, writer, peer="the client")
            await write_message(writer, Welcome())
            session.mux = mux
            await mux.run()  # until the client leaves or breaks the protocol
        except TunnelError as exc:  # a second client, a bad frame
            # Tell the peer what went wrong, then hang up: a confused peer must
            # not be able to keep a connection (and its buffer) alive.
            log.warning("%s: %s; closing", peer, exc)
            await self._goodbye(reader, writer, mux, str(exc))
        except TimeoutError:
            log.warning("%s: no handshake in time; closing", peer)
            await self._goodbye(reader, writer, mux, "no handshake in time")
        except OSError as exc:
            log.info("%s: connection lost (%s)", peer, exc)
        finally:
            if mux is not None:
                mux.close("the tunnel client disconnected")  # its users see their connections end
            if session is not None and session.writer is writer:
                self.current = None
                log.info("%s: tunnel connection closed; the tunnel is free", peer)
            writer.close()

    def _admit(self, peer: str, writer: asyncio.StreamWriter) -> Session:
        """Give the tunnel to this connection, or raise Refused if another client holds it."""
        if self.current is not None:
            raise Refused("another client is already connected to this server")
        self.current = Session(peer, writer)
        log.info("%s: client connected", peer)
        return self.current

    @staticmethod
    async def _goodbye(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mux: Mux | None, reason: str
    ) -> None:
        # Before the welcome, a peer reads lines (`error <reason>`); after it, frames: it sees the close.
        if mux is None:
            await say_goodbye(reader, writer, reason)
