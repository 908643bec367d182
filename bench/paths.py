"""The paths under test, each a set of real processes started from the command line.

- `direct`: no relay at all, the load talks to the origin;
- `socat`: the reference relay, written in C, one forked process per connection;
- `stage_0`: `python3 -m stage_0.client ORIGIN --port 0`;
- `stage_3`: `python3 -m stage_3.server` plus `python3 -m stage_3.client ORIGIN`, the whole tunnel;
- `stage_8`: the same two programs of stage 8: every user a stream over the client's one
  connection, no proxy port; "not present" while the repository has no stage_8/;
- `stage_13`: stage 13's server and client (streams with flow control, resume and the limits),
  with a secret on both sides as its README recommends (in NGROK_SECRET, out of the command line);
- `stage_16`: stage 16's server and client with TLS on the client's connection (a private CA and
  a server certificate made for each start by `stage_16.certs`, in the path's temp dir) and a
  secret; the client asks for a TCP tunnel (`--tcp`), a public port of its own, read from the
  server's "tcp port listening on" line: a TCP forward, as `ssh -R` is, that any load tool
  reaches without a Host header;
- `stage_22`: stage 16's setup (TLS on the client's link, a TCP tunnel, a secret) for stage 22, once
  per event loop: `--loop asyncio` and `--loop uvloop` on both programs, each a path of its own
  ("stage 22 asyncio", "stage 22 uvloop"), checked in their "event loop: NAME" log lines; the
  inspector is on, as it is by default, with its page on port 0 (two tunnels run side by side);
- `ssh`: OpenSSH's remote forward, the tunnel most developers already have: a throwaway
  `sshd` on a loopback port (host key, user key and config in a temp dir, no PAM, forwarding
  only) and `ssh -N -R 0:ORIGIN` as the client; skipped, with the reason, where it is missing.

A path can be started with a slow link between its client and its server (`link_delay`): the
client then dials `bench.link`, which delays every chunk each way (this kernel has no netem).

Every process runs in its own session with its output in a log file: a busy relay
logs a line per connection, and a pipe nobody reads would block it. Its ports are
read from its "<role> port listening on HOST:PORT" lines.
"""

import contextlib
import getpass
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The ladder (tests/support.py): frames from stage 4, streams over one connection from 5, auth from 11, the limits in
# 13, TLS from 16. Issues 17 and 14 set their goals for "stage 5" and "stage 6": stage_13 and stage_16 now.
STAGES = ("stage_0", "stage_1", "stage_2", "stage_3", "stage_8", "stage_13", "stage_16", "stage_22")
# stages measured as a whole tunnel: server + client
TUNNELS = ("stage_3", "stage_8", "stage_13", "stage_16", "stage_22")
TUNNEL_ROLES = {stage: ("control", "public") for stage in TUNNELS[1:]}  # no proxy port from 4 on
DEFAULT_ROLES = ("control", "public", "proxy")
TLS = ("stage_16", "stage_22")  # TLS on the client's link: certificates made per start, a TCP tunnel's own port
SECRET = "bench-secret-not-for-real-use"
SECRETS = {"stage_13": SECRET, "stage_16": SECRET, "stage_22": SECRET}  # stages with auth (7 on) run with a secret
# Stage 22 (issue 26) runs on either event loop: each loop is a path of its own, `--loop` on both programs.
LOOPS = {"stage_22": ("asyncio", "uvloop")}
# From stage 13 a server lets one source address hold 256 streams (issue 23): every user of the bench comes from
# 127.0.0.1, and the idle scenario holds 1000 at once, so the servers let one address hold them all.
SERVER_FLAGS: dict[str, tuple[str, ...]] = {
    stage: ("--max-streams-per-address", "2048") for stage in ("stage_13", "stage_16", "stage_22")
}
SERVER_FLAGS["stage_22"] += ("--tls-port", "0")  # its TLS tunnels' port (stage 21 on), unused here: any free one
# The client's inspector is on by default from stage 18: its page on a free port, so that two run side by side.
CLIENT_FLAGS = {"stage_22": ("--inspect-port", "0")}
LOOP_LOGGED = r"event loop: {loop}\b"  # what stage 22's programs log once they know their loop
UVLOOP_INSTALL = "pip install uvloop==0.21.0, the version the test extras pin"
LINKED = (*TUNNELS, "ssh")  # paths with a client-server link that can be slowed down
HOST = "127.0.0.1"
START_TIMEOUT = 15.0
LISTENING = r"\b{role} port listening on (\S+):(\d+)"
SOCAT_LISTENING = r"listening on AF=2 (\S+):(\d+)"
LINK_LISTENING = r"link to \S+:{port} listening on (\S+):(\d+)"
SSHD_LISTENING = r"Server listening on 127\.0\.0\.1 port (\d+)"
SSH_ALLOCATED = r"Allocated port (\d+) for remote forward"
SSH_INSTALL = "apt-get install openssh-server openssh-client"
# sshd for the bench: key auth only, no PAM, no shell, remote forwards to loopback only.
SSHD_CONFIG = """\
ListenAddress 127.0.0.1
Port {port}
HostKey {work}/host_ed25519
AuthorizedKeysFile {work}/authorized_keys
PidFile none
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {user}
AllowTcpForwarding remote
GatewayPorts no
AllowAgentForwarding no
AllowStreamLocalForwarding no
X11Forwarding no
PermitTTY no
PermitUserRC no
ForceCommand /bin/false
LogLevel INFO
"""


class PathUnavailable(Exception):
    """A path could not be started (e.g. its stage is not written yet); the message says why."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (`kill`, `timeout`, a cancelled CI job, a closed terminal): stop as on Ctrl-C.

    A KeyboardInterrupt, so that it unwinds exactly as Ctrl-C does: past every `except Exception`
    (one failed measurement must not end a run, a stop must), through asyncio's event loop and
    `subprocess.run` (which kills its child on the way out), running every `finally` that stops a
    path's processes. Left unhandled, these signals end the bench at once and nothing stops them.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


def stop_on_termination() -> None:
    """From now on, SIGTERM and SIGHUP raise Stopped in the main thread, wherever it is."""

    def stop(signum: int, frame: object) -> None:
        # Once: a second one (a CI runner's repeated TERM) must not cut short the clean-up.
        for name in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(name, signal.SIG_IGN)
        raise Stopped(signum)

    for name in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(name) is not signal.SIG_IGN:  # `nohup python -m bench`: SIGHUP stays ignored
            signal.signal(name, stop)


# The signals that stop a run: Process.start holds them back while it starts a program and records it.
STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _default_sigint() -> None:
    # A process started from a non-interactive shell's background job inherits
    # SIGINT as "ignored", and Python then never raises KeyboardInterrupt: undo that
    # so that Ctrl-C (SIGINT) stops a stage cleanly, as it would for a user.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # held back in the parent (Process.start), not here


@dataclass
class Process:
    """One started program, its log file, and helpers to read its state from /proc."""

    role: str
    popen: "subprocess.Popen[bytes]"
    log_path: Path

    @classmethod
    def start(
        cls,
        role: str,
        argv: list[str],
        log_dir: Path,
        cwd: Path,
        env: dict[str, str],
        into: "list[Process] | None" = None,
    ) -> "Process":
        """Start `argv` in its own session, output to `log_dir/<role>.log`; append it to `into`.

        Ctrl-C or SIGTERM is held back until the program is in `into`, whoever stops that list: a
        stop that came between the fork and the append would leave a program nobody knows of.
        """
        log_path = log_dir / f"{role.replace(' ', '-')}.log"
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            with log_path.open("wb") as log_file:
                popen = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_default_sigint,
                )
            process = cls(role, popen, log_path)
            if into is not None:
                into.append(process)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop that came meanwhile is raised here
        return process

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Poll the log until a line matches `pattern`; fail with the log's tail otherwise."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := regex.search(self.log()):
                return match
            if self.popen.poll() is not None:
                raise PathUnavailable(f"{self.role} exited with code {self.popen.returncode}: {self._tail()}")
            time.sleep(0.02)
        raise PathUnavailable(f"{self.role} did not print {pattern!r} within {timeout:.0f}s: {self._tail()}")

    def _tail(self) -> str:
        lines = self.log().strip().splitlines()
        return " | ".join(lines[-3:]) or "(no output)"

    def stop(self) -> None:
        """Ctrl-C the whole session (socat's forked children too), then SIGKILL after a grace period.

        Descendants that left the session (sshd's per-connection children call setsid) are
        found beforehand by their parent links and killed by PID, if still the same process.
        """
        strays = [(pid, _start_time(pid)) for pid in self.tree()[1:]] if self.popen.poll() is None else []
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        # socat's children may outlive their parent for a moment: reap the session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        for pid, started in strays:
            if started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def tree(self) -> list[int]:
        """This process and all its descendants (socat forks one child per connection)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def memory_kib(self) -> dict[str, int]:
        """Resident (VmRSS) and proportional (Pss) memory of the process tree, in KiB."""
        rss = pss = 0
        for pid in self.tree():
            with contextlib.suppress(OSError, ValueError, IndexError):
                rss += _field_kib(Path(f"/proc/{pid}/status").read_text(), "VmRSS:")
                pss += _field_kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss:")
        return {"rss": rss, "pss": pss}

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the process tree, reaped children included."""
        ticks = os.sysconf("SC_CLK_TCK")
        user = system = 0.0
        for pid in self.tree():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                # utime, stime, cutime, cstime: fields 14-17 of proc(5), counted here after the comm
                user += (int(fields[11]) + int(fields[13])) / ticks
                system += (int(fields[12]) + int(fields[14])) / ticks
        return user, system


def uvloop_site() -> str | None:
    """The folder uvloop is imported from (site-packages), or None where it is not installed.

    The stages run with `python -S` (no site-packages, stage code is stdlib only): a path on
    uvloop gets this one folder on its PYTHONPATH instead; `-S` still keeps `.pth` files out.
    """
    spec = importlib.util.find_spec("uvloop")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


def _start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None if it is gone: tells a PID reused."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _field_kib(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    raise ValueError(name)


@dataclass
class PathUnderTest:
    """One way of reaching the origin; `start()` gives the address the load should use."""

    label: str
    kind: str  # direct | socat | ssh | stage_0 | one of TUNNELS
    loop: str | None = None  # the event loop of a stage in LOOPS: asyncio or uvloop
    stage_dir: Path | None = None  # a copy of the stage to run instead of the repository's
    address: tuple[str, int] = (HOST, 0)
    processes: list[Process] = field(default_factory=list)
    profile_dir: Path | None = None
    socat_buffer: int = 256 * 1024
    link_delay: float = 0.0  # seconds added each way between the client and the server (bench.link)
    origin: tuple[str, int] = (HOST, 0)  # where the path leads, once started
    helpers: list[Process] = field(default_factory=list)  # the slow link: not part of the path's cost
    _work: Path | None = None
    _starts: int = 0

    def start(self, origin: tuple[str, int]) -> None:
        """Start the path's programs in front of `origin` and wait until they listen."""
        self._starts += 1
        self.origin = origin
        self._work = Path(tempfile.mkdtemp(prefix=f"bench-{self.kind}-"))
        try:
            self._start(origin)
        except BaseException:
            self.stop()
            raise

    def _start(self, origin: tuple[str, int]) -> None:
        target = f"{origin[0]}:{origin[1]}"
        if self.kind == "direct":
            self.address = origin
        elif self.kind == "socat":
            listen = f"TCP-LISTEN:0,bind={HOST},reuseaddr,fork,backlog=1024"
            argv = ["socat", "-d", "-d", f"-b{self.socat_buffer}", listen, f"TCP:{target}"]
            relay = self._spawn("", argv)
            match = relay.wait_for(SOCAT_LISTENING)
            self.address = (match[1], int(match[2]))
        elif self.kind == "stage_0":
            relay = self._spawn("", self._python("stage_0.client", target, "--host", HOST, "--port", "0"))
            self.address = (HOST, int(relay.wait_for(LISTENING.format(role="proxy"))[2]))
        elif self.kind in TUNNELS:
            if self.stage_dir is None and not (ROOT / self.kind / "__init__.py").is_file():
                raise PathUnavailable(f"not present: the repository has no {self.kind}/ yet")
            if self.loop == "uvloop" and uvloop_site() is None:
                raise PathUnavailable(f"not installed: uvloop ({UVLOOP_INSTALL})")
            roles = TUNNEL_ROLES.get(self.kind, DEFAULT_ROLES)
            ports = [arg for role in roles for arg in (f"--{role}-port", "0")]
            server_tls, client_tls = self._certificates() if self.kind in TLS else ([], [])
            loop = ["--loop", self.loop] if self.loop else []
            server_flags = [*server_tls, *SERVER_FLAGS.get(self.kind, ()), *loop]
            server_argv = self._python(f"{self.kind}.server", "--host", HOST, *ports, *server_flags)
            server = self._spawn("server", server_argv)
            bound = {role: int(server.wait_for(LISTENING.format(role=role))[2]) for role in roles}
            dialled = [role for role in roles if role != "public"]
            dial = zip(dialled, self._through_link([bound[role] for role in dialled]), strict=True)
            flags = [arg for role, port in dial for arg in (f"--{role}-port", str(port))]
            flags += [*client_tls, *CLIENT_FLAGS.get(self.kind, ()), *loop]
            client = self._spawn("client", self._python(f"{self.kind}.client", target, HOST, *flags))
            if self.kind in TLS:  # the TCP tunnel's port, bound once the client is in
                bound["public"] = int(server.wait_for(LISTENING.format(role="tcp"))[2])
            self.address = (HOST, bound["public"])
            for process in (server, client) if self.loop else ():  # the loop asked for, not a silent fallback
                process.wait_for(LOOP_LOGGED.format(loop=self.loop))
        elif self.kind == "ssh":
            self._start_ssh(origin)
        else:
            raise ValueError(f"unknown path kind {self.kind!r}")
        wait_until_served(self.address, self.processes)

    def _certificates(self) -> tuple[list[str], list[str]]:
        """A private CA and a server certificate for 127.0.0.1, made by the stage's certs module; the flags."""
        assert self._work is not None
        if not shutil.which("openssl"):
            raise PathUnavailable("not installed: openssl, which makes the certificates (apt-get install openssl)")
        certs = self._work / "certs"  # removed with the rest of the temp dir at stop
        argv = [sys.executable, "-S", "-m", f"{self.kind}.certs", str(certs), HOST]
        done = subprocess.run(
            argv, cwd=self._links(), env=self._env(), capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise PathUnavailable(f"{self.kind}.certs failed: {(done.stderr or done.stdout).strip()[-200:]}")
        server = ["--cert", str(certs / "server.pem"), "--key", str(certs / "server.key")]
        return server, ["--ca", str(certs / "ca.pem"), "--tcp"]

    def _through_link(self, ports: list[int]) -> list[int]:
        """The ports the client should dial to reach `ports`: the slow link's, when the path has one."""
        if not self.link_delay:
            return ports
        assert self._work is not None
        argv = [sys.executable, "-m", "bench.link", "--delay", str(self.link_delay)]
        argv += [arg for port in ports for arg in ("--to", f"{HOST}:{port}")]
        link = Process.start("link", argv, self._work, ROOT, {**os.environ, "PYTHONUNBUFFERED": "1"}, self.helpers)
        return [int(link.wait_for(LINK_LISTENING.format(port=port))[2]) for port in ports]

    def _start_ssh(self, origin: tuple[str, int]) -> None:
        """A throwaway sshd on a loopback port, and `ssh -N -R` to it: OpenSSH's remote forward."""
        assert self._work is not None
        sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
        missing = [name for name, found in (("sshd", sshd), ("ssh", shutil.which("ssh"))) if not found]
        if not shutil.which("ssh-keygen"):
            missing.append("ssh-keygen")
        if missing or sshd is None:
            raise PathUnavailable(f"not installed: {', '.join(missing)} ({SSH_INSTALL})")
        if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
            # Run as root, sshd wants its (empty) privilege separation directory; the service would make it.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for key in ("host_ed25519", "user_ed25519"):
            done = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(self._work / key)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if done.returncode != 0:
                raise PathUnavailable(f"ssh-keygen failed: {done.stderr.strip()[-200:]}")
        (self._work / "authorized_keys").write_text((self._work / "user_ed25519.pub").read_text())
        user = getpass.getuser()
        server = None
        for attempt in range(3):  # sshd cannot report an ephemeral port: pick a free one, retry if taken
            port = _free_port()
            config = self._work / "sshd_config"
            config.write_text(SSHD_CONFIG.format(port=port, work=self._work, user=user))
            server = self._spawn(f"sshd {attempt}" if attempt else "sshd", [sshd, "-D", "-e", "-f", str(config)])
            try:
                server.wait_for(SSHD_LISTENING)
                break
            except PathUnavailable:
                if "Address already in use" not in server.log() or attempt == 2:
                    raise
                server.stop()
                self.processes.remove(server)
        assert server is not None
        (ssh_port,) = self._through_link([port])
        argv = ["ssh", "-N", "-T", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"]
        argv += ["-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes", "-o", "IdentitiesOnly=yes"]
        argv += ["-i", str(self._work / "user_ed25519"), "-p", str(ssh_port), "-R", f"0:{origin[0]}:{origin[1]}"]
        client = self._spawn("client", [*argv, f"{user}@{HOST}"])
        self.address = (HOST, int(client.wait_for(SSH_ALLOCATED)[1]))

    def _python(self, module: str, *args: str) -> list[str]:
        # -S: no site-packages. Stage code needs only the standard library, and an
        # editable install of this project would otherwise quietly supply any
        # module missing from a --variant copy with the repository's own.
        if self.profile_dir is None:
            return [sys.executable, "-S", "-m", module, *args]
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{self.label.replace(' ', '_')}-{module}-{self._starts}.prof"
        return [sys.executable, "-S", "-m", "cProfile", "-o", str(out), "-m", module, *args]

    def _links(self) -> Path:
        """The folder of symlinks the stages are imported from, also the working directory.

        A copy given with --variant shadows the repository's stage there.
        """
        assert self._work is not None
        links = self._work / "stages"
        links.mkdir(exist_ok=True)
        for stage in STAGES:
            link = links / stage
            source = self.stage_dir if stage == self.kind and self.stage_dir else ROOT / stage
            if not link.is_symlink() and source.is_dir():
                link.symlink_to(source)
        return links

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONPATH": str(self._links()), "PYTHONUNBUFFERED": "1"}
        if self.kind in LOOPS and (site := uvloop_site()):  # both loops alike: only --loop differs
            env["PYTHONPATH"] += os.pathsep + site
        for name in ("NGROK_SECRET", "NGROK_LOOP"):  # set in the shell, they must not change what is measured
            env.pop(name, None)
        if secret := SECRETS.get(self.kind):
            env["NGROK_SECRET"] = secret
        return env

    def _spawn(self, part: str, argv: list[str]) -> Process:
        assert self._work is not None
        role = f"{self.label} {part}" if part else self.label  # e.g. "stage 3 server"
        return Process.start(role, argv, self._work, self._links(), self._env(), self.processes)

    def stop(self) -> None:
        """Stop every program of the path (Ctrl-C first, as a user would), then its slow link."""
        for process in [*reversed(self.processes), *self.helpers]:
            process.stop()
        self.processes = []
        self.helpers = []
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None


def _free_port() -> int:
    """A loopback port free right now (for programs that cannot listen on port 0 and say which)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def http_get(address: tuple[str, int], timeout: float = 5.0) -> bytes:
    """One HTTP/1.0 GET on a new connection; the whole response."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def wait_until_served(
    address: tuple[str, int],
    processes: list[Process],
    timeout: float = START_TIMEOUT,
    get: Callable[[tuple[str, int]], bytes] = http_get,
) -> None:
    """Retry a GET (`get`: HTTP, or HTTPS in bench.tlstunnel) until the origin's page comes back through the path
    (a tunnel needs its client connected)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                raise PathUnavailable(f"{process.role} exited with code {process.popen.returncode}: {process._tail()}")
        try:
            response = get(address)
            if response.startswith(b"HTTP/1.1 200") and response.endswith(b"local app</h1>\n"):
                return
            last = response[:60].decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise PathUnavailable(f"no page from the origin through {address[0]}:{address[1]} in {timeout:.0f}s ({last})")
