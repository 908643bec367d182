"""Authentication (stage 11 on): an HMAC challenge-response proves the secret without sending it.

These tests run the handshake over a `socket.socketpair()`, with no server involved, against every
stage that has it (AUTH_STAGES); the end-to-end cases (wrong secret through the real CLIs, replay
against a real server) are in test_streams.py and test_isolation_tenants.py.
"""

import asyncio
import importlib
import socket
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import pytest

from support import STEP_TIMEOUT, stages_from

# Every stage with the HMAC handshake: the stage that brings auth and every later one.
AUTH_STAGES = stages_from("auth")

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture(params=AUTH_STAGES)
def auth(request: pytest.FixtureRequest) -> ModuleType:
    """The stage's auth module (imported here, so a learner working on one stage is not stopped by another)."""
    return importlib.import_module(f"{request.param}.auth")


@pytest.fixture
def proto(auth: ModuleType) -> ModuleType:
    """The same stage's protocol module: its messages and errors."""
    return importlib.import_module(auth.__name__.replace(".auth", ".protocol"))


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Streams, Streams]]:
    """Two connected stream pairs, (server side, client side), over a socketpair."""
    server_sock, client_sock = socket.socketpair()
    server = await asyncio.open_connection(sock=server_sock)
    client = await asyncio.open_connection(sock=client_sock)
    yield server, client
    for _, writer in (server, client):
        writer.close()


@dataclass(frozen=True)
class Wire:
    """What differs between the stages' handshakes: from stage 14 on, the hello names a tunnel and the
    welcome returns it with its URL, and client_handshake takes the whole Hello instead of a session id."""

    proto: ModuleType

    @property
    def tunnels(self) -> bool:
        return hasattr(self.proto, "KINDS")

    def hello(self, session_id: str | None = None) -> object:
        """The Hello the server reads from a client resuming `session_id` (or a new one)."""
        # A TCP tunnel by port: valid from stage 14 on (an http tunnel is named by a port in stage 14, by name from 11).
        return self.proto.Hello("tcp", "8080", session_id) if self.tunnels else self.proto.Hello(session_id)

    def asks(self, session_id: str | None = None) -> object:
        """What client_handshake takes after the secret to send that hello."""
        return self.hello(session_id) if self.tunnels else session_id

    @property
    def welcome(self) -> object:
        return self.proto.Welcome("s1", "8080", "tcp://localhost:8080") if self.tunnels else self.proto.Welcome("s1")

    @property
    def hello_line(self) -> bytes:
        return b"hello http\n" if self.tunnels else b"hello\n"


@pytest.fixture
def wire(proto: ModuleType) -> Wire:
    return Wire(proto)


T = TypeVar("T")


async def bounded(awaitable: Awaitable[T]) -> T:
    async with asyncio.timeout(STEP_TIMEOUT):
        return await awaitable


def test_answer_is_hmac_sha256_of_the_nonce_keyed_by_the_secret(auth: ModuleType, proto: ModuleType) -> None:
    # RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
    expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert auth.answer("Jefe", "what do ya want for nothing?") == expected
    assert auth.is_valid("Jefe", "what do ya want for nothing?", expected)
    assert not auth.is_valid("jefe", "what do ya want for nothing?", expected)


def test_nonces_are_fresh_and_unpredictable(auth: ModuleType, proto: ModuleType, wire: Wire) -> None:
    nonces = {auth.new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert all(len(n) == 32 for n in nonces)  # 128 bits


async def welcome_after(auth: ModuleType, wire: Wire, server_side: Streams, secret: str | None) -> object:
    """The server's half: handshake, then send a welcome as session.py does."""
    hello = await auth.server_handshake(*server_side, secret)
    server_side[1].write(wire.proto.encode(wire.welcome))
    return hello


async def test_right_secret_is_welcomed(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    server, client = pair
    hello, welcome = await bounded(
        asyncio.gather(
            welcome_after(auth, wire, server, "s3cret"),
            auth.client_handshake(*client, "s3cret", wire.asks("old-session")),
        )
    )
    assert hello == wire.hello("old-session")  # a reconnecting client names its session
    assert welcome == wire.welcome


async def test_no_secret_on_either_side_skips_the_challenge(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    server, client = pair
    hello, welcome = await bounded(
        asyncio.gather(welcome_after(auth, wire, server, None), auth.client_handshake(*client, None, wire.asks()))
    )
    assert (hello, welcome) == (wire.hello(), wire.welcome)


async def test_wrong_secret_is_refused_by_the_server(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    server, client = pair
    client_task = asyncio.ensure_future(auth.client_handshake(*client, "guess", wire.asks()))
    with pytest.raises(proto.AuthError, match="wrong secret"):
        await bounded(auth.server_handshake(*server, "s3cret"))
    client_task.cancel()


async def test_client_without_secret_stops_at_the_challenge(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    server, client = pair
    server_task = asyncio.ensure_future(auth.server_handshake(*server, "s3cret"))
    with pytest.raises(proto.AuthError, match="requires a secret"):
        await bounded(auth.client_handshake(*client, None, wire.asks()))
    server_task.cancel()


async def test_the_secret_never_crosses_the_wire(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    """Play the server by hand and look at every byte the client sends."""
    (reader, writer), client = pair
    secret = "correct horse battery staple"
    client_task = asyncio.ensure_future(auth.client_handshake(*client, secret, wire.asks()))
    hello = await bounded(reader.readline())
    writer.write(b"challenge 00112233445566778899aabbccddeeff\n")
    proof = await bounded(reader.readline())
    writer.write(wire.proto.encode(wire.welcome))
    assert await bounded(client_task) == wire.welcome
    sent = hello + proof
    assert secret.encode() not in sent
    assert proof == f"auth {auth.answer(secret, '00112233445566778899aabbccddeeff')}\n".encode()


async def test_a_replayed_answer_fails_against_a_new_nonce(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    """An eavesdropper who recorded one good answer can't reuse it: every handshake has a new nonce."""
    server, (reader, writer) = pair
    recorded = auth.answer("s3cret", auth.new_nonce())  # a valid answer to some earlier challenge
    server_task = asyncio.ensure_future(auth.server_handshake(*server, "s3cret"))
    writer.write(wire.hello_line)
    assert (await bounded(reader.readline())).startswith(b"challenge ")
    writer.write(f"auth {recorded}\n".encode())
    with pytest.raises(proto.AuthError):
        await bounded(server_task)


async def test_a_silent_client_times_out(pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType) -> None:
    server, _ = pair
    with pytest.raises(TimeoutError):
        await bounded(auth.server_handshake(*server, "s3cret", timeout=0.2))


async def test_a_silent_server_times_out(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    """A server that accepts and then says nothing (a half-open connection) does not hold the client."""
    _, client = pair
    with pytest.raises(TimeoutError):
        await bounded(auth.client_handshake(*client, "s3cret", wire.asks(), timeout=0.2))


@pytest.mark.parametrize(
    ("first_line", "error"),
    [(b"ping\n", "ProtocolError"), (b"GET / HTTP/1.1\n", "ProtocolError"), (b"auth abc\n", "ProtocolError")],
)
async def test_anything_but_hello_first_is_a_protocol_error(
    pair: tuple[Streams, Streams], first_line: bytes, error: str, auth: ModuleType, proto: ModuleType
) -> None:
    server, (_, writer) = pair
    writer.write(first_line)
    with pytest.raises(getattr(proto, error)):
        await bounded(auth.server_handshake(*server, "s3cret"))


async def test_a_server_error_line_is_a_refusal(
    pair: tuple[Streams, Streams], auth: ModuleType, proto: ModuleType, wire: Wire
) -> None:
    (reader, writer), client = pair
    client_task = asyncio.ensure_future(auth.client_handshake(*client, None, wire.asks()))
    await bounded(reader.readline())
    writer.write(b"error another client is already connected to this server\n")
    with pytest.raises(proto.Refused, match="another client is already connected"):
        await bounded(client_task)
