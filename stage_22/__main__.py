"""Two tunnels and an inspector, on one machine: `python3 -m stage_22` shows every request live, with zero setup.

It runs five things in one process, all on 127.0.0.1: two demo local apps (demo_app.py), the
server, and two clients named `hello` and `world`, which share a fresh random secret. Then it
prints both URLs: http://hello.localhost:60624/ and http://world.localhost:60624/ reach
different apps through the same public port, told apart by the Host header. Browsers and curl
send *.localhost to this machine without any setup. Each client logs a line for every request it
relays; `hello`'s client also has an inspector: its page, at http://127.0.0.1:4040/, lists the
requests to hello.localhost as they happen; click one to see its headers and bodies, and to send
it to the app again.

Before that, it makes a private CA and a certificate for localhost (certs.py, with the openssl
command) in a temporary folder: the server presents that certificate, and the clients trust only
that CA.
"""

import argparse
import asyncio
import logging
import secrets
import signal
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path

from . import certs, loops, tls
from .capture import Store
from .cli import listen_error, listen_port
from .client import Client, ClientSettings
from .demo_app import DemoApp
from .inspector import INSPECT_PORT, Inspector
from .protocol import CONTROL_PORT, NETWORK_TIMEOUT, PUBLIC_PORT, TLS_PORT, TunnelError
from .server import Server, ServerSettings

log = logging.getLogger(f"{__package__}.demo")

HOST = "127.0.0.1"  # the demo never leaves this machine


NAMES = ("hello", "world")  # the demo's two tunnels


async def run(control_port: int, public_port: int, app_port: int, any_free: bool = False, tls_port: int = 0) -> None:
    """Start the demo apps, the server, the clients and an inspector; print the URLs; serve until cancelled.

    any_free: if the tunnel's ports can't all be had, take any free ones instead of failing.
    """
    apps = [DemoApp(name) for name in NAMES]
    for app, port in zip(apps, (app_port, 0), strict=True):  # a second app on the same port can't be
        try:
            await app.listen(HOST, port)
        except OSError as exc:
            raise TunnelError(listen_error(exc, "app", HOST, port)) from None
    with tempfile.TemporaryDirectory(prefix="ngrok-demo-") as folder:
        try:
            ca, cert, key = certs.make(Path(folder))
        except certs.CertError as exc:
            raise TunnelError(str(exc)) from None
        server_tls, client_tls = tls.server_context(str(cert), str(key)), tls.client_context(str(ca))
    secret = secrets.token_hex(16)  # known to the server and the clients, and to nobody else
    server = Server(ServerSettings(secret=secret), tls=server_tls)
    try:
        ports = await server.listen(HOST, control_port, public_port, tls_port)
    except TunnelError as exc:
        if not any_free:
            raise
        # The usual ports are for the story; the demo works on any. A default port may be
        # held by another program, or for a minute by connections that just closed: the
        # test suite makes thousands, and each may have used it as its source port.
        log.warning("%s; the demo takes free ports instead", exc)
        ports = await server.listen(HOST, 0, 0, 0)
    inspector = Inspector(Store(), apps[0].address, HOST, INSPECT_PORT)  # hello's requests; world's are only logged
    try:
        await inspector.listen()
    except TunnelError as exc:  # as for the tunnel's ports: another one will do
        log.warning("%s; the inspector takes a free port instead", exc)
        inspector.port = 0
        await inspector.listen()
    # "localhost", not 127.0.0.1: the name the certificate holds, and the client checks.
    clients = [
        Client(
            app.address,
            "localhost",
            ports.control,
            ClientSettings(name=app.name, secret=secret),
            tls=client_tls,
            store=store,
        )
        for app, store in zip(apps, (inspector.store, Store()), strict=True)
    ]
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(inspector.serve())
        for task in (*(app.serve() for app in apps), server.serve(), *(client.run() for client in clients)):
            tasks.create_task(task)
        try:
            async with asyncio.timeout(NETWORK_TIMEOUT):
                for client in clients:
                    await client.connected.wait()
        except TimeoutError:
            raise TunnelError(f"the demo's clients did not connect within {NETWORK_TIMEOUT:g}s; try -v") from None
        pairs = zip(apps, clients, strict=True)
        lines = [f"  {client.url}  -> demo app {app.name} ({HOST}:{client.local[1]})" for app, client in pairs]
        print(
            "\npublic URLs, one server, two tunnels:\n" + "\n".join(lines) + "\n"
            f"  try it:   curl {clients[0].url}   (or open it in a browser)\n"
            f"  inspect:  http://{HOST}:{inspector.port}/   (hello's requests, live, with replay)\n"
            f"  event loop: {loops.running()} (--loop uvloop|asyncio|auto)\n"
            f"  the path: you -> server (public port {ports.public}, reads the Host header) -> "
            "the client of that name, over TLS -> its demo app, and back\n"
            f"  TLS tunnels (client --tls NAME) are NAME.localhost on port {ports.tls}, routed by SNI\n"
            "  press Ctrl-C to stop\n",
            flush=True,
        )


async def until_stopped(demo: Coroutine[None, None, None]) -> None:
    """Run the demo until Ctrl-C or SIGTERM (`kill`, `timeout`, a service manager, a cancelled CI job).

    asyncio.run turns Ctrl-C into a cancel of this task; SIGTERM, unhandled, would end the process
    on the spot, with no `finally` run. Cancelling on SIGTERM too makes both stop the same way:
    every `finally` of the demo runs, so each connection is closed and each task ended.
    """
    this = asyncio.current_task()
    assert this is not None  # asyncio.run runs us as a task
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, this.cancel)
    await demo


def main() -> None:
    """Command line: python3 -m stage_22 [--public-port P] [--control-port P] [--tls-port P] [--app-port P] ..."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}",
        description="Run two demo apps, the tunnel server, two named clients and an inspector here; print the URLs.",
    )
    for role, default in (("public", PUBLIC_PORT), ("control", CONTROL_PORT), ("tls", TLS_PORT)):
        parser.add_argument(
            f"--{role}-port",
            type=listen_port,
            metavar="PORT",
            help=f"0 = any (default: {default}, or any free port if that one is taken)",
        )
    parser.add_argument(
        "--app-port",
        type=listen_port,
        default=0,
        metavar="PORT",
        help="the first demo app's port; 0 = any (default: %(default)s)",
    )
    loops.add_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)-15s %(message)s",  # the name says who speaks: server, client, app
        datefmt="%H:%M:%S",
    )
    # Ports you name are used or refused; the defaults give way if they are taken.
    any_free = args.control_port is None and args.public_port is None and args.tls_port is None
    control = CONTROL_PORT if args.control_port is None else args.control_port
    public = PUBLIC_PORT if args.public_port is None else args.public_port
    tls_port = TLS_PORT if args.tls_port is None else args.tls_port
    try:
        loop = loops.factory(args.loop)  # first: a LoopError leaves no coroutine un-awaited
        loops.run(until_stopped(run(control, public, args.app_port, any_free=any_free, tls_port=tls_port)), loop)
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM: see until_stopped
        log.info("stopped")


if __name__ == "__main__":
    main()
