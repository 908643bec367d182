"""The server side of the tunnel connection: who holds the tunnel, and is it still alive?

Stage 3's control connection, which now carries everything: after the handshake, this module
runs a Mux on it (mux.py), and the server opens a stream on it for each user.

- Auth: only a client that knows the secret gets in (the handshake is in auth.py).
- One tunnel, never locked out: a second client is refused while one is connected, but the
  *same* client coming back (it presents the session id we gave it) takes over at once. Its
  old connection may still look alive to us: a laptop whose Wi-Fi dropped sends no FIN.
- Heartbeats: a tunnel connection silent for longer than the heartbeat timeout is dead.
  Dropping it frees the tunnel, and the users waiting for it get an error page, not a hang.
  Users whose streams ran on it lose their connections: with one connection for everything,
  nothing of a user survives that connection (stage 3's proxy connections did).
"""

import asyncio
import logging
import secrets
from dataclasses import dataclass

from . import auth
from .mux import Mux
from .protocol import (
    HEARTBEAT_TIMEOUT,
    NETWORK_TIMEOUT,
    Hello,
    Refused,
    TunnelError,
    Welcome,
    say_goodbye,
    write_message,
)

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The client that holds the tunnel: its session id, and the tunnel connection it uses now."""

    session_id: str
    peer: str
    writer: asyncio.StreamWriter
    task: asyncio.Task[None]  # the task that reads that connection
    mux: Mux | None = None  # its streams, once the handshake is done


class Sessions:
    """Admits clients on the control port, one session at a time, and drops a session that goes silent."""

    def __init__(
        self,
        secret: str | None = None,
        handshake_timeout: float = NETWORK_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self.secret = secret or None  # an empty secret would be no secret at all
        self.handshake_timeout = handshake_timeout
        self.heartbeat_timeout = heartbeat_timeout
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
            hello = await auth.server_handshake(reader, writer, self.secret, self.handshake_timeout)
            session = self._admit(hello, peer, writer)
            # The welcome is the last line: from here on, both sides speak frames (frames.py).
            mux = Mux(reader, writer, peer="the client", heartbeat_timeout=self.heartbeat_timeout)
            await write_message(writer, Welcome(session.session_id))
            session.mux = mux
            await mux.run()  # until the client leaves, falls silent or breaks the protocol
        except TunnelError as exc:  # a wrong secret, a second client, a bad frame
            # Tell the peer what went wrong, then hang up: a confused peer must
            # not be able to keep a connection (and its buffer) alive.
            log.warning("%s: %s; closing", peer, exc)
            await self._goodbye(reader, writer, mux, str(exc))
        except TimeoutError:
            silence = f"no heartbeat for {self.heartbeat_timeout:g}s" if mux else "no handshake in time"
            log.warning("%s: %s; closing", peer, silence)
            await self._goodbye(reader, writer, mux, silence)
        except OSError as exc:
            log.info("%s: connection lost (%s)", peer, exc)
        finally:
            if mux is not None:
                mux.close("the tunnel client disconnected")  # its users get a page or a reset
            # Free the tunnel, unless a reconnect of the same client took this session over.
            if session is not None and session.writer is writer:
                self.current = None
                log.info("%s: tunnel connection closed; the tunnel is free", peer)
            writer.close()

    def _admit(self, hello: Hello, peer: str, writer: asyncio.StreamWriter) -> Session:
        """Give the tunnel to this connection, or raise Refused if another client holds it."""
        task = asyncio.current_task()
        assert task is not None
        current = self.current
        if current is None:
            # 128 random bits: a session id is a key to the tunnel, so it must not be guessable.
            self.current = Session(secrets.token_hex(16), peer, writer, task)
            log.info("%s: client connected (session %s)", peer, self.current.session_id[:8])
            return self.current
        # compare_digest, as in auth.py: no timing hints about a secret id.
        if hello.session_id is None or not secrets.compare_digest(hello.session_id, current.session_id):
            raise Refused("another client is already connected to this server")
        # The same client is back, so its old connection is dead, whatever TCP thinks:
        # switch at once instead of making it wait for the heartbeat timeout.
        log.info(
            "%s: client resumed session %s; dropping its old connection %s", peer, hello.session_id[:8], current.peer
        )
        old_task = current.task
        current.peer, current.writer, current.task, current.mux = peer, writer, task, None
        old_task.cancel()  # its users' streams end with it: they ran on the old connection
        return current

    @staticmethod
    async def _goodbye(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mux: Mux | None, reason: str
    ) -> None:
        # Before the welcome, a peer reads lines (`error <reason>`); after it, frames (GO_AWAY).
        if mux is None:
            await say_goodbye(reader, writer, reason)
        else:
            await mux.goodbye(reason)
