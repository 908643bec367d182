"""Every terminal session the docs show is run, and does what the docs say it does.

The docs show commands in ```console blocks (see docs/tools/doccommands.py for the convention).
Each section's blocks are run as one scenario, in a private network namespace so that the fixed
ports the docs use (54286, 60623, ...) cannot collide with anything else on the machine.
A command that stops working, output that changes, or a new command in a "Verify it yourself"
section that is not in a console block (so would not be run) fails these tests.
"""

import http.server
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("curl", "nc", "ss")  # what the documented commands use besides Python


def load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doccommands", ROOT / "docs" / "tools" / "doccommands.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["doccommands"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


doccommands = load_runner()
# Every "Verify it yourself" session the pages have, stage pages in numeric order (stage_10 after stage_9).
SCENARIOS = sorted(
    doccommands.scenarios(), key=lambda s: int(m[1]) if (m := re.match(r"stage_(\d+)\b", s.name)) else -1
)


@cache
def netns_prefix() -> list[str] | None:
    """How to start a process in a new network namespace here, or None if this machine can't."""
    for prefix in (["unshare", "--net"], ["unshare", "--user", "--map-root-user", "--net"]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def in_verify_sections(path: Path) -> "list[doccommands.Section]":
    """The sections of a page under a "Verify it yourself" heading, its subsections included."""
    inside, found = False, []
    for section in doccommands.parse(path):
        inside = section.is_verify or (inside and section.level > 2)
        if inside:
            found.append(section)
    return found


def test_every_stage_has_verify_commands() -> None:
    for stage in sorted(ROOT.glob("stage_[0-9]*"), key=lambda path: int(path.name.removeprefix("stage_"))):
        if not (stage / "client.py").is_file():
            continue  # a stage still being written has nothing to run yet (its README says so)
        readme = stage / "README.md"
        assert any(s.commands for s in in_verify_sections(readme)), f"{readme}: no console commands to verify"


def test_verify_sections_show_commands_only_in_console_blocks() -> None:
    """A command shown any other way in a "Verify it yourself" section would escape these tests."""
    problems = []
    for path in doccommands.doc_files():
        shown = {c.text for s in doccommands.parse(path) for c in s.commands}
        for section in in_verify_sections(path):
            for line, lang in section.other_fences:
                if lang != "mermaid":
                    problems.append(f"{section.path}:{line}: a ```{lang or 'plain'} block; use ```console")
            for line, code in section.inline_code:
                if re.match(r"(python3? -m|curl) ", code) and code not in shown:
                    problems.append(f"{section.path}:{line}: `{code}` is not run in any console block")
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(75)  # the runner's own bound (55 s) and its clean stop come first
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[re.sub(r"\W+", "-", s.name).strip("-") for s in SCENARIOS])
def test_documented_commands_work(scenario: "doccommands.Section") -> None:
    prefix = netns_prefix()
    if prefix is None:
        pytest.skip("needs a private network namespace (unshare --net) so the documented fixed ports are free")
    text = " ".join(c.text for c in scenario.commands)
    for tool in TOOLS:
        if re.search(rf"(^|[|;&(] *){tool} ", text) and shutil.which(tool) is None:
            pytest.skip(f"the documented commands use `{tool}`, which is not installed")
    index = [s for s in doccommands.parse(ROOT / scenario.path) if s.commands].index(scenario)
    runner = [sys.executable, str(ROOT / "docs" / "tools" / "doccommands.py"), "run", scenario.path, str(index)]
    code, output = run_runner([*prefix, *runner, "--netns"], timeout=55)
    assert code == 0, f"{scenario.name}\n{output}"


def run_runner(args: list[str], timeout: float) -> tuple[int | None, str]:
    """Run the runner; past `timeout`, stop it with SIGTERM (it then stops the commands it started)."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as runner:
        try:
            output, _ = runner.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            runner.terminate()
            output, _ = runner.communicate(timeout=15)
            return None, f"(stopped after {timeout:g}s)\n{output}"
    return runner.returncode, output


# --- the runner itself must be able to fail ---------------------------------------------------------


def run_markdown(tmp_path: Path, text: str) -> "doccommands.Result":
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(text))
    [section] = [s for s in doccommands.parse(page, tmp_path) if s.commands]
    return doccommands.run_scenario(section)


def test_runner_fails_when_output_differs(tmp_path: Path) -> None:
    result = run_markdown(tmp_path, "```console\n$ echo hello 42\ngoodbye 42\n```\n")
    assert result.problems and "goodbye" in result.problems[0]


def test_runner_accepts_other_numbers_and_elided_lines(tmp_path: Path) -> None:
    result = run_markdown(tmp_path, "```console\n$ printf 'a 1\\nb\\nc 3f2a9c1e77\\n'\na 7\n...\nc 0011aabbcc\n```\n")
    assert result.problems == []


def test_lines_stamped_with_the_same_time_may_come_in_any_order() -> None:
    """Two parts of one program that log at once (a demo's server and client) finish in either order."""
    expected = ["10:40:00 start", "...", "10:40:05 server: GET / -> 200", "10:40:05 client: closed", "10:40:09 stopped"]
    printed = ["09:00:00 start", "09:00:05 client: closed", "09:00:05 server: GET / -> 200", "09:00:09 stopped"]
    assert doccommands.first_missing(expected, printed) is None
    # Only among themselves: a line stamped later still comes after them, and each line needs its own match.
    assert doccommands.first_missing(expected, [printed[0], printed[3], *printed[1:3]]) == "10:40:09 stopped"
    assert doccommands.first_missing(expected, printed[:2] + printed[3:]) == "10:40:05 server: GET / -> 200"
    assert doccommands.first_missing(["10:40:05 a", "10:40:05 a"], ["10:40:05 a"]) == "10:40:05 a"


def test_runner_fails_when_a_command_fails(tmp_path: Path) -> None:
    result = run_markdown(tmp_path, "```console\n$ false\n```\n")
    assert result.problems and "exited with 1" in result.problems[0]


def test_runner_stops_a_background_command_with_ctrl_c(tmp_path: Path) -> None:
    script = "import time; print('ready', flush=True); time.sleep(60)"
    result = run_markdown(tmp_path, f'```console\n$ python -c "{script}"\nready\n^C\n$ echo next\nnext\n```\n')
    # Python's default Ctrl-C is a KeyboardInterrupt traceback and exit status 1: the docs
    # promise a clean exit, so the runner must report it.
    assert result.problems and "after Ctrl-C" in result.problems[0]
    assert "next" in result.transcript


def test_runner_waits_for_a_servers_stamped_startup_lines(tmp_path: Path) -> None:
    """A server's lines stamped with its first line's time are its startup: the next command waits for them."""
    # The server is ready 2 s after its first line (longer than the 1 s a silent gap is given), with
    # `...` in between, as the demos' transcripts have; the next command needs it ready.
    server = (
        "import signal, sys, time; signal.signal(signal.SIGINT, lambda *_: sys.exit(0)); "
        "print('10:00:00 starting', flush=True); time.sleep(2); "
        "open('/tmp/ready', 'w').write('yes'); print('10:00:00 ready', flush=True); time.sleep(60)"
    )
    result = run_markdown(
        tmp_path,
        f'```console\n$ python -c "{server}"\n10:00:00 starting\n...\n10:00:00 ready\n^C\n$ cat /tmp/ready\nyes\n```\n',
    )
    assert result.problems == [], result.transcript


def test_runner_gives_each_scenario_its_own_tmp(tmp_path: Path) -> None:
    """`/tmp/...` in the docs is the scenario's own folder: nothing is shared or left behind."""
    name = f"doccommands-test-{uuid.uuid4().hex}"
    result = run_markdown(tmp_path, f"```console\n$ echo kept > /tmp/{name} && cat /tmp/{name} && pwd\nkept\n```\n")
    assert result.problems == [], result.transcript
    assert not (Path("/tmp") / name).exists()
    assert not any(Path(tempfile.gettempdir()).glob(f"doccommands-*/{name}")), "the scenario's folder was left behind"


def test_runner_stopped_with_sigterm_stops_its_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled job or a timeout sends SIGTERM: the servers the runner started must not outlive it."""
    pid_file = tmp_path / "server.pid"
    monkeypatch.setenv("SERVER_PID_FILE", str(pid_file))  # the commands inherit the runner's environment
    (tmp_path / "page.md").write_text(
        '```console\n$ echo $$ > "$SERVER_PID_FILE"; echo started; exec sleep 300\nstarted\n^C\n$ sleep 300\n```\n'
    )
    runner = subprocess.Popen(
        [sys.executable, str(ROOT / "docs" / "tools" / "doccommands.py"), "run", str(tmp_path / "page.md"), "0"]
    )
    try:
        deadline = time.monotonic() + 15
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert time.monotonic() < deadline and runner.poll() is None, "the server never started"
            time.sleep(0.05)
        server_pid = int(pid_file.read_text())
        time.sleep(0.3)  # the runner is now in the foreground `sleep 300`
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(10) == 128 + signal.SIGTERM
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    deadline = time.monotonic() + 5
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server_pid), "the runner's server outlived it"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A process that exited but was not yet reaped by its parent is not running either.
    state = (
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
    )
    return state not in ("Z", "X")


# --- the transcripts match on any day, in any time zone ------------------------------------------------

# The ways a date or a time reaches a transcript: the programs' log lines start with the time of day
# (logging's %H:%M:%S), and `python -m http.server` logs each request with its date.
STAMPED = re.compile(r"^\d\d:\d\d:\d\d(?= )")
HTTP_SERVER_DATE = re.compile(r"\[\d\d/[A-Z][a-z]{2}/\d{4} \d\d:\d\d:\d\d\]")
# Instants around the year (every month, both ends of a day) and a few years away, in time zones
# from UTC-12 to UTC+14 and a half-hour one (POSIX TZ strings: no time zone database needed).
INSTANTS = [
    datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()
    for year, month in [(2026, m) for m in range(1, 13)] + [(2025, 2), (2027, 7), (2031, 12), (2099, 5)]
    for day, hour, minute, second in [(1, 0, 0, 0), (28, 23, 59, 59)]
]
ZONES = ["UTC0", "XST12", "YST-14", "NST3:30"]


@pytest.fixture
def time_zone() -> Iterator[Callable[[str], None]]:
    """Set this process's local time zone (TZ + tzset) for a test, and restore it after."""
    before = os.environ.get("TZ")

    def set_zone(zone: str) -> None:
        os.environ["TZ"] = zone
        time.tzset()

    yield set_zone
    if before is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = before
    time.tzset()


def as_printed_at(instant: float) -> tuple[str, str]:
    """What the log lines' clock and http.server's request date read at `instant`, by their own code."""
    record = logging.LogRecord("stage", logging.INFO, __file__, 1, "", None, None)
    record.created = instant
    clock = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S").formatTime(record, "%H:%M:%S")
    handler = http.server.BaseHTTPRequestHandler.__new__(http.server.BaseHTTPRequestHandler)
    with mock.patch("time.time", return_value=instant):
        date = f"[{handler.log_date_time_string()}]"
    return clock, date


def dated_lines() -> list[str]:
    """Every expected output line of the docs that shows a time or a date."""
    lines = []
    for scenario in SCENARIOS:
        for command in scenario.commands:
            for line in command.expected + (command.on_interrupt or []):
                if STAMPED.search(line) or HTTP_SERVER_DATE.search(line):
                    lines.append(line)
    return lines


def test_transcripts_match_lines_printed_on_any_day_in_any_time_zone(time_zone: Callable[[str], None]) -> None:
    lines = dated_lines()
    # The docs' transcripts hold many log lines and several http.server dates: if these counts drop, the
    # patterns above no longer find the dates in them and this test would prove nothing.
    assert sum(bool(HTTP_SERVER_DATE.search(x)) for x in lines) >= 5 and len(lines) >= 100, len(lines)
    failures = []
    for zone in ZONES:
        time_zone(zone)
        for instant in INSTANTS:
            clock, date = as_printed_at(instant)
            for line in lines:
                printed = HTTP_SERVER_DATE.sub(date, STAMPED.sub(clock, line))
                if doccommands.first_missing([line], [printed]) is not None:
                    failures.append(f"{zone} {date}: {line!r} does not match {printed!r}")
    assert not failures, f"{len(failures)} failures, e.g.\n" + "\n".join(failures[:5])


def test_transcripts_still_tell_a_date_from_something_else() -> None:
    """Matching any day must not match anything: a date in the wrong shape is still a difference."""
    line = '127.0.0.1 - - [25/Nov/2026 09:14:03] "HEAD / HTTP/1.1" 200 -'
    assert doccommands.first_missing([line], ['127.0.0.1 - - [05/Dec/2026 23:59:59] "HEAD / HTTP/1.1" 200 -']) is None
    for wrong in ("[05/Xyz/2026 23:59:59]", "[05/December/2026 23:59:59]", "[05/Dec/2026 23:59]"):
        assert doccommands.first_missing([line], [line.replace("[25/Nov/2026 09:14:03]", wrong)]) == line, wrong
    assert doccommands.first_missing(["May I help"], ["Jun I help"]) == "May I help"  # prose, not a date
