"""The link lab: a server host and a home host joined by a slow, real link (network namespaces and tc).

    server host (198.51.100.1)  ==== veth, tc tbf RATE each way ====  home host (198.51.100.2)
    tunnel server, the user                                           tunnel client, the local app

On one machine the kernel absorbs about a megabyte per socket, so a relay that outruns its peer
never shows it; across a rate-limited link a sender really outruns the link, send buffers fill and
asyncio's `pause_writing` fires (see tests/test_real_links.py). The tunnel's data connections
(proxy connections) cross the link; the user and the local app are next to their ends of it.

The lab reuses the NAT lab's machinery (nat_lab.Lab: programs started inside namespaces, stopped,
the namespaces deleted, leftovers checked). This file is also the program the lab runs inside a
namespace as the user or the local app (`python tests/link_lab.py peer ...`): it sends or receives
a known byte pattern, hashing it as it goes, and prints one JSON line with what it saw.
"""

import argparse
import hashlib
import json
import socket
import sys
import time
from pathlib import Path

import nat_lab
from support import pattern_bytes

HERE = Path(__file__).resolve()
PREFIX = "linklab-"
SERVER_IP = "198.51.100.1"  # 198.51.100.0/24 is reserved for documentation: never routed anywhere
HOME_IP = "198.51.100.2"
TOOLS = (("ip", "iproute2"), ("tc", "iproute2"))

# 250 Mbit/s moves the tests' gigabyte in about 36 s (8.6 Gbit at ~236 Mbit/s of TCP payload),
# where the 20 Mbit/s would take 430 s: too long for CI. It is still far below what the
# tunnel relays on loopback (~400 MB/s = 3.2 Gbit/s): the link, not the tunnel, sets the pace.
RATE = "250mbit"
# The link while a connection starts (see set_rate): the 20 Mbit/s, with a bucket of 4 KB,
# so that nothing leaves at more than the rate. A pause lost at the join heals if the proxy
# connection drains below asyncio's low-water mark before the sender refills it; with a 128 KB
# bucket an idle link lets that much out at once, and the bug showed in about 3 runs of 5 (at
# 250 or 20 Mbit/s); with these it shows in nearly every run.
START_RATE, START_BURST = "20mbit", "4kb"
# tbf's bucket must hold at least one packet (veth passes 64 KB GSO packets, which tbf splits when
# they exceed it) and what the rate earns in one timer tick, or the link runs slower than RATE.
# Measured here: 256 MiB took 9.1 s with a bucket of 32, 128 or 512 KB alike (236 Mbit/s of TCP
# payload: the rate is real). 128 KB also keeps a burst at full speed short.
BURST = "128kb"
# How long a packet may wait in tbf's queue: the queue holds RATE x LATENCY (~1.5 MB), like a
# router's buffer. It is not the tunnel's memory: that is what the tests measure.
LATENCY = "50ms"


def probe() -> str | None:
    """None if this process can build the link lab, else why it cannot (for a skip)."""
    return nat_lab.probe(TOOLS, PREFIX)


class LinkLab(nat_lab.Lab):
    """Two namespaces joined by a rate-limited veth; `async with LinkLab() as lab:` builds it and always removes it."""

    prefix = PREFIX
    roles = ("server", "home")

    def __init__(self, rate: str = RATE, burst: str = BURST, say: nat_lab.Say = print) -> None:
        super().__init__(say)
        self.rate, self.burst = rate, burst
        # Per-run names, short enough for the kernel's 15-character limit (lk + 6 hex + s/h).
        self.interfaces = {"server": f"lk{self.run_id}s", "home": f"lk{self.run_id}h"}
        self.addresses = {"server": SERVER_IP, "home": HOME_IP}

    async def _build(self) -> None:
        for name in self.ns.values():
            await self.run("ip", "netns", "add", name)
            self._made.append(name)
            await self.run("ip", "-n", name, "link", "set", "lo", "up")  # lo is down in a new namespace
        server, home = self.interfaces["server"], self.interfaces["home"]
        await self.run(
            "ip", "-n", self.ns["server"], "link", "add", server, "type", "veth",
            "peer", "name", home, "netns", self.ns["home"],
        )  # fmt: skip
        for role, interface in self.interfaces.items():
            ns = self.ns[role]
            await self.run("ip", "-n", ns, "addr", "add", f"{self.addresses[role]}/24", "dev", interface)
            await self.run("ip", "-n", ns, "link", "set", interface, "up")
            await self._shape("add", role)

    async def _shape(self, verb: str, role: str) -> None:
        # Each end shapes what it sends: the link is `rate` each way.
        tbf = ["tbf", "rate", self.rate, "burst", self.burst, "latency", LATENCY]
        await self.run(
            "ip", "netns", "exec", self.ns[role], "tc", "qdisc", verb, "dev", self.interfaces[role], "root", *tbf
        )

    async def set_rate(self, rate: str, burst: str = BURST) -> None:
        """Change the link's rate, both ways, while connections run over it (e.g. "250mbit")."""
        self.rate, self.burst = rate, burst
        for role in self.roles:
            await self._shape("change", role)

    async def peer(self, role: str, name: str, *args: str) -> nat_lab.LabProcess:
        """Start this file's `peer` program inside `role`'s namespace (see peer_main)."""
        return await self.start(role, name, str(HERE), "peer", *args)


def result(process: nat_lab.LabProcess) -> dict[str, float | int | str]:
    """The JSON line a `peer` program printed at its end."""
    lines = [line for line in process.lines if line.startswith("{")]
    if not lines:
        raise nat_lab.LabError(f"{process.name} printed no result:\n{process.output}")
    answer: dict[str, float | int | str] = json.loads(lines[-1])
    return answer


# --- the peer program: a user or a local app, run inside a namespace -----------------------------

# An odd length, so that a chunk lost, doubled or swapped at a power-of-two boundary changes the hash.
BLOCK = pattern_bytes(1024 * 1024 - 3, seed=12)
CHUNK = 256 * 1024


def send(sock: socket.socket, size: int) -> dict[str, float | int | str]:
    """Send `size` bytes of the pattern from the first moment, then end our side; hash what was sent."""
    digest, sent, view = hashlib.sha256(), 0, memoryview(BLOCK)
    while sent < size:
        chunk = view[: min(len(BLOCK), size - sent)]
        sock.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    return {"sent": sent, "sent_sha256": digest.hexdigest()}


def receive(sock: socket.socket, stall: float) -> dict[str, float | int | str]:
    """Read nothing for `stall` seconds, then read to EOF as fast as the bytes come; hash them."""
    time.sleep(stall)
    digest, received, started = hashlib.sha256(), 0, time.monotonic()
    while data := sock.recv(CHUNK):
        digest.update(data)
        received += len(data)
    seconds = time.monotonic() - started
    return {"received": received, "received_sha256": digest.hexdigest(), "read_seconds": round(seconds, 3)}


def peer_main(argv: list[str]) -> int:
    """python tests/link_lab.py peer (--listen HOST:PORT | --connect HOST:PORT) (--send N | --receive) [--stall S]."""
    parser = argparse.ArgumentParser(prog="link_lab.py peer")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="HOST:PORT", help="accept one connection (a local app)")
    where.add_argument("--connect", metavar="HOST:PORT", help="connect (a user)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--send", type=int, metavar="BYTES", help="send this many bytes from the first moment")
    what.add_argument("--receive", action="store_true", help="read to EOF")
    parser.add_argument("--stall", type=float, default=0.0, metavar="S", help="read nothing for S seconds first")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.listen:
        host, port = args.listen.rsplit(":", 1)
        with socket.create_server((host, int(port))) as listener:
            print(f"listening on {host}:{port}", flush=True)
            sock, _ = listener.accept()
    else:
        host, port = args.connect.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=nat_lab.STEP_TIMEOUT)
        sock.settimeout(None)
    print("connected", flush=True)
    with sock:
        outcome = send(sock, args.send) if args.send is not None else receive(sock, args.stall)
        if args.send is not None:
            while sock.recv(CHUNK):  # wait for the other end to finish, so nothing is cut short
                pass
    print(json.dumps({**outcome, "seconds": round(time.monotonic() - started, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["peer"]:
        sys.exit("usage: python tests/link_lab.py peer ... (the link lab's user and local app; see peer_main)")
    sys.exit(peer_main(sys.argv[2:]))
