# ruff: noqa: E402 (the module-level skip comes before the imports of the gone stage_4)
"""Stage 4 from the command line, exactly as the docs tell a learner to run it.

Each program is a real subprocess (`python -m ...`); ports are 0 so the tests never collide,
and each program's log line "<role> port listening on HOST:PORT" says what it really got.
"""

import pytest

# Old stage 4 (a proxy connection per user) is gone from the ladder; its tests are being retargeted
# to the stages where each behaviour now appears (auth 7+, heartbeats and resume 6+, pages 8+, limits
# 9+) or dropped where they test only the proxy transport. Until then this file does not run.
pytest.skip("old stage 4's tests: not yet retargeted to the new ladder", allow_module_level=True)


import asyncio
import logging
import re
import socket
import urllib.request

import pytest

from stage_4 import __main__ as demo
from stage_4.protocol import TunnelError
from stage_4.server import Ports
from support import PAGE, STEP_TIMEOUT, Background, CliProcess, HttpOrigin, free_port, http_request

SECRET_ENV = {"NGROK_SECRET": "cli-tests-secret"}


async def start_server(
    cli: CliProcess.Factory, *extra: str, env: dict[str, str] | None = None
) -> tuple[CliProcess, Ports]:
    server = await cli(
        "-m", "stage_4.server", "--control-port", "0", "--public-port", "0", "--proxy-port", "0", *extra, env=env
    )
    return server, Ports(*[await server.listening(role) for role in ("control", "public", "proxy")])


async def start_client(
    cli: CliProcess.Factory, local_port: int, ports: Ports, *extra: str, env: dict[str, str] | None = None
) -> CliProcess:
    client = await cli(
        "-m", "stage_4.client", f"localhost:{local_port}", "127.0.0.1",
        "--control-port", str(ports.control), "--proxy-port", str(ports.proxy), *extra, env=env,
    )  # fmt: skip
    return client


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
    with opener.open(url, timeout=STEP_TIMEOUT) as response:
        return response.status, response.read()


async def get(url: str) -> tuple[int, bytes]:
    """A real HTTP client (urllib) in a thread."""
    return await asyncio.to_thread(_get, url)


async def test_cli_server_and_client_serve_the_local_app_and_stop_on_ctrl_c(
    cli: CliProcess.Factory, http_origin: HttpOrigin
) -> None:
    """The stage 4 page's recipe, with the secret in NGROK_SECRET on both sides."""
    server, ports = await start_server(cli, env=SECRET_ENV)
    client = await start_client(cli, http_origin.port, ports, env=SECRET_ENV)
    await client.expect("tunnel up")
    assert await get(f"http://127.0.0.1:{ports.public}/docs") == (200, PAGE)
    await server.expect(r"conn [0-9a-f]{8} GET /docs -> 200, \d+ bytes up, \d+ bytes down, [\d.]+s")
    assert await client.interrupt() == 0
    assert await server.interrupt() == 0
    assert "Traceback" not in server.output + client.output


async def test_cli_demo_prints_a_public_url_that_serves_the_demo_page(cli: CliProcess.Factory) -> None:
    """`python -m stage_4`: zero setup, one command (ports 0 here, so that tests never collide)."""
    demo = await cli("-m", "stage_4", "--public-port", "0", "--control-port", "0", "--proxy-port", "0")
    url = (await demo.expect(r"public URL: (http://127\.0\.0\.1:\d+/)"))[1]
    await demo.expect(rf"curl {re.escape(url)}hello")
    status, body = await get(url + "hello/tunnel")
    assert status == 200
    assert b"Hello through the tunnel!" in body
    assert b"GET /hello/tunnel" in body
    await demo.expect(r"conn [0-9a-f]{8} GET /hello/tunnel -> 200")  # the server's request log
    assert await demo.interrupt() == 0
    assert "Traceback" not in demo.output


async def test_cli_wrong_secret_is_one_clear_line_and_exit_1(cli: CliProcess.Factory) -> None:
    _, ports = await start_server(cli, "--secret", "right")
    client = await start_client(cli, 9, ports, "--secret", "wrong")
    assert await client.wait() == 1
    assert client.lines == [
        "error: the server refused the connection: wrong secret; check --secret or NGROK_SECRET on both sides"
    ]


async def test_cli_second_client_is_one_clear_line_and_exit_1(cli: CliProcess.Factory, http_origin: HttpOrigin) -> None:
    _, ports = await start_server(cli)
    first = await start_client(cli, http_origin.port, ports)
    await first.expect("tunnel up")
    second = await start_client(cli, http_origin.port, ports)
    assert await second.wait() == 1
    assert second.lines == [
        "error: the server refused the connection: another client is already connected to this server"
    ]
    assert await get(f"http://127.0.0.1:{ports.public}/") == (200, PAGE)  # the first one still serves


async def test_cli_client_keeps_retrying_until_ctrl_c_which_stops_it_promptly(cli: CliProcess.Factory) -> None:
    dead_port = await free_port()
    ports = Ports(dead_port, 0, dead_port)
    client = await start_client(cli, 9, ports, "--max-backoff", "0.2")
    for attempt in (1, 2, 3):  # one line per attempt
        await client.expect(rf"connection refused\); reconnecting in [\d.]+s \(attempt {attempt}\)")
    assert await client.interrupt() == 0
    assert "Traceback" not in client.output


async def test_cli_server_port_in_use_is_one_line_and_exit_1(cli: CliProcess.Factory) -> None:
    _, ports = await start_server(cli)
    second = await cli("-m", "stage_4.server", "--control-port", str(ports.control))
    assert await second.wait() == 1
    assert second.lines == [
        f"error: port {ports.control} on 127.0.0.1 is already in use; stop the other program or pick another "
        "--control-port"
    ]


async def test_the_demo_takes_free_ports_when_its_usual_ones_are_taken(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Right after the test suite, a default port may be held for a minute (TIME-WAIT): the demo still starts.

    In-process, since the real defaults (60623-60625) are not ours to take in a test: `any_free`
    is what `python -m stage_4` passes when no port is named on its command line.
    """
    caplog.set_level(logging.WARNING)
    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        async with Background(demo.run(0, taken, 0, 0, any_free=True)):
            printed = ""
            async with asyncio.timeout(STEP_TIMEOUT):
                while not (match := re.search(r"public URL: http://127\.0\.0\.1:(\d+)/", printed)):
                    await asyncio.sleep(0.05)
                    printed += capsys.readouterr().out
            public = int(match[1])
            assert public != taken
            status, _, body = await http_request(public, b"GET /hello HTTP/1.0\r\n\r\n")
            assert (status, b"hello" in body) == (200, True)
    assert f"port {taken} on 127.0.0.1 is already in use" in caplog.text
    assert "the demo takes free ports instead" in caplog.text


async def test_ports_named_on_the_demo_command_line_are_used_or_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        with pytest.raises(TunnelError, match=f"port {taken} on 127.0.0.1 is already in use"):
            await asyncio.wait_for(demo.run(0, taken, 0, 0, any_free=False), STEP_TIMEOUT)


@pytest.mark.parametrize(
    ("program", "flag"),
    [
        ("server", "--heartbeat-timeout"),
        ("server", "--idle-timeout"),
        ("server", "--half-closed-timeout"),
        ("client", "--heartbeat-interval"),
        ("client", "--heartbeat-timeout"),
        ("client", "--max-backoff"),
        ("client", "--idle-timeout"),
        ("client", "--half-closed-timeout"),
    ],
)
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
async def test_cli_timeouts_must_be_positive(cli: CliProcess.Factory, program: str, flag: str, value: str) -> None:
    """A heartbeat interval of 0 would ping in a tight loop; a max backoff of 0 would reconnect in one."""
    local = ["localhost:8000"] if program == "client" else []
    process = await cli("-m", f"stage_4.{program}", *local, f"{flag}={value}")
    assert await process.wait() == 2
    assert f"argument {flag}: expected a number of seconds above 0" in process.output
    assert "Traceback" not in process.output
