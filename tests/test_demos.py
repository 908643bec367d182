"""`python -m stage_N`, the one-command demo of every stage from 3 on: on a busy machine, and when stopped.

- Its usual ports taken (another program, or a connection that used one as its source port: they
  sit in Linux's ephemeral range), the demo says so, takes free ports instead, prints its public URL
  and serves a request through the tunnel; Ctrl-C then stops it cleanly: exit 0, "stopped", no
  traceback, no process left behind.
- SIGTERM (`kill`, `timeout`, a service manager, a cancelled CI job) stops it exactly as Ctrl-C does,
  even while it is making its certificates (stage 10 on): no `openssl` left running, no temporary
  folder left behind.

The usual ports are fixed, and shared with the whole machine (other tests run at the same time, and
a learner may be running a demo): each case runs in a private network namespace of its own. This
file is also the program that runs there (`unshare --net python tests/test_demos.py ...`): it brings
`lo` up, takes the ports, starts the demo as a learner would (`python -P -m stage_N`, so a workshop
copy given with --stage-dir is what runs), and checks it.
"""

import argparse
import asyncio
import ctypes
import functools
import importlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support import STEP_TIMEOUT, CliProcess, has, has_inspector, http_get

ROOT = Path(__file__).resolve().parent.parent
# Every stage with a demo (a __main__.py), in ladder order: a new stage joins by having one.
DEMOS = tuple(sorted((p.parent.name for p in ROOT.glob("stage_[0-9]*/__main__.py")), key=lambda name: int(name[6:])))
OPENSSL_DELAY = 0.5  # seconds the slowed-down openssl waits before it runs: time to send SIGTERM
RUN_TIMEOUT = 45.0  # one whole case, in its namespace: well under pytest-timeout's 60 s


@functools.cache
def netns_prefix() -> list[str] | None:
    """How to start a process in a new network namespace here (as root, or rootless), or None if this machine can't."""
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def run_in_namespace(tmp_path: Path, stage: str, *args: str) -> None:
    """Run this file's checks (`main` below) on `stage` in a new network namespace; fail with what they found."""
    prefix = netns_prefix()
    if prefix is None:
        pytest.skip("needs a private network namespace (unshare --net) so the demo's fixed ports are ours to take")
    if importlib.util.find_spec(f"{stage}.certs") and shutil.which("openssl") is None:
        pytest.skip(f"{stage}'s demo makes its certificates with openssl, which is not installed")
    argv = [*prefix, sys.executable, __file__, stage, str(tmp_path), *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, f"{stage}: {' '.join(args)}\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("stage", DEMOS)
def test_with_its_usual_ports_taken_the_demo_takes_free_ones_serves_and_stops_on_ctrl_c(
    tmp_path: Path, stage: str
) -> None:
    """Every usual port but the control port is taken: a first try that bound one port must give it back."""
    run_in_namespace(tmp_path, stage, "--stop", "SIGINT")


@pytest.mark.parametrize("stage", DEMOS)
def test_sigterm_stops_the_demo_as_ctrl_c_does(tmp_path: Path, stage: str) -> None:
    """Unhandled, SIGTERM ends a Python program on the spot: exit -15, no "stopped", no `finally` run."""
    run_in_namespace(tmp_path, stage, "--stop", "SIGTERM")


@pytest.mark.parametrize("stage", [s for s in DEMOS if (ROOT / s / "certs.py").is_file()])
def test_sigterm_while_the_demo_makes_its_certificates_leaves_no_openssl_behind(tmp_path: Path, stage: str) -> None:
    """Its openssl is slowed down here, so that SIGTERM surely comes while it runs."""
    run_in_namespace(tmp_path, stage, "--stop", "SIGTERM", "--during-certificates")


# --- what runs inside the namespace -----------------------------------------------------------------


def usual_ports(stage: str) -> dict[str, int]:
    """The demo's default ports by role, in the order its server binds them (control first), then the inspector's."""
    protocol = importlib.import_module(f"{stage}.protocol")
    ports = {"control": protocol.CONTROL_PORT, "public": protocol.PUBLIC_PORT}
    if hasattr(protocol, "PROXY_PORT"):  # stages 2 and 3
        ports["proxy"] = protocol.PROXY_PORT
    if has_inspector(stage):
        ports["inspect"] = importlib.import_module(f"{stage}.inspector").INSPECT_PORT
    return ports


def become_subreaper() -> None:
    """Adopt every orphan among our descendants, so that a process the demo left behind is found as our child."""
    PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def children(parent: int) -> dict[int, str]:
    """{pid: command line} of the children of `parent` still running (a zombie has ended: not counted)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            _, _, after = (entry / "stat").read_text().rpartition(")")
            state, ppid = after.split()[:2]
            if int(ppid) == parent and state != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError):
            continue  # a process that just ended
    return found


async def until_a_child(demo: CliProcess) -> None:
    """Wait (bounded) until the demo has started a child process (its openssl)."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                if children(demo.process.pid):
                    return
                await asyncio.sleep(0.01)  # /proc has no event to wait on
    except TimeoutError:
        raise AssertionError(f"no openssl started in {STEP_TIMEOUT:g}s:\n{demo.output}") from None


def slow_openssl(folder: Path) -> Path:
    """A folder with an `openssl` that waits OPENSSL_DELAY seconds, then runs the real one: put it first on PATH."""
    real = shutil.which("openssl")
    assert real is not None
    folder.mkdir()
    script = folder / "openssl"
    script.write_text(f'#!/bin/sh\nsleep {OPENSSL_DELAY}\nexec {real} "$@"\n')
    script.chmod(0o755)
    return folder


async def check_demo(stage: str, work: Path, stop: signal.Signals, during_certificates: bool) -> list[str]:
    """Start the demo with its usual ports taken, use it, stop it with `stop`; return the problems seen."""
    usual = usual_ports(stage)
    # Take every usual port but the first the server binds: the demo's first try then gets one port and
    # fails on the next, the case where a half-done try must give its port back before the second.
    held = [socket.create_server(("127.0.0.1", port)) for role, port in usual.items() if role != "control"]
    temp = work / "tmp"  # the demo's temporary folders (its certificates) go here: it must be empty at the end
    temp.mkdir()
    env = {"TMPDIR": str(temp)}
    if during_certificates:
        env["PATH"] = f"{slow_openssl(work / 'bin')}{os.pathsep}{os.environ['PATH']}"
    demo = await CliProcess.start("-m", stage, cwd=ROOT, env=env)
    problems = []
    try:
        if during_certificates:
            await until_a_child(demo)  # its openssl: SIGTERM while it runs
        else:
            await demo.expect(rf"port {usual['public']} on 127\.0\.0\.1 is already in use.*takes free ports instead")
            if "inspect" in usual:
                await demo.expect(rf"port {usual['inspect']} on 127\.0\.0\.1 is already in use.*takes a free port")
            host = r"hello\.localhost" if has(stage, "names") else r"127\.0\.0\.1"
            url, name, port = (await demo.expect(rf"(http://({host}):(\d+)/)")).groups()
            if int(port) in usual.values():
                problems.append(f"the public URL {url} has a usual port, which is taken")
            try:  # the first try's control port was given back: nothing listens on it now
                socket.create_server(("127.0.0.1", usual["control"])).close()
            except OSError as exc:
                problems.append(f"the failed first try kept port {usual['control']}: {exc}")
            status, body = await http_get(int(port), "/hello/tunnel", host=f"{name}:{port}")
            if status != 200 or not re.search(rb"<h1>Hello .*through the tunnel!</h1>", body):
                problems.append(f"GET {url}hello/tunnel through the tunnel: {status} {body[:200]!r}")
            if "inspect" in usual:
                inspector = int((await demo.expect(r"inspect: +http://127\.0\.0\.1:(\d+)/"))[1])
                if (await http_get(inspector, "/"))[0] != 200:
                    problems.append(f"the inspector's page on port {inspector} did not answer 200")
        demo.process.send_signal(stop)
        code = await demo.wait()
    finally:
        await demo.stop()  # if a check above failed: the demo must not outlive this run
        for sock in held:
            sock.close()
    if code != 0:
        problems.append(f"exit code {code} after {stop.name}, not 0")
    if not demo.lines or not demo.lines[-1].endswith(" stopped"):
        problems.append(f"its last line is not the 'stopped' log line after {stop.name}")
    if "Traceback" in demo.output:
        problems.append("a traceback")
    if during_certificates and "public URL" in demo.output:
        problems.append("it went on to print its URL after SIGTERM")
    if left := children(os.getpid()):
        problems.append(f"processes left running after it exited: {left}")
    for _ in range(20):  # stop them by PID: ours, adopted (see become_subreaper), as are their own children
        if not (strays := children(os.getpid())):
            break
        for pid in strays:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.05)
    if leftovers := sorted(str(p.relative_to(temp)) for p in temp.iterdir()):
        problems.append(f"left in its temporary folder: {leftovers}")
    if problems:
        problems.append(f"its output:\n{demo.output}")
    return problems


def main() -> None:
    """Command line (in a new network namespace): python tests/test_demos.py STAGE WORK_DIR --stop SIG [...]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage")
    parser.add_argument("work", type=Path, help="an empty folder of the test's")
    parser.add_argument("--stop", choices=["SIGINT", "SIGTERM"], required=True, help="how to stop the demo")
    parser.add_argument(
        "--during-certificates", action="store_true", help="stop it while its (slowed) openssl runs, not once it serves"
    )
    args = parser.parse_args()
    # A new network namespace starts with `lo` down: 127.0.0.1 would not answer.
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"
    subprocess.run([ip, "link", "set", "lo", "up"], check=True)
    become_subreaper()
    problems = asyncio.run(check_demo(args.stage, args.work, signal.Signals[args.stop], args.during_certificates))
    sys.exit("\n".join(problems) or None)


if __name__ == "__main__":
    main()
