"""The whole tunnel on one machine: `python3 -m stage_6` shows it working with zero setup.

It runs three things in one process, all on 127.0.0.1: a demo local app (demo_app.py), the
server and the client. Then it prints the public URL: open it in a browser or curl it, and
the demo app's page comes back through the tunnel. In real use the server runs on a machine
the internet can reach and the client next to your app: see the page of this stage in the docs.
"""

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine

from .client import Client
from .demo_app import DemoApp
from .protocol import CONTROL_PORT, NETWORK_TIMEOUT, PUBLIC_PORT, TunnelError
from .server import Server, listen_error, listen_port

log = logging.getLogger(f"{__package__}.demo")

HOST = "127.0.0.1"  # the demo never leaves this machine


async def run(control_port: int, public_port: int, app_port: int, any_free: bool = False) -> None:
    """Start the demo app, the server and the client; print the public URL; serve until cancelled.

    any_free: if the tunnel's ports can't all be had, take any free ones instead of failing.
    """
    app = DemoApp()
    try:
        await app.listen(HOST, app_port)
    except OSError as exc:
        raise TunnelError(listen_error(exc, "app", HOST, app_port)) from None
    server = Server()
    try:
        ports = await server.listen(HOST, control_port, public_port)
    except TunnelError as exc:
        if not any_free:
            raise
        # The usual ports are for the story; the demo works on any. A default port may be
        # held by another program, or for a minute by connections that just closed: the
        # test suite makes thousands, and each may have used it as its source port.
        log.warning("%s; the demo takes free ports instead", exc)
        ports = await server.listen(HOST, 0, 0)
    client = Client(app.address, HOST, ports.control)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(app.serve())
        tasks.create_task(server.serve())
        tasks.create_task(client.run())
        try:
            async with asyncio.timeout(NETWORK_TIMEOUT):
                await client.connected.wait()
        except TimeoutError:
            raise TunnelError(f"the demo's client did not connect within {NETWORK_TIMEOUT:g}s; try -v") from None
        url = f"http://{HOST}:{ports.public}/"
        print(
            f"\npublic URL: {url}\n"
            f"  try it:   curl {url}hello   (or open the URL in a browser)\n"
            f"  the path: you -> server (public port {ports.public}) -> client -> "
            f"demo app ({HOST}:{app.address[1]}), and back\n"
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
    """Command line: python3 -m stage_6 [--public-port P] [--control-port P] [--app-port P]."""
    parser = argparse.ArgumentParser(
        prog=f"python3 -m {__package__}",
        description="Run a demo app, the tunnel server and the tunnel client on this machine, and print the URL.",
    )
    for role, default in (("public", PUBLIC_PORT), ("control", CONTROL_PORT)):
        parser.add_argument(
            f"--{role}-port",
            type=listen_port,
            metavar="PORT",
            help=f"0 = any (default: {default}, or any free port if that one is taken)",
        )
    parser.add_argument(
        "--app-port", type=listen_port, default=0, metavar="PORT", help="0 = any (default: %(default)s)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)-15s %(message)s",  # the name says who speaks: server, client, app
        datefmt="%H:%M:%S",
    )
    # Ports you name are used or refused; the defaults give way if they are taken.
    any_free = args.control_port is None and args.public_port is None
    control = CONTROL_PORT if args.control_port is None else args.control_port
    public = PUBLIC_PORT if args.public_port is None else args.public_port
    try:
        asyncio.run(until_stopped(run(control, public, args.app_port, any_free=any_free)))
    except TunnelError as exc:
        sys.exit(f"error: {exc}")
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C, or SIGTERM: see until_stopped
        log.info("stopped")


if __name__ == "__main__":
    main()
