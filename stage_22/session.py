"""The server side of the tunnel connections: who holds each tunnel, and is its client still alive?

Stage 3's control connection, which now carries everything: after the handshake, this module
runs a Mux on it (mux.py), and the server opens a stream on it for each user. Stage 13 kept one
client; now every client that connects gets a session of its own, and with it one tunnel
(tunnels.py): the name or TCP port it asked for, if nobody holds it.

- Auth: only a client that knows the secret gets in (auth.py's handshake, inside TLS). An address
  that guessed wrong too often is told `busy`, unless its hello brings the id of a session we hold:
  a stranger behind our client's NAT must not keep our client out.
- Never locked out: the *same* client coming back (it presents the session id and the tunnel we
  gave it) takes its session over at once, from whatever address it comes back from. Its
  old connection may still look alive to us: a laptop whose Wi-Fi dropped sends no FIN.
- Kept for a while: when a client's connection is lost, its tunnel stays reserved for the resume
  window. Its users get a 502 page meanwhile; after the window, the name is anyone's again. A
  client that stops on purpose says goodbye (GO_AWAY), and its name is free at once.
- Shared fairly: one source address holds at most `max_per_address` tunnels, kept ones included,
  so that nobody, with the secret or (on a trusted network) without, can take every name.
- Heartbeats: a tunnel connection silent for longer than the heartbeat timeout is dead.
  Dropping it keeps the tunnel (above), and the users waiting for it get an error page, not a hang.
  Users whose streams ran on it lose their connections: with one connection for everything,
  nothing of a user survives that connection (stage 3's proxy connections did).
"""

import asyncio
import functools
import logging
import secrets
from collections.abc import Callable

from . import auth
from .mux import Mux
from .protocol import (
    HEARTBEAT_TIMEOUT,
    MAX_TUNNELS,
    MAX_TUNNELS_PER_ADDRESS,
    NETWORK_TIMEOUT,
    RESUME_WINDOW,
    AuthError,
    GoneAway,
    Hello,
    Refused,
    TryLater,
    TunnelError,
    Welcome,
    say_goodbye,
    write_message,
)
from .tunnels import Session, Tunnels

log = logging.getLogger(__name__)


class Sessions:
    """Admits clients on the control port, one session each, and keeps a lost client's tunnel for a while."""

    def __init__(
        self,
        tunnels: Tunnels,
        secret: str | None = None,
        handshake_timeout: float = NETWORK_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        resume_window: float = RESUME_WINDOW,
        max_per_address: int = MAX_TUNNELS_PER_ADDRESS,
    ) -> None:
        self.tunnels = tunnels
        self.secret = secret or None  # an empty secret would be no secret at all
        self.handshake_timeout = handshake_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.resume_window = resume_window
        self.max_per_address = max_per_address
        self.by_id: dict[str, Session] = {}
        self.throttle = auth.Throttle()  # slows down anyone guessing the secret

    async def handle_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, admitted: Callable[[], None] = lambda: None
    ) -> None:
        """One control connection, from handshake to close: the task the control port spawns.

        `admitted` is called once the client is in (see limits.Startups: it proved itself).
        """
        host, port = writer.get_extra_info("peername")[:2]
        peer, session, mux, stopped = f"{host}:{port}", None, None, False
        try:
            screen = functools.partial(self._screen, host)  # the throttle, once the hello is read
            hello = await auth.server_handshake(reader, writer, self.secret, self.handshake_timeout, screen)
            session = self._admit(hello, peer, writer)
            # The welcome is the last line: from here on, both sides speak frames (frames.py).
            mux = Mux(reader, writer, peer="the client", heartbeat_timeout=self.heartbeat_timeout)
            await write_message(writer, Welcome(session.session_id, session.tunnel, session.url))
            admitted()
            session.mux = mux
            await mux.run()  # until the client leaves, falls silent or breaks the protocol
        except GoneAway as exc:  # the client stopped (Ctrl-C) and said so: it won't come back for its tunnel
            log.info("%s: %s", peer, exc)
            stopped = True
        except TryLater as exc:  # a throttled address, or one that holds its share: not now, which is not never
            log.warning("%s: %s; told to try later", peer, exc)
            await say_goodbye(reader, writer, str(exc), later=True)
        except TunnelError as exc:  # a wrong secret, a taken name, a bad frame
            if isinstance(exc, AuthError):
                self.throttle.failed(host)
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
            # Keep the tunnel for its client, unless a reconnect of the same client took it over,
            # or the client said goodbye: then its name is free at once.
            if session is not None and session.writer is writer:
                if stopped:
                    self._expire(session)
                else:
                    self._keep(session)
            writer.close()

    def _screen(self, host: str, hello: Hello) -> None:
        """Before the challenge: turn away (TryLater) an address that guessed wrong too often."""
        # ...unless the hello brings the id of a session we hold: its client knew the secret,
        # and must get back in whatever a stranger behind the same address (a NAT) has tried.
        if hello.session_id not in self.by_id:
            self.throttle.check(host)

    def _admit(self, hello: Hello, peer: str, writer: asyncio.StreamWriter) -> Session:
        """Give this connection its session: the one it resumes, or a new one with the tunnel it asks for."""
        task = asyncio.current_task()
        assert task is not None
        current = self.by_id.get(hello.session_id or "")
        # A session id resumes only the tunnel it was given with: it is a key to that one tunnel.
        if current is None or (current.kind, current.tunnel) != (hello.kind, hello.tunnel):
            if len(self.by_id) >= MAX_TUNNELS:
                raise Refused(f"this server holds {MAX_TUNNELS} tunnels, its most; try again later")
            source = auth.source(writer.get_extra_info("peername")[0])
            if sum(held.source == source for held in self.by_id.values()) >= self.max_per_address:
                # TryLater: kept tunnels end with their window, and the address may be a NAT that this
                # client shares with whoever holds them.
                raise TryLater(
                    f"{source} holds {self.max_per_address} tunnels on this server, the most one address may"
                )
            # 128 random bits: a session id is a key to the tunnel, so it must not be guessable.
            session = Session(secrets.token_hex(16), hello.kind, peer=peer, source=source, writer=writer, task=task)
            session.policy = hello.policy  # what its client asks the server to do for its users (forwarding.py)
            self.tunnels.claim(hello, session)  # Refused if its name or port is someone else's
            self.by_id[session.session_id] = session
            log.info("%s: client connected (session %s): %s", peer, session.session_id[:8], session.url)
            return session
        # The same client is back, so its old connection is dead, whatever TCP thinks:
        # switch at once instead of making it wait for the heartbeat timeout.
        log.info("%s: client resumed session %s (%s)", peer, current.session_id[:8], current.url)
        if current.expiry is not None:
            current.expiry.cancel()  # it was kept for its client, who is back
        old_task = current.task
        current.peer, current.writer, current.task, current.mux, current.expiry = peer, writer, task, None, None
        current.policy = hello.policy  # as its client asks now
        if old_task is not None:  # its connection looked alive: end it
            old_task.cancel()  # its users' streams end with it: they ran on the old connection
        return current

    def _keep(self, session: Session) -> None:
        """The session's connection ended: keep its tunnel for the resume window, then free it."""
        session.writer, session.task, session.mux = None, None, None
        if self.by_id.get(session.session_id) is not session:
            return  # ended already: the server is stopping (close)
        kept = f"{session.url} is kept {self.resume_window:g}s for its client"
        log.info("%s: tunnel connection closed; %s", session.peer, kept)
        session.expiry = asyncio.get_running_loop().call_later(self.resume_window, self._expire, session)

    def _expire(self, session: Session) -> None:
        self.by_id.pop(session.session_id, None)
        self.tunnels.release(session)
        log.info("session %s ended: %s is free", session.session_id[:8], session.url)

    def close(self) -> None:
        """The server stops: end every session now (their connections are closed by the server)."""
        for session in list(self.by_id.values()):
            if session.expiry is not None:
                session.expiry.cancel()
            self._expire(session)

    @staticmethod
    async def _goodbye(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mux: Mux | None, reason: str
    ) -> None:
        # Before the welcome, a peer reads lines (`error <reason>`); after it, frames (GO_AWAY).
        if mux is None:
            await say_goodbye(reader, writer, reason)
        else:
            await mux.goodbye(reason)
