"""Stage 22's speed step: `--loop uvloop|asyncio|auto` on every command, the loop named in the log,
a clear error when uvloop is asked for and missing, no reliance on a loop's concrete classes, and the
inspector's lazy parsing (it shows the same entries as before).

The shared tunnel tests run on uvloop too: `pytest --loop uvloop` (conftest.py) runs every test of the
stages that have --loop on uvloop, in this process and in their subprocesses (NGROK_LOOP).
"""

import ast
import asyncio
import importlib
import re
import socket
import struct
from pathlib import Path

import pytest
from isolation_peers import read_to_end

from support import (
    STEP_TIMEOUT,
    Background,
    CliProcess,
    any_ports,
    client_options,
    make_client,
    make_server,
    open_connection,
    server_flags,
    usage_error,
    users_port,
)

pytestmark = pytest.mark.since("speed")

ROOT = Path(__file__).resolve().parent.parent
try:
    import uvloop  # noqa: F401  (only asks whether it is installed)

    NO_UVLOOP = None
except ImportError:
    NO_UVLOOP = "uvloop is not installed here"
LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(NO_UVLOOP is not None, reason=str(NO_UVLOOP)))]
# Runs a stage's command with `import uvloop` failing, as on a machine without it.
WITHOUT_UVLOOP = (
    "import runpy, sys; sys.modules['uvloop'] = None; module = sys.argv.pop(1); "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
MISSING = "error: --loop uvloop: uvloop is not installed (pip install uvloop, or use --loop asyncio)"


def commands(stage: str) -> list[tuple[str, ...]]:
    """The three programs and the least each needs on its command line."""
    return [(f"{stage}.server", *server_flags(stage)), (f"{stage}.client", "localhost:9"), (stage,)]


async def test_every_command_has_the_loop_option(cli: CliProcess.Factory, stage: str) -> None:
    for module, *args in commands(stage):
        helped = await cli("-m", module, "--help")
        assert await helped.wait() == 0
        assert "--loop {auto,uvloop,asyncio}" in helped.output, helped.output
        error = await usage_error(cli, "-m", module, *args, "--loop", "libuv")
        assert "argument --loop: invalid choice: 'libuv'" in error


async def test_loop_uvloop_without_uvloop_is_one_clear_line_and_exit_1(cli: CliProcess.Factory, stage: str) -> None:
    for module, *args in commands(stage):
        process = await cli("-c", WITHOUT_UVLOOP, module, *args, "--loop", "uvloop")
        assert await process.wait() == 1, process.output
        assert process.lines == [MISSING]


async def test_auto_without_uvloop_runs_on_asyncio(cli: CliProcess.Factory, stage: str) -> None:
    server = await cli("-c", WITHOUT_UVLOOP, f"{stage}.server", *server_flags(stage), "--loop", "auto")
    await server.expect(r"event loop: asyncio$")
    assert await server.interrupt() == 0


@pytest.mark.parametrize("loop", LOOPS)
async def test_the_server_the_client_and_the_demo_say_which_loop_runs(
    cli: CliProcess.Factory, stage: str, loop: str
) -> None:
    server = await cli("-m", f"{stage}.server", *server_flags(stage), "--loop", loop)
    await server.expect(rf"event loop: {loop}$")
    demo = await cli("-m", stage, "--public-port", "0", "--control-port", "0", "--tls-port", "0", "--loop", loop)
    await demo.expect(rf"stage_\d+\.client +event loop: {loop}$")  # a client of the demo, once connected
    await demo.expect(rf"^  event loop: {loop} ")
    for process in (server, demo):
        assert await process.interrupt() == 0
        assert "Traceback" not in process.output


@pytest.mark.parametrize("loop", LOOPS)
async def test_ngrok_loop_sets_the_default(cli: CliProcess.Factory, stage: str, loop: str) -> None:
    server = await cli("-m", f"{stage}.server", *server_flags(stage), env={"NGROK_LOOP": loop})
    await server.expect(rf"event loop: {loop}$")
    assert await server.interrupt() == 0


def test_auto_takes_uvloop_when_it_is_installed(stage: str) -> None:
    loops = importlib.import_module(f"{stage}.loops")
    assert loops.factory("asyncio") is asyncio.new_event_loop
    expected = asyncio.new_event_loop if NO_UVLOOP else importlib.import_module("uvloop").new_event_loop
    assert loops.factory("auto") is expected


def test_no_code_relies_on_a_loops_concrete_classes(stage: str) -> None:
    # uvloop's transports are not subclasses of asyncio.Transport: an isinstance check of one fails there.
    folder = Path(importlib.import_module(stage).__path__[0])
    checks = [
        f"{path.name}:{node.lineno}"
        for path in sorted(folder.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "isinstance"
        and re.search(r"asyncio\.\w*(Transport|EventLoop)\b", ast.unparse(node.args[1]))
    ]
    assert checks == []


async def test_an_answer_cut_by_a_reset_reaches_the_user_as_a_reset(stage: str) -> None:
    # The app's last bytes and its reset arrive together: a short read, then the hang-up. libuv (with
    # `pytest --loop uvloop`) reports that as an EOF; the tunnel must still pass a reset on, or the
    # user takes a cut answer for a whole one.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(STEP_TIMEOUT)

        def app() -> None:  # a plain blocking app: its bytes and its RST leave back to back
            for _ in range(ROUNDS):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(STEP_TIMEOUT)
                    conn.recv(100)
                    conn.sendall(b"the start of an answer\n")
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        server = make_server(stage)
        ports = await server.listen("127.0.0.1", *any_ports(stage))
        serving = asyncio.create_task(asyncio.to_thread(app))
        async with Background(server.serve()):
            client = make_client(stage, listener.getsockname(), "127.0.0.1", ports.control, **client_options(stage))
            async with Background(client.run()):
                port = await users_port(ports, client)
                for _ in range(ROUNDS):
                    reader, writer = await open_connection(port)
                    writer.write(b"answer me\n")
                    _, ended = await read_to_end(reader)
                    writer.close()
                    assert ended == "reset"
        await serving


ROUNDS = 5  # the race is the kernels': a few tries make it show
