"""Find and run the terminal sessions the docs show a learner ("verify it yourself").

The convention (tests/test_docs_commands.py enforces it and runs every session):

- A ```console block is a terminal. A line starting with `$ ` is a command (a trailing `\\`
  continues it on the next line); the lines under it are its output, as the learner will see it.
- A command whose output shows `^C` keeps running, like a server: it is started in the background
  and stopped with Ctrl-C (SIGINT) once the rest of its section has run; it must then exit with 0.
  Lines after `^C` are what it prints when stopped. Any other command must finish (exit 0, or
  non-zero if its output shows an `error: ...` or `curl: (N) ...` line).
- The console blocks under one heading form one scenario, run top to bottom. Expected output is
  matched line by line, in order, ignoring lines the docs leave out: digits (times, ports, byte
  counts) and hex ids match any, month and weekday names match any (a transcript shows the day it
  was made), and `...` matches anything. Consecutive lines stamped with the same time (`10:40:05 ...`)
  may come in any order among themselves: a server and a client log in whichever order they finish.
- A server's startup lines are waited for before the next command runs, as a learner waits for
  the banner: its first line (up to 15 s), then every line stamped with the same time as that line
  (`10:40:00 ...`) and the unstamped lines among them (up to 15 s each), skipping `...`. Lines
  stamped later are what the later commands make it print; they are checked when it stops. A
  server whose first line has no time stamp has no such story to tell: its lines are waited for
  while they keep coming (1 s each), up to its first `...`.
- After each command, the servers' logs settle (0.5 s without a new line, at most 3 s) before the
  next command runs, as a learner reads them; at the end every server gets its expected lines'
  moment, then each is stopped with Ctrl-C, the last started first.
- Paths under `/tmp/` are the scenario's own: the runner gives each scenario a fresh folder for
  them and removes it afterwards, so runs side by side share nothing and leave nothing behind.

Fixed ports (54286, 60623, ...) are what the docs show, so the test runs each scenario in a private
network namespace (`unshare --net`) where nothing else can hold them.

    python3 docs/tools/doccommands.py list                # every scenario and its commands
    python3 docs/tools/doccommands.py run stage_1/README.md 0   # run one here (ports must be free)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Other helpers' pages may show commands that need root or minutes (the NAT lab, benchmarks); they
# join this check as soon as they have a "Verify it yourself" section.
OPT_IN_PAGES = {"docs/nat-lab.md", "docs/performance.md"}
VERIFY_HEADING = "verify it yourself"
START_TIMEOUT = 15.0  # a background command must print its first expected line within this
SETTLE = 1.0  # ... and each further startup line within this of the previous one
RUN_TIMEOUT = 30.0  # a foreground command must finish within this
STOP_TIMEOUT = 10.0  # a background command must exit within this after Ctrl-C
QUIET, QUIET_MAX = 0.5, 3.0  # after a command, the servers' logs settle: quiet this long (at most QUIET_MAX)

# Log lines start with the time of day; the startup lines of a server share its first line's.
STAMP = re.compile(r"^(\d\d:\d\d:\d\d) ")
# Names the C locale's and http.server's dates are made of: any month matches any month, and so on.
MONTHS = "January February March April May June July August September October November December".split()  # noqa: SIM905
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()  # noqa: SIM905
CALENDAR_NAMES = {name: names for names in (MONTHS, DAYS) for name in names} | {
    name[:3]: [n[:3] for n in names] for names in (MONTHS, DAYS) for name in names
}
# A name counts as a date's only beside a number ("25/Nov/2026", "Wed, 25 Nov"), not in prose ("May I").
_NAME = "(?:" + "|".join(sorted(CALENDAR_NAMES, key=len, reverse=True)) + ")"
DATE_NAME = rf"(?<=\d[ /-]){_NAME}\b|\b{_NAME}(?=,?[ /-]\d)"
TOKEN = re.compile(rf"(\.\.\.|\b[0-9a-f]*\d[0-9a-f]*\b|\d+|{DATE_NAME})")

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*\{?\s*\.?(?P<lang>[\w+-]*)(?P<rest>.*)$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*(?:\{.*\})?\s*$")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# Output that shows a command failing on purpose: our one-line errors, curl's own.
FAILURE = re.compile(r"^(?:error: |curl: \(\d+\) )")


@dataclass
class Command:
    """One `$ ` line of a console block and the output the docs show for it."""

    text: str
    line: int
    expected: list[str] = field(default_factory=list)
    on_interrupt: list[str] | None = None  # None: runs to the end; a list: a server, stopped with ^C

    @property
    def background(self) -> bool:
        return self.on_interrupt is not None


@dataclass
class Section:
    """The text under one heading: its console blocks (a scenario) and what else it shows."""

    path: str
    heading: str
    line: int
    level: int  # 1 for "#", 2 for "##", ...; 0 before the first heading
    commands: list[Command] = field(default_factory=list)
    other_fences: list[tuple[int, str]] = field(default_factory=list)  # (line, language)
    inline_code: list[tuple[int, str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line} {self.heading}"

    @property
    def is_verify(self) -> bool:
        return VERIFY_HEADING in self.heading.lower()


def doc_files(root: Path = ROOT) -> list[Path]:
    """The stage READMEs and the site's pages (see OPT_IN_PAGES)."""
    stages = sorted(root.glob("stage_[0-9]*/README.md"), key=lambda p: int(p.parent.name.removeprefix("stage_")))
    files = stages + sorted((root / "docs").glob("*.md"))
    return [f for f in files if f.relative_to(root).as_posix() not in OPT_IN_PAGES or has_verify(f)]


def has_verify(path: Path) -> bool:
    return any(VERIFY_HEADING in line.lower() for line in path.read_text().splitlines() if line.startswith("#"))


def parse(path: Path, root: Path = ROOT) -> list[Section]:
    """Split a Markdown file into sections by heading and parse its console blocks."""
    rel = path.relative_to(root).as_posix()
    sections = [Section(rel, "(top)", 1, 0)]
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := FENCE.match(line):
            close = re.compile(rf"^{re.escape(m['indent'])}{m['fence'][0]}{{{len(m['fence'])},}}\s*$")
            body_start = i + 1
            i += 1
            while i < len(lines) and not close.match(lines[i]):
                i += 1
            body = [b[len(m["indent"]) :] for b in lines[body_start:i]]
            if m["lang"] == "console":
                sections[-1].commands += parse_console(body, body_start + 1, rel)
            else:
                sections[-1].other_fences.append((body_start, m["lang"]))
        elif m := HEADING.match(line):
            sections.append(Section(rel, m[2], i + 1, len(m[1])))
        else:
            sections[-1].inline_code += [(i + 1, code) for code in INLINE_CODE.findall(line)]
        i += 1
    return sections


def parse_console(body: list[str], first_line: int, rel: str) -> list[Command]:
    """The commands of one console block, each with its expected output."""
    commands: list[Command] = []
    continued = False
    for offset, line in enumerate(body):
        if continued:
            commands[-1].text = commands[-1].text[:-1] + line.strip()
        elif line.startswith("$ "):
            commands.append(Command(line[2:].strip(), first_line + offset))
        elif not commands:
            raise ValueError(f"{rel}:{first_line + offset}: console output before any `$ ` command")
        elif line.startswith("^C"):
            commands[-1].on_interrupt = [line[2:].strip()] if line[2:].strip() else []
        elif commands[-1].on_interrupt is not None:
            commands[-1].on_interrupt.append(line)
        elif line.strip():
            commands[-1].expected.append(line)
        continued = bool(commands) and commands[-1].text.endswith("\\")
    return commands


def scenarios(root: Path = ROOT) -> list[Section]:
    """Every section that shows at least one console command, in file order."""
    return [s for f in doc_files(root) for s in parse(f, root) if s.commands]


# --- matching ---------------------------------------------------------------------------------


def line_pattern(expected: str) -> re.Pattern[str]:
    """A doc line as a regex: `...` is anything, hex ids and digit runs are any such run, and a
    month or weekday name is any month or weekday name (so a transcript made in November still
    matches in December)."""
    parts = []
    for piece in TOKEN.split(expected.strip()):
        if piece == "...":
            parts.append(".*")
        elif piece in CALENDAR_NAMES:
            parts.append("(?:" + "|".join(CALENDAR_NAMES[piece]) + ")")
        elif re.fullmatch(r"[0-9a-f]*\d[0-9a-f]*", piece):
            parts.append("[0-9a-f]+" if re.search("[a-f]", piece) or len(piece) >= 8 else r"\d+")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts))


def first_missing(expected: list[str], actual: list[str]) -> str | None:
    """The first expected line not found, in order, among the actual lines (None: all found).

    Lines the docs stamp with the same time may come in any order among themselves: parts of a
    program that run at once (a server and a client in one demo) log in whichever order they finish.
    """
    position = 0
    for group in same_time_groups(expected):
        found = []
        for line in group:
            pattern = line_pattern(line)
            at = next((i for i in range(position, len(actual)) if i not in found and pattern.search(actual[i])), None)
            if at is None:
                return line
            found.append(at)
        position = max(found) + 1
    return None


def same_time_groups(expected: list[str]) -> list[list[str]]:
    """The expected lines as runs of lines stamped with the same time (an unstamped line is a run of its own)."""
    groups: list[list[str]] = []
    previous = None
    for line in expected:
        if line.strip() == "...":
            previous = None
            continue
        stamp = STAMP.match(line)
        if stamp is not None and previous is not None and stamp[1] == previous:
            groups[-1].append(line)
        else:
            groups.append([line])
        previous = stamp[1] if stamp else None
    return groups


# --- running ----------------------------------------------------------------------------------


def command_env() -> dict[str, str]:
    """The learner's environment: this Python first on PATH, unbuffered output, no HTTP proxy."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "NGROK_SECRET"}
    env["PATH"] = os.pathsep.join([python_bin(), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    env["PYTHONUNBUFFERED"] = "1"
    # `python3 -m stage_1.server` run here would put the working directory (this repository) first
    # on sys.path, ahead of PYTHONPATH, where the tests' workshop mode names a learner's copy of a
    # stage (tests/conftest.py). PYTHONSAFEPATH=1 leaves it out; the repository comes last instead.
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    return env


@functools.cache
def python_bin() -> str:
    """A folder where `python3` and `python` are the Python running this (the project's virtualenv).

    The docs say `python3` (Debian has no `python` without python-is-python3); a virtualenv's bin/
    has both. Run from an interpreter whose folder lacks one, the names are linked in a folder of
    their own (removed when this process exits), so no command runs a system Python by accident.
    """
    here = Path(sys.executable).parent
    if all(same_file(here / name, sys.executable) for name in ("python3", "python")):
        return str(here)
    shims = Path(tempfile.mkdtemp(prefix="doccommands-python-"))
    atexit.register(shutil.rmtree, shims, ignore_errors=True)
    for name in ("python3", "python"):
        (shims / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        (shims / name).chmod(0o755)
    return str(shims)


def same_file(path: Path, executable: str) -> bool:
    """Whether path runs this interpreter (a virtualenv's python3 -> python links included)."""
    return path.is_file() and os.path.realpath(path) == os.path.realpath(executable)


def hear_ctrl_c() -> None:
    """In a command's process before it starts: let SIGINT stop it again."""
    # Started as a background job from a script (`make test &`), we inherit SIGINT as "ignored",
    # and so would the commands: a server would then never stop on the Ctrl-C the docs show.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """One running command whose combined output is collected line by line."""

    def __init__(self, command: Command) -> None:
        self.command = command
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived (time.monotonic()), for the demo picture
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            ["bash", "-c", command.text],
            cwd=ROOT,
            env=command_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal's foreground job
            preexec_fn=hear_ctrl_c if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else None,
        )
        RUNNING.add(self)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.times.append(time.monotonic())
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def wait_for(self, line: str, timeout: float) -> bool:
        """Wait until an output line matches `line`; False on timeout or exit."""
        pattern = line_pattern(line)
        deadline = time.monotonic() + timeout
        while not any(pattern.search(x) for x in list(self.lines)):
            if time.monotonic() >= deadline or (self.process.poll() is not None and not self._reader.is_alive()):
                return False
            # A poll, not a Condition's timed wait: under a clock-faking tool (libfaketime, to run the
            # docs on another day) a timed wait on a lock never times out, and the runner would hang.
            time.sleep(0.02)
        return True

    def interrupt(self) -> int | None:
        """Press Ctrl-C: SIGINT to its process group; the exit code, or None if it would not stop."""
        if self.process.poll() is None:
            self.kill(signal.SIGINT)
        return self.finish(STOP_TIMEOUT)

    def finish(self, timeout: float) -> int | None:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.process.wait()
            code = None
        RUNNING.discard(self)
        self._reader.join(5)
        return code

    def kill(self, signum: int) -> None:
        """Send `signum` to the command's whole process group (a pipeline, a server's children)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)


# Every command started and not yet finished: what a SIGTERM to the runner must stop too.
RUNNING: set[Terminal] = set()


def stop_on_signal(signum: int, frame: object) -> None:
    """SIGTERM or SIGHUP (a cancelled job, a timeout): stop every command started, then exit."""
    # The commands run in process groups of their own, so no signal reaches them but this one.
    for terminal in list(RUNNING):
        terminal.kill(signal.SIGTERM)
    sys.exit(128 + signum)


@dataclass
class Result:
    """What running one scenario showed; `problems` is empty when it did what the docs say."""

    scenario: str
    problems: list[str] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)


def run_scenario(section: Section) -> Result:
    """Run a section's commands as the docs say, in the current network namespace."""
    result = Result(section.name)
    servers: list[Terminal] = []
    scratch = Path(tempfile.mkdtemp(prefix="doccommands-"))
    try:
        for command in (own_tmp(c, scratch) for c in section.commands):
            if command.background:
                servers.append(start_background(command, result))
            else:
                run_foreground(command, result)
                let_logs_settle(servers)
            if result.problems:
                break
    finally:
        # Like a learner: read every terminal, then press Ctrl-C in each, the last started first.
        for terminal in servers:
            wait_for_expected(terminal)
        for terminal in reversed(servers):
            stop_background(terminal, result)
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def let_logs_settle(servers: list[Terminal]) -> None:
    """After a command, wait until the servers have been quiet for QUIET (at most QUIET_MAX).

    A learner reads what the servers logged before typing the next command; without this pause a
    server's line about one command (a request it logs when the relay ends) could come after a line
    about the next one, in the other order than the docs show.
    """
    deadline = time.monotonic() + QUIET_MAX
    while (now := time.monotonic()) < deadline:
        last = max((t.times[-1] for t in servers if t.times), default=0.0)
        if now - last >= QUIET:
            return
        time.sleep(min(QUIET - (now - last), deadline - now))


def wait_for_expected(terminal: Terminal) -> None:
    """Give each line a server should have printed by now its moment (SETTLE) to arrive."""
    for line in terminal.command.expected:
        if line.strip() != "..." and not terminal.wait_for(line, SETTLE):
            break


def own_tmp(command: Command, scratch: Path) -> Command:
    """The command with its `/tmp/` paths moved into this scenario's own folder."""

    def move(text: str) -> str:
        return re.sub(r"(?<![\w.])/tmp/", f"{scratch}/", text)

    return replace(
        command,
        text=move(command.text),
        expected=[move(line) for line in command.expected],
        on_interrupt=None if command.on_interrupt is None else [move(line) for line in command.on_interrupt],
    )


def stop_background(terminal: Terminal, result: Result) -> None:
    """Press Ctrl-C on a server once the commands are done, and check all it printed."""
    code = terminal.interrupt()
    cmd = terminal.command
    result.transcript += [f"$ {cmd.text}", *terminal.lines, "^C"]
    if code != 0 and not result.problems:
        result.problems.append(f"line {cmd.line}: `{cmd.text}` exited with {code} after Ctrl-C, not 0")
    missing = first_missing(cmd.expected + (cmd.on_interrupt or []), terminal.lines)
    if missing is not None and not result.problems:
        result.problems.append(f"line {cmd.line}: `{cmd.text}` never printed {missing!r}")


def start_background(command: Command, result: Result) -> Terminal:
    terminal = Terminal(command)
    if not command.expected:
        result.problems.append(f"line {command.line}: a command stopped with ^C must show its first output line")
    elif not terminal.wait_for(command.expected[0], START_TIMEOUT):
        result.problems.append(f"line {command.line}: `{command.text}` did not print {command.expected[0]!r}")
    else:
        wait_for_startup(terminal, command.expected)
    return terminal


def wait_for_startup(terminal: Terminal, expected: list[str]) -> None:
    """Wait for a server's startup lines after its first (see the module's docstring)."""
    first = STAMP.match(expected[0])
    for line in expected[1:]:
        if line.strip() == "...":
            if first is None:
                break  # no time stamps: only the lines before the first gap are its startup
            continue
        if first is None:
            if not terminal.wait_for(line, SETTLE):
                break
            continue
        stamp = STAMP.match(line)
        if stamp is not None and stamp[1] != first[1]:
            break  # stamped later: a later command makes it print this line
        # A startup line that does not come in time is reported when the server stops.
        if not terminal.wait_for(line, START_TIMEOUT):
            break


def run_foreground(command: Command, result: Result) -> None:
    terminal = Terminal(command)
    code = terminal.finish(RUN_TIMEOUT)
    result.transcript += [f"$ {command.text}", *terminal.lines]
    wants_error = any(FAILURE.match(line) for line in command.expected)
    if code is None:
        result.problems.append(f"line {command.line}: `{command.text}` did not finish in {RUN_TIMEOUT:g}s")
    elif (code != 0) != wants_error:
        result.problems.append(f"line {command.line}: `{command.text}` exited with {code}")
    elif (missing := first_missing(command.expected, terminal.lines)) is not None:
        result.problems.append(f"line {command.line}: `{command.text}` did not print {missing!r}")


def bring_up_loopback() -> None:
    """A new network namespace starts with `lo` down: 127.0.0.1 would not answer."""
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"
    subprocess.run([ip, "link", "set", "lo", "up"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the scenarios and their commands")
    run = sub.add_parser("run", help="run one scenario in this network namespace")
    run.add_argument("path", help="the Markdown file, relative to the repository root (or absolute)")
    run.add_argument("index", type=int, help="which scenario of that file, from 0 (see `list`)")
    run.add_argument("--netns", action="store_true", help="bring up lo first (inside `unshare --net`)")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop_on_signal)
    if args.action == "list":
        for s in scenarios():
            print(s.name)
            for c in s.commands:
                print(f"    $ {c.text}" + ("    (stopped with ^C)" if c.background else ""))
        return
    page = (ROOT / args.path).resolve()  # a page of the docs, or any Markdown file (the runner's own tests)
    section = [s for s in parse(page, ROOT if page.is_relative_to(ROOT) else page.parent) if s.commands][args.index]
    if args.netns:
        bring_up_loopback()
    result = run_scenario(section)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print("\n".join(result.transcript))
        print("\n".join(result.problems) or "ok: the commands did what the docs say")
    sys.exit(1 if result.problems else 0)


if __name__ == "__main__":
    main()
