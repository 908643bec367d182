"""The NAT lab: a real home router with NAT, built from network namespaces, to show why a tunnel is needed.

    sudo make nat-lab                      # the story, step by step (or: sudo python3 -m tests.nat_lab)
    sudo python3 -m tests.nat_lab --transcript docs/nat-lab-transcript.txt   # also refresh the docs' copy
    sudo python3 -m tests.nat_lab --cleanup    # remove what a run killed with SIGKILL left behind

Five namespaces, each a machine with its own interfaces, routes and firewall:

    home (100.64.0.2)  --  router (100.64.0.1 | 203.0.113.1)  --  internet switch  --  server (203.0.113.10)
    local app + client      NAT + firewall, like a home router          (a bridge)  --  user   (203.0.113.20)

The story: the user cannot reach the home app directly, the tunnel client at home connects *out* through
the NAT, the server sees the router's address, and the user reaches the home app through the server.
`tests/test_nat_lab.py` runs the same story and asserts each step. Linux, root (or CAP_NET_ADMIN and
CAP_SYS_ADMIN), iproute2 and nftables; standard library only, so plain `python3` runs it.
"""

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

# The tunnel under test: `<TUNNEL>.server` runs on the server host, `<TUNNEL>.client` at home. The
# story needs a secret (only a client that knows it gets in) and, through a router that forgets idle
# connections, heartbeats and reconnects: the first stage with auth (stage 11; tests/support.py's
# LADDER), users as streams over the client's one connection, no TLS yet (no certificates to make).
AUTH_STAGE = 7
TUNNEL = min(
    (p.parent.name for p in ROOT.glob("stage_[0-9]*/__init__.py") if int(p.parent.name[6:]) >= AUTH_STAGE),
    key=lambda name: int(name[6:]),
)

PREFIX = "natlab-"
ROLES = ("home", "router", "internet", "server", "user")

# Only addresses reserved for such uses: 100.64.0.0/10 is the "shared address space" that carriers
# use behind their own NATs (never routed on the internet), 203.0.113.0/24 is for documentation.
HOME_IP = "100.64.0.2"
ROUTER_LAN_IP = "100.64.0.1"
ROUTER_WAN_IP = "203.0.113.1"  # the home's only public address
SERVER_IP = "203.0.113.10"
USER_IP = "203.0.113.20"
APP_PORT = 8000
# The lab's stage has no proxy port (users are streams from stage 8 on); PROXY_PORT is stages 2 and 3's,
# for the link lab's tests of them (tests/test_real_links.py).
CONTROL_PORT, PUBLIC_PORT, PROXY_PORT = 60623, 60624, 60625

STEP_TIMEOUT = 10.0  # the most any one step (a process starting, a page arriving) may take
DROP_WAIT = 1.5  # how long a user waits for an answer before calling the attempt "dropped"
PARALLEL_USERS = 8
APP_GREETING = "Hello from the home network"

# --8<-- [start:router-rules]
# The home router's rules, the way most home routers behave: hide the home network behind the router's
# public address (masquerade), let the home start any connection, and let in only replies to those.
# The explicit counted drops let the lab prove that the router, not something else, dropped a packet.
ROUTER_RULES = """\
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" masquerade
    }
}
table ip filter {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
        iifname "lan0" accept
        iifname "wan0" counter drop
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
        iifname "wan0" counter drop
    }
}
"""
# --8<-- [end:router-rules]

Say = Callable[[str], None]


class LabError(Exception):
    """A lab command failed or a step did not happen in time."""


def probe(
    tools: tuple[tuple[str, str], ...] = (("ip", "iproute2"), ("nft", "nftables")), prefix: str = PREFIX
) -> str | None:
    """None if this process can build a lab, else the reason it cannot (for a skip or an error line).

    `tools` are the (command, Debian package) pairs the lab runs; the NAT lab's by default.
    """
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    for tool, package in tools:
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {package})"
    # Really try: a uid check alone would pass for a root without CAP_SYS_ADMIN (a container).
    name = f"{prefix}probe-{secrets.token_hex(3)}"
    made = _quiet("ip", "netns", "add", name)
    if made.returncode != 0:
        why = made.stderr.strip() or "ip netns add failed"
        return f"cannot create a network namespace ({why}); it needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    _quiet("ip", "netns", "del", name)
    return None


def _quiet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)


def lab_namespaces(run_id: str = "", prefix: str = PREFIX) -> list[str]:
    """The lab namespaces that exist now (of one run, or of every run)."""
    listing = _quiet("ip", "netns", "list").stdout
    names = [line.split()[0] for line in listing.splitlines() if line.strip()]
    return [name for name in names if name.startswith(f"{prefix}{run_id}")]


def namespace_pids(name: str) -> list[int]:
    """The processes running inside a namespace, as the kernel sees them."""
    return [int(pid) for pid in _quiet("ip", "netns", "pids", name).stdout.split()]


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (and is not a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _hear_ctrl_c() -> None:
    # A program started from a background shell job inherits "ignore SIGINT", and Python then never
    # raises KeyboardInterrupt: stop() could not end it politely. Undo that in the child, before exec.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LabProcess:
    """A program running inside one namespace, its output collected line by line."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, helper: bool = False) -> None:
        self.name = name
        self.helper = helper  # a short-lived helper (a fetch), not one of the story's programs
        self.process = process
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        # Always drain the output: a program blocked on a full pipe would look like a network bug.
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while raw := await self.process.stdout.readline():
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._new_line.set()
        self._new_line.set()

    async def expect(self, pattern: str, timeout: float = STEP_TIMEOUT, after: int = 0) -> str:
        """Wait for an output line matching `pattern` (lines from index `after` on count) and return it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            self._new_line.clear()
            for line in self.lines[after:]:
                if regex.search(line):
                    return line
            if self._reader.done():
                raise LabError(f"{self.name} exited before printing {pattern!r}:\n{self.output}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._new_line.wait()
            if time.monotonic() >= deadline:
                raise LabError(f"{self.name} did not print {pattern!r} in {timeout}s:\n{self.output}")

    async def stop(self) -> int:
        """Ctrl-C (SIGINT) as a user would press it; then SIGTERM, then SIGKILL if it does not end in time."""
        for signum, grace in ((signal.SIGINT, 3.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, STEP_TIMEOUT)):
            if self.process.returncode is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.process.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await self._reader
        self._reader.cancel()
        return self.process.returncode or 0

    @property
    def output(self) -> str:
        """Everything the program printed."""
        return "\n".join(f"  {self.name} | {line}" for line in self.lines)


@dataclass
class Teardown:
    """What tearing the lab down did and found."""

    exit_codes: dict[str, int] = field(default_factory=dict)
    stragglers: list[int] = field(default_factory=list)  # processes still inside a namespace after stop()
    namespaces_left: list[str] = field(default_factory=list)
    processes_left: list[int] = field(default_factory=list)
    seconds: float = 0.0


class Lab:
    """The five namespaces, wired and firewalled; `async with Lab() as lab:` builds it and always removes it.

    Another lab reuses the machinery (start programs inside, stop them, delete the namespaces, check
    that nothing is left) by setting `prefix` and `roles` and overriding `_build`.
    """

    prefix = PREFIX
    roles = ROLES

    def __init__(self, say: Say = print) -> None:
        self.say = say
        self.run_id = secrets.token_hex(3)
        # Namespace names are global on the machine, so each run gets its own; interface names live
        # inside the namespaces (all created here, fresh), so they can be the readable eth0, lan0, wan0.
        self.ns = {role: f"{self.prefix}{self.run_id}-{role}" for role in self.roles}
        self.processes: list[LabProcess] = []
        self.started_pids: list[int] = []
        self.teardown: Teardown | None = None
        self._made: list[str] = []
        self._app_dir: Path | None = None

    async def __aenter__(self) -> "Lab":
        try:
            await self._build()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def run(self, *args: str, stdin: str | None = None, show: bool = True) -> str:
        """Run one setup command (printed like a shell line) and return its output; raise if it fails."""
        if show:
            self.say(f"  $ {' '.join(args)}" + (" <<EOF (the rules above)" if stdin else ""))
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                out, err = await process.communicate(stdin.encode() if stdin else None)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise LabError(f"{' '.join(args)} did not finish in {STEP_TIMEOUT:g}s") from None
        if process.returncode != 0:
            raise LabError(f"{' '.join(args)} failed: {err.decode().strip()}")
        return out.decode()

    async def _build(self) -> None:
        self._app_dir = Path(tempfile.mkdtemp(prefix="natlab-app-"))
        ns = self.ns
        for name in ns.values():
            await self.run("ip", "netns", "add", name)
            self._made.append(name)
            await self.run("ip", "-n", name, "link", "set", "lo", "up", show=False)  # lo is down in a new one
        self.say("  (and `ip -n NS link set lo up` in each: loopback starts down in a new namespace)")
        # Cables: a veth pair is created in one namespace with its other end placed in another.
        await self.run("ip", "-n", ns["internet"], "link", "add", "br0", "type", "bridge")
        await self.run("ip", "-n", ns["internet"], "link", "set", "br0", "up")
        cables = [("home", "eth0", "router", "lan0"), ("router", "wan0", "internet", "port-router")]
        cables += [(host, "eth0", "internet", f"port-{host}") for host in ("server", "user")]
        for left, left_if, right, right_if in cables:
            peer = ["peer", "name", right_if, "netns", ns[right]]
            await self.run("ip", "-n", ns[left], "link", "add", left_if, "type", "veth", *peer)
            if right == "internet":
                await self.run("ip", "-n", ns[right], "link", "set", right_if, "master", "br0", "up")
        addresses = [
            ("home", "eth0", HOME_IP),
            ("router", "lan0", ROUTER_LAN_IP),
            ("router", "wan0", ROUTER_WAN_IP),
            ("server", "eth0", SERVER_IP),
            ("user", "eth0", USER_IP),
        ]
        for host, interface, address in addresses:
            await self.run("ip", "-n", ns[host], "addr", "add", f"{address}/24", "dev", interface)
            await self.run("ip", "-n", ns[host], "link", "set", interface, "up")
        # Home sends everything it cannot reach directly to its router; the internet hosts only know
        # their own segment, as no internet router knows a route to a home's private addresses.
        await self.run("ip", "-n", ns["home"], "route", "add", "default", "via", ROUTER_LAN_IP)
        await self.run("ip", "netns", "exec", ns["router"], "sysctl", "-qw", "net.ipv4.ip_forward=1")  # 0 in a new ns
        self.say("  router rules (nft):")
        for line in ROUTER_RULES.splitlines():
            self.say(f"    {line}")
        await self.run("ip", "netns", "exec", ns["router"], "nft", "-f", "-", stdin=ROUTER_RULES)

    async def start(
        self, role: str, name: str, *args: str, env: dict[str, str] | None = None, helper: bool = False
    ) -> LabProcess:
        """Start `python -u ARGS` inside the namespace of `role`; its output is collected."""
        # -P: the working directory (the repository) is not put first on sys.path, so that in
        # workshop mode (--stage-dir) the stage comes from PYTHONPATH, the learner's copy; the
        # repository and tests/ go last there, for the labs' own helper programs (run as
        # scripts, which -P no longer lets import their neighbours) and a run outside pytest.
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT), str(HERE.parent)]))
        process = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.ns[role], sys.executable, "-u", "-P", *args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": path, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own session: a Ctrl-C in the terminal reaches only the lab, which then stops
            # everything in order instead of every program dying at once.
            start_new_session=True,
            preexec_fn=_hear_ctrl_c if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else None,
        )  # fmt: skip
        self.started_pids.append(process.pid)  # `ip netns exec` execs the program: same pid
        lab_process = LabProcess(name, process, helper)
        self.processes.append(lab_process)
        return lab_process

    async def fetch(self, role: str, *urls: str, timeout: float = STEP_TIMEOUT) -> list[dict[str, Any]]:
        """GET each URL at once from inside the namespace of `role`; one result dict per URL."""
        helper = await self.start(role, f"{role} (fetch)", str(HERE), "_fetch", str(timeout), *urls, helper=True)
        async with asyncio.timeout(timeout + STEP_TIMEOUT):
            await helper.process.wait()
            await helper.stop()
        results = [json.loads(line) for line in helper.lines if line.startswith("{")]
        if len(results) != len(urls):
            raise LabError(f"the fetch helper failed:\n{helper.output}")
        return results

    async def dropped(self, chain: str) -> int:
        """How many packets from the internet the router's `chain` has dropped so far."""
        rules = await self.run(
            "ip", "netns", "exec", self.ns["router"], "nft", "list", "chain", "ip", "filter", chain, show=False
        )
        match = re.search(r'iifname "wan0" counter packets (\d+)', rules)
        if match is None:
            raise LabError(f"no drop counter in the router's {chain} chain:\n{rules}")
        return int(match[1])

    async def connections(self, role: str, port: int) -> list[str]:
        """The established TCP connections to or from `port` in `role`'s namespace, as `local -> peer`."""
        out = await self.run(
            "ip", "netns", "exec", self.ns[role], "ss", "-Htn", "state", "established",
            f"( sport = :{port} or dport = :{port} )", show=False,
        )  # fmt: skip
        return [" -> ".join(line.split()[-2:]) for line in out.splitlines() if line.strip()]

    def app_dir(self) -> Path:
        """The folder the home app serves."""
        assert self._app_dir is not None, "use the lab inside `async with`"
        return self._app_dir

    async def close(self) -> Teardown:
        """Stop every program first, then delete the namespaces, then check that nothing is left."""
        if self.teardown is not None:
            return self.teardown
        started = time.monotonic()
        result = self.teardown = Teardown()
        for lab_process in reversed(self.processes):
            code = await lab_process.stop()
            if not lab_process.helper:
                result.exit_codes[lab_process.name] = code
        # Deleting a namespace with a process inside removes only its name: the process and its
        # network live on, invisible. So ask the kernel what still runs in each namespace.
        for name in self._made:
            for pid in namespace_pids(name):
                result.stragglers.append(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in reversed(self._made):
            _quiet("ip", "netns", "del", name)
        if self._app_dir is not None:
            shutil.rmtree(self._app_dir, ignore_errors=True)
        result.namespaces_left = lab_namespaces(self.run_id, self.prefix)
        result.processes_left = [pid for pid in self.started_pids + result.stragglers if pid_alive(pid)]
        result.seconds = time.monotonic() - started
        return result


def cleanup(say: Say = print) -> int:
    """Remove every lab namespace (and what runs inside) left by runs that could not clean up (SIGKILL)."""
    names = lab_namespaces()
    for name in names:
        for pid in namespace_pids(name):
            say(f"killing process {pid} in {name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _quiet("ip", "netns", "del", name)
        say(f"deleted namespace {name}")
    say(f"{len(names)} lab namespace(s) removed; left now: {len(lab_namespaces())}")
    return 0


@dataclass
class Story:
    """What each step of the story observed; the command and the test judge the same facts."""

    at_home: dict[str, Any]  # the home app, fetched at home: it works
    direct: dict[str, dict[str, Any]]  # the user's direct attempts, by kind
    dropped: dict[str, int]  # packets from the internet the router dropped, by chain
    peer_line: str  # the server's log line naming the client's address
    home_view: list[str]  # the control connection as home sees it (local -> peer)
    server_view: list[str]  # ... and as the server sees it
    page: dict[str, Any]  # the user's fetch of the server's public port
    app_line: str  # the home app's log line for that request
    parallel: list[dict[str, Any]]  # several users at once, each asking for their own page
    server: LabProcess
    client: LabProcess

    def failures(self) -> list[str]:
        """Every way this run differs from the story's claims (empty: the story held)."""
        wrong = []
        if self.at_home["status"] != 200:
            wrong.append(f"the home app does not work at home: {describe(self.at_home)}")
        wrong += [
            f"direct attempt {kind} got through: {describe(r)}" for kind, r in self.direct.items() if not r["error"]
        ]
        wrong += [f"the router's {chain} chain dropped nothing" for chain, n in self.dropped.items() if n == 0]
        if not any(ROUTER_WAN_IP in line for line in self.server_view):
            wrong.append(f"the server did not see the router's address: {self.server_view}")
        if any(HOME_IP in line for line in self.server.lines + self.server_view):
            wrong.append("the server saw the home address")
        if any("WARNING" in line for line in self.server.lines):
            wrong.append("the server warned about its exposure")
        if APP_GREETING not in self.page["body"]:
            wrong.append(f"the page did not arrive through the tunnel: {describe(self.page)}")
        for number, result in enumerate(self.parallel, 1):
            if result["body"] != user_page(number):
                wrong.append(f"parallel user {number} did not get their own page: {describe(result)}")
        return wrong


def user_page(number: int) -> str:
    """The page the home app serves to parallel user `number` (different for each)."""
    return f"you are user {number}\n"


def describe(result: dict[str, Any]) -> str:
    """A fetch result in a few words."""
    if result["error"]:
        return f"failed: {result['error']}"
    # A page is shown by its heading, any other body by its first words.
    heading = re.search(r"<h1>(.*?)</h1>", result["body"])
    text = heading[1] if heading else " ".join(result["body"].split())[:60]
    return f"{result['status']}, {text!r}"


async def story(lab: Lab) -> Story:
    """Steps (a) to (d): direct fails, the tunnel connects out through the NAT, the user gets the page."""
    say = lab.say
    app_dir = lab.app_dir()
    (app_dir / "index.html").write_text(f"<!doctype html><title>home app</title><h1>{APP_GREETING}</h1>\n")
    for number in range(1, PARALLEL_USERS + 1):
        (app_dir / f"user-{number}.txt").write_text(user_page(number))

    say("")
    say("[a] The user tries to reach the home app directly")
    app = await lab.start("home", "app", "-m", "http.server", str(APP_PORT), "--directory", str(app_dir))
    await app.expect(r"Serving HTTP")
    home_url = f"http://{HOME_IP}:{APP_PORT}/"
    [at_home] = await lab.fetch("home", home_url)
    say(f"  home   GET {home_url} -> {describe(at_home)}  (the app works, at home)")
    before = {chain: await lab.dropped(chain) for chain in ("input", "forward")}
    router_url = f"http://{ROUTER_WAN_IP}:{APP_PORT}/"
    unrouted, at_router = await lab.fetch("user", home_url, router_url, timeout=DROP_WAIT)
    say(f"  user   GET {home_url} -> {describe(unrouted)}")
    say("         no internet router has a route to a home's private address")
    say(f"  user   GET {router_url} -> {describe(at_router)}")
    input_drops = await lab.dropped("input") - before["input"]
    say(f"         the home's public address is the router's; it dropped {input_drops} packet(s) (input chain)")
    say("  even if the internet routed the home's address to the router:")
    await lab.run("ip", "-n", lab.ns["user"], "route", "add", "100.64.0.0/10", "via", ROUTER_WAN_IP)
    [routed] = await lab.fetch("user", home_url, timeout=DROP_WAIT)
    say(f"  user   GET {home_url} -> {describe(routed)}")
    forward_drops = await lab.dropped("forward") - before["forward"]
    say(f"         the router's firewall dropped {forward_drops} packet(s) (forward chain: unsolicited inbound)")
    await lab.run("ip", "-n", lab.ns["user"], "route", "del", "100.64.0.0/10")

    say("")
    say("[b] The tunnel server starts on the server host, on its public address")
    # The secret travels in the environment, not on the command line, where `ps` would show it.
    env = {"NGROK_SECRET": secrets.token_urlsafe(16)}
    ports = ["--control-port", str(CONTROL_PORT), "--public-port", str(PUBLIC_PORT)]
    say(f"  server$ NGROK_SECRET=... python3 -m {TUNNEL}.server --host {SERVER_IP}")
    server = await lab.start("server", "server", "-m", f"{TUNNEL}.server", "--host", SERVER_IP, *ports, env=env)
    for role in ("control", "public"):
        say(f"  server | {await server.expect(rf'{role} port listening on {re.escape(SERVER_IP)}:')}")
    say("  (it has a secret, so no 'listening without a secret' warning: only a client that knows it gets in)")

    say("")
    say("[c] The client at home connects out through the NAT; the server sees the router's address")
    say(f"  home$ NGROK_SECRET=... python3 -m {TUNNEL}.client 127.0.0.1:{APP_PORT} {SERVER_IP}")
    client_ports = ["--control-port", str(CONTROL_PORT)]
    local = f"127.0.0.1:{APP_PORT}"
    client = await lab.start("home", "client", "-m", f"{TUNNEL}.client", local, SERVER_IP, *client_ports, env=env)
    say(f"  client | {await client.expect(r'tunnel up')}")
    peer_line = await server.expect(rf"{re.escape(ROUTER_WAN_IP)}:\d+: client connected")
    say(f"  server | {peer_line}")
    home_view = await lab.connections("home", CONTROL_PORT)
    server_view = await lab.connections("server", CONTROL_PORT)
    say(f"  the control connection as home sees it:       {', '.join(home_view)}")
    say(f"  the same connection as the server sees it:    {', '.join(server_view)}")
    say("  the router rewrote the home's address to its own on the way out (masquerade)")

    say("")
    say("[d] The user fetches the server's public port and gets the home app's page")
    public_url = f"http://{SERVER_IP}:{PUBLIC_PORT}/"
    seen_app, seen_server = len(app.lines), len(server.lines)
    [page] = await lab.fetch("user", public_url)
    say(f"  user   GET {public_url} -> {describe(page)}")
    # The server's line for this user's connection: stage 11 logs each stream it closes, with its bytes
    # each way; stage 12 on, one line per request (`GET / -> 200, ...`) with the same counts.
    user_line = await server.expect(rf"{re.escape(USER_IP)}:\d+: .*\d+ bytes up", after=seen_server)
    say(f"  server | {user_line}")
    app_line = await app.expect(r'"GET / ', after=seen_app)
    say(f"  app    | {app_line.strip()}")
    say("         the app sees the request come from the tunnel client at home, not from the user")
    urls = [f"{public_url}user-{number}.txt" for number in range(1, PARALLEL_USERS + 1)]
    parallel = await lab.fetch("user", *urls)
    own = sum(result["body"] == user_page(number) for number, result in enumerate(parallel, 1))
    say(f"  {PARALLEL_USERS} users at once, each GET /user-N.txt -> {own} of {PARALLEL_USERS} got their own page")
    return Story(
        at_home=at_home,
        direct={"home address": unrouted, "router address": at_router, "routed to the router": routed},
        dropped={"input": input_drops, "forward": forward_drops},
        peer_line=peer_line,
        home_view=home_view,
        server_view=server_view,
        page=page,
        app_line=app_line,
        parallel=parallel,
        server=server,
        client=client,
    )


def report_teardown(lab: Lab) -> None:
    """Step (e): what stopping and deleting everything did, and the proof that nothing is left."""
    result = lab.teardown
    assert result is not None
    say = lab.say
    say("")
    say("[e] Teardown: stop the programs, then delete the namespaces, then look for leftovers")
    stopped = ", ".join(f"{name} (exit {code})" for name, code in result.exit_codes.items()) or "none"
    say(f"  stopped: {stopped}")
    if result.stragglers:
        say(f"  killed {len(result.stragglers)} process(es) still inside a namespace: {result.stragglers}")
    say(f"  namespaces of this run left: {', '.join(result.namespaces_left) or 'none'}")
    left = ", ".join(map(str, result.processes_left)) or "none"
    say(f"  processes left (of {len(lab.started_pids)} started): {left}")
    say(f"  torn down in {result.seconds:.2f} s")


async def run_lab(say: Say) -> bool:
    """The whole story as the command runs it; True if every claim held and nothing was left."""
    with contextlib.suppress(NotImplementedError, RuntimeError):
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)  # like Ctrl-C
    lab = Lab(say)
    say(f"NAT lab run {lab.run_id}: namespaces {', '.join(lab.ns.values())}")
    say("")
    say("[build] A home behind a NAT router, and the internet: a switch with a server host and a user host")
    wrong: list[str] = []
    try:
        started = time.monotonic()
        async with lab:
            say(f"  built in {time.monotonic() - started:.2f} s")
            told = await story(lab)
        wrong += told.failures()
    except LabError as exc:
        wrong.append(str(exc))
    finally:
        if lab.teardown is not None:
            report_teardown(lab)
    assert lab.teardown is not None
    if lab.teardown.namespaces_left or lab.teardown.processes_left:
        wrong.append("something was left behind")
    say("")
    if wrong:
        say("RESULT: FAILED")
        for problem in wrong:
            say(f"  - {problem}")
        return False
    say("RESULT: a direct connection fails, the tunnel works, nothing is left behind")
    return True


async def _fetch_one(url: str, timeout: float) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    result: dict[str, Any] = {"url": url, "status": 0, "body": "", "error": ""}
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            try:
                writer.write(f"GET {parts.path or '/'} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
                response = await reader.read()  # HTTP/1.0: the server closes after the response
            finally:
                writer.close()
    except TimeoutError:
        result["error"] = f"no answer in {timeout:g} s"
        return result
    except OSError as exc:
        result["error"] = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        return result
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/") else b"0"
    result.update(status=int(status), body=body.decode(errors="replace"))
    return result


async def fetch_main(timeout: float, urls: list[str]) -> int:
    """The fetch helper the lab runs inside a namespace: GET every URL at once, print one JSON line each."""
    results = await asyncio.gather(*(_fetch_one(url, timeout) for url in urls))
    for result in results:
        print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m tests.nat_lab [--transcript FILE] [--cleanup]."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_fetch"]:  # internal: the lab's own HTTP client, run inside a namespace
        return asyncio.run(fetch_main(float(argv[1]), argv[2:]))
    parser = argparse.ArgumentParser(
        prog="python -m tests.nat_lab",
        description="Build a home NAT in network namespaces and show that a direct connection fails "
        "while the tunnel works; then remove everything. Needs root.",
    )
    parser.add_argument("--transcript", type=Path, metavar="FILE", help="also write the output to FILE on success")
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="remove what a killed (SIGKILL) run left: every lab namespace and the processes in it; "
        "not while another lab runs",
    )
    args = parser.parse_args(argv)
    if (reason := probe()) is not None:
        print(f"error: {reason}: try `sudo make nat-lab`", file=sys.stderr)
        return 1
    if args.cleanup:
        return cleanup()
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started as a background job: still stop on SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        ok = asyncio.run(run_lab(say))
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); the lab was torn down", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("terminated (SIGTERM); the lab was torn down", file=sys.stderr)
        return 143
    if ok and args.transcript:
        args.transcript.write_text("\n".join(lines) + "\n")
        print(f"transcript written to {args.transcript}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
