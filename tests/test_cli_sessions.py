"""The command lines of stage 8 on, exactly as the docs tell a learner to run them: what the shared CLI
tests (test_stage_3.py, test_demos.py) don't show. Each test runs on the stage that brings its idea and
every later one (`since`, support.LADDER): ports in use and timeouts (4 on, heartbeats and backoff 6 on),
retrying until Ctrl-C (6), one clear line for a second client (6 to 9) or a wrong secret (7),
NGROK_SECRET and the request log (7, 8).

Each program is a real subprocess (`python -m ...`); ports are 0 so the tests never collide, and each
program's log line "<role> port listening on HOST:PORT" says what it really got. These were old stage 8's
tests (test_stage_8_cli.py); the demo's free ports are tested for every stage in test_demos.py.
"""

import asyncio
import importlib
import socket
import urllib.request

import pytest

from support import (
    PAGE,
    STEP_TIMEOUT,
    CliProcess,
    HttpOrigin,
    cli_users_port,
    client_flags,
    first_and_last,
    free_port,
    has,
    port_roles,
    server_flags,
    stages_from,
)

pytestmark = pytest.mark.since("streams")


async def start_server(
    cli: CliProcess.Factory, stage: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[CliProcess, dict[str, int]]:
    server = await cli("-m", f"{stage}.server", *server_flags(stage), *extra, env=env)
    return server, {role: await server.listening(role) for role in port_roles(stage)}


async def start_client(
    cli: CliProcess.Factory,
    stage: str,
    local_port: int,
    ports: dict[str, int],
    *extra: str,
    env: dict[str, str] | None = None,
) -> CliProcess:
    flags = client_flags(stage, ports)
    return await cli("-m", f"{stage}.client", f"localhost:{local_port}", "127.0.0.1", *flags, *extra, env=env)


def without_inspector(lines: list[str]) -> list[str]:
    """A client's output but the line where its inspector page (stage 18 on) says it listens, before connecting."""
    return [line for line in lines if "inspector port listening on" not in line]


def _get(url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
    with opener.open(url, timeout=STEP_TIMEOUT) as response:
        return response.status, response.read()


async def get(url: str) -> tuple[int, bytes]:
    """A real HTTP client (urllib) in a thread."""
    return await asyncio.to_thread(_get, url)


@pytest.mark.parametrize("stage", first_and_last(stages_from("auth")))
async def test_cli_server_and_client_share_the_secret_from_ngrok_secret_and_the_server_logs_each_request(
    cli: CliProcess.Factory, http_origin: HttpOrigin, stage: str
) -> None:
    """The stage page's recipe, with the secret in NGROK_SECRET on both sides (stage 11 on)."""
    env = {"NGROK_SECRET": "cli-tests-secret-of-some-length"}
    server, ports = await start_server(cli, stage, env=env)
    client = await start_client(cli, stage, http_origin.port, ports, env=env)
    await client.expect("tunnel up")
    public = await cli_users_port(stage, server, ports)
    assert await get(f"http://127.0.0.1:{public}/docs") == (200, PAGE)
    if has(stage, "pages"):
        await server.expect(r"stream \d+ GET /docs -> 200, \d+ bytes up, \d+ bytes down, [\d.]+s")
    assert await client.interrupt() == 0
    assert await server.interrupt() == 0
    assert "Traceback" not in server.output + client.output


@pytest.mark.since("auth")
async def test_cli_wrong_secret_is_one_clear_line_and_exit_1(cli: CliProcess.Factory, stage: str) -> None:
    _, ports = await start_server(cli, stage, "--secret", "the-right-secret-of-some-length")
    client = await start_client(cli, stage, 9, ports, "--secret", "a-wrong-secret-of-some-length")
    assert await client.wait() == 1
    assert without_inspector(client.lines) == [
        "error: the server refused the connection: wrong secret; check --secret or NGROK_SECRET on both sides"
    ]


@pytest.mark.since("resume", until="tenants")  # from stage 14 on a second client gets a tunnel of its own
async def test_cli_second_client_is_one_clear_line_and_exit_1(
    cli: CliProcess.Factory, http_origin: HttpOrigin, stage: str
) -> None:
    _, ports = await start_server(cli, stage)
    first = await start_client(cli, stage, http_origin.port, ports)
    await first.expect("tunnel up")
    second = await start_client(cli, stage, http_origin.port, ports)
    assert await second.wait() == 1
    assert without_inspector(second.lines) == [
        "error: the server refused the connection: another client is already connected to this server"
    ]
    assert await get(f"http://127.0.0.1:{ports['public']}/") == (200, PAGE)  # the first one still serves


@pytest.mark.since("resume")
async def test_cli_client_keeps_retrying_until_ctrl_c_which_stops_it_promptly(
    cli: CliProcess.Factory, stage: str
) -> None:
    dead_port = await free_port()
    client = await start_client(cli, stage, 9, {"control": dead_port}, "--max-backoff", "0.2")
    for attempt in (1, 2, 3):  # one line per attempt
        await client.expect(rf"connection refused\); reconnecting in [\d.]+s \(attempt {attempt}\)")
    assert await client.interrupt() == 0
    assert "Traceback" not in client.output


async def test_cli_server_port_in_use_is_one_line_and_exit_1(cli: CliProcess.Factory, stage: str) -> None:
    _, ports = await start_server(cli, stage)
    second = await cli("-m", f"{stage}.server", *server_flags(stage), "--control-port", str(ports["control"]))
    assert await second.wait() == 1
    assert second.lines == [
        f"error: port {ports['control']} on 127.0.0.1 is already in use; stop the other program or pick another "
        "--control-port"
    ]


async def test_ports_named_on_the_demo_command_line_are_used_or_refused(stage: str) -> None:
    demo = importlib.import_module(f"{stage}.__main__")
    protocol = importlib.import_module(f"{stage}.protocol")
    with socket.create_server(("127.0.0.1", 0)) as holder:
        taken = holder.getsockname()[1]
        with pytest.raises(protocol.TunnelError, match=f"port {taken} on 127.0.0.1 is already in use"):
            await asyncio.wait_for(demo.run(0, taken, 0, any_free=False), STEP_TIMEOUT)


TIMEOUT_FLAGS = [  # (the idea that brings it, program, flag)
    ("answers", "server", "--proxy-timeout"),  # stage 5 waits for nothing; stage 6 for the client's answer
    ("resume", "server", "--heartbeat-timeout"),
    ("resume", "client", "--heartbeat-interval"),
    ("resume", "client", "--heartbeat-timeout"),
    ("resume", "client", "--max-backoff"),
]  # --idle-timeout and --half-closed-timeout (stage 13 on): test_idle_timeouts.py


@pytest.mark.parametrize(
    ("stage", "program", "flag"),
    [(stage, program, flag) for idea, program, flag in TIMEOUT_FLAGS for stage in first_and_last(stages_from(idea))],
)
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
async def test_cli_timeouts_must_be_positive(
    cli: CliProcess.Factory, stage: str, program: str, flag: str, value: str
) -> None:
    """A heartbeat interval of 0 would ping in a tight loop; a max backoff of 0 would reconnect in one."""
    local = ["localhost:8000"] if program == "client" else []
    process = await cli("-m", f"{stage}.{program}", *local, f"{flag}={value}")
    assert await process.wait() == 2
    assert f"argument {flag}: expected a number of seconds above 0" in process.output
    assert "Traceback" not in process.output
