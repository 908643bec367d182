"""The NAT lab: behind a real NAT router (network namespaces) a direct connection fails and the tunnel works.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and nftables; without them every test here is skipped
with the reason. The terminal summary says how these tests ended, so a CI log shows that they really ran.
"""

import asyncio
import re
import signal
import sys
from pathlib import Path

import pytest

import nat_lab
from nat_lab import APP_GREETING, CONTROL_PORT, HOME_IP, PARALLEL_USERS, ROUTER_WAN_IP, SERVER_IP, Lab, user_page

REASON = nat_lab.probe()
# For a learner's check (tests/check.py): these tests run the stage the lab is built around.
STAGES_RUN = (nat_lab.TUNNEL,)
pytestmark = [pytest.mark.natlab, pytest.mark.skipif(REASON is not None, reason=f"NAT lab: {REASON}")]

ROOT = Path(__file__).resolve().parent.parent
TRANSCRIPT = ROOT / "docs" / "nat-lab-transcript.txt"
# One whole run takes a few seconds; this bounds a run that hangs somewhere despite the step timeouts.
RUN_TIMEOUT = 45.0


def headings(text: str) -> list[str]:
    """The story's step headings ("[a] The user tries ...") and its verdict, which a docs transcript must match."""
    return re.findall(r"^(?:\[\w+\] .*|RESULT: .*)$", text, re.MULTILINE)


def assert_nothing_left(run_id: str, pids: list[int]) -> None:
    assert nat_lab.lab_namespaces(run_id) == [], "a namespace of this run is left"
    assert [pid for pid in pids if nat_lab.pid_alive(pid)] == [], "a process of this run is still running"


async def test_direct_connection_fails_but_the_tunnel_reaches_the_home_app() -> None:
    lines: list[str] = []
    async with asyncio.timeout(RUN_TIMEOUT):
        async with Lab(say=lines.append) as lab:
            told = await nat_lab.story(lab)
    transcript = "\n".join(lines)

    # (a) The app works at home, but from the internet there is no way in: no route to the home's
    # address, and the router drops what is sent to it (counted by its own firewall rules).
    assert told.at_home["status"] == 200 and APP_GREETING in told.at_home["body"], transcript
    assert told.direct["home address"]["error"] == "network is unreachable", transcript
    assert told.direct["router address"]["error"].startswith("no answer"), transcript
    assert told.direct["routed to the router"]["error"].startswith("no answer"), transcript
    assert told.dropped["input"] > 0 and told.dropped["forward"] > 0, transcript

    # (b, c) The client connected out; the server saw the router's public address, never the home's.
    assert ROUTER_WAN_IP in told.peer_line, transcript
    assert any(view.startswith(f"{HOME_IP}:") and f"-> {SERVER_IP}:{CONTROL_PORT}" in view for view in told.home_view)
    assert any(f"-> {ROUTER_WAN_IP}:" in view for view in told.server_view), told.server_view
    assert not [line for line in told.server.lines if HOME_IP in line], "the server learned the home address"

    # (d) The user gets the home app's page through the server; the app saw the tunnel client, and
    # several users at once each got their own page.
    assert told.page["status"] == 200 and APP_GREETING in told.page["body"], transcript
    assert "127.0.0.1" in told.app_line, told.app_line
    assert [result["body"] for result in told.parallel] == [user_page(n) for n in range(1, PARALLEL_USERS + 1)]
    assert told.failures() == []

    # (e) Every program stopped cleanly on Ctrl-C, and nothing is left: no namespace, no process.
    assert lab.teardown is not None
    assert lab.teardown.exit_codes == {"client": 0, "server": 0, "app": 0}, told.server.output + told.client.output
    assert lab.teardown.stragglers == []
    assert lab.teardown.namespaces_left == [] and lab.teardown.processes_left == []
    assert_nothing_left(lab.run_id, lab.started_pids)


async def start_command(*args: str) -> asyncio.subprocess.Process:
    """The lab as its docs run it: `python -m tests.nat_lab ...` from the repository root."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.nat_lab", *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def read_until(process: asyncio.subprocess.Process, pattern: str, seen: list[str]) -> str:
    """Read output lines into `seen` until one matches `pattern`; return that line."""
    assert process.stdout is not None
    async with asyncio.timeout(RUN_TIMEOUT):
        while raw := await process.stdout.readline():
            seen.append(raw.decode().rstrip())
            if re.search(pattern, seen[-1]):
                return seen[-1]
    raise AssertionError(f"the lab ended before printing {pattern!r}:\n" + "\n".join(seen))


async def test_the_command_tells_the_story_shown_in_the_docs(tmp_path: Path) -> None:
    process = await start_command("--transcript", str(tmp_path / "transcript.txt"))
    async with asyncio.timeout(RUN_TIMEOUT):
        output, _ = await process.communicate()
    text = output.decode()
    assert process.returncode == 0, text
    assert "RESULT: a direct connection fails, the tunnel works, nothing is left behind" in text
    # The page includes a transcript file written by this command: it must tell the same story, step by step.
    written = (tmp_path / "transcript.txt").read_text()
    assert headings(written) == headings(text)
    assert headings(TRANSCRIPT.read_text()) == headings(text), f"regenerate {TRANSCRIPT.name}: see docs/nat-lab.md"
    run_id = re.search(r"NAT lab run (\w+)", text)
    assert run_id is not None
    assert nat_lab.lab_namespaces(run_id[1]) == []


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [pytest.param(signal.SIGINT, 130, id="ctrl-c"), pytest.param(signal.SIGTERM, 143, id="kill")],
)
async def test_an_interrupted_run_leaves_nothing_behind(signum: signal.Signals, exit_code: int) -> None:
    process = await start_command()
    seen: list[str] = []
    run_id = (await read_until(process, r"NAT lab run (\w+)", seen)).split()[3].rstrip(":")
    # Interrupt in the middle: the app, the server and the client all run and are connected.
    await read_until(process, r"^\[c\] ", seen)
    await read_until(process, r"^  server \| ", seen)
    pids = [pid for name in nat_lab.lab_namespaces(run_id) for pid in nat_lab.namespace_pids(name)]
    assert len(pids) >= 3, "\n".join(seen)
    process.send_signal(signum)
    async with asyncio.timeout(RUN_TIMEOUT):
        rest, _ = await process.communicate()
    seen += rest.decode().splitlines()
    output = "\n".join(seen)
    assert process.returncode == exit_code, output
    assert "[e] Teardown" in output and "namespaces of this run left: none" in output, output
    assert_nothing_left(run_id, pids)
