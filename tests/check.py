"""A learner's check of their own copy of a stage: every test that touches it, and a short report.

    make check STAGE=3 DIR=../my_stage_3
    .venv/bin/python -m tests.check 3 ../my_stage_3 [--all] [-k EXPRESSION]

It runs pytest in workshop mode (conftest.py: the copy is imported as the stage, by the tests and
by every program they start), on exactly the tests that concern that stage (`stages_of`: the
stage's own test files, the cases of the shared tests that run it, the sessions of its page), and
prints, instead of pytest's own output:

- first, each broken behaviour, named from its test (`test_half_close_travels_end_to_end` reads
  "Half close travels end to end"), with the lines of its failure and of the log that explain it;
- then the behaviours that hold, one line per test module in the words of its docstring
  (`--all` lists each one);
- last, one line with the verdict; the exit status is 0 only if every behaviour holds.

The pytest run is a child process that loads this module as a plugin (`-p tests.check`): the
plugin keeps the stage's tests and reports each result to the parent as a line of JSON.

Not run: tests whose subject is not a stage (the docs site, the benchmark, workshop mode itself).
A test file that runs a stage its ids and its name don't show says so in `STAGES_RUN` (the NAT lab's).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = tuple(sorted((p.name for p in ROOT.glob("stage_[0-9]*") if p.is_dir()), key=lambda s: int(s[6:])))

STAGE_NAME = re.compile(r"stage_\d+")  # a part of a test's id that names a stage
STAGE_FILE = re.compile(r"test_(stage_\d+)(?:_\w+)?\.py")

# How much of a broken behaviour the report shows.
DETAILED = 3  # broken behaviours shown with their failure; the others get one line each
BROKEN_LINES = 36  # at most, for what is broken (unless --all): the rest of a screen says what holds
TRACE_LINES = 4  # lines of the tests' code and of the copy's on the way to the failure
ERROR_LINES = 4  # lines of the error message
LOG_LINES = 4  # distinct warnings and errors from the log
WIDTH = 150  # characters of a line; longer lines are cut


# --- which tests concern a stage ------------------------------------------------------------------


def stages_of(item: pytest.Item) -> set[str]:
    """The stages a test exercises: named by its parameters, else by its file.

    `test_stage_3.py::test_half_close...[stage_9]` is a stage 9 test (a shared test, run against each
    stage that has the behaviour), the documented commands of stage 3's page are `[stage_3-README-md-...]`
    (a stage is one whole part of the test's id, between dashes), and a test in `test_stage_9_frames.py`
    with no stage among its parameters is a stage 9 test.
    """
    if item.path.name == "test_check.py":  # this tool's own tests: they check the tool, and run it
        return set()
    callspec = getattr(item, "callspec", None)
    if callspec is not None and (named := {part for part in callspec.id.split("-") if STAGE_NAME.fullmatch(part)}):
        return named
    if declared := getattr(getattr(item, "module", None), "STAGES_RUN", None):
        return set(declared)
    if match := STAGE_FILE.fullmatch(item.path.name):
        return {match[1]}
    return set()


def behaviour(function: str) -> str:
    """A test's name as words: `test_half_close_travels_end_to_end` -> 'Half close travels end to end'."""
    words = function.removeprefix("test_").replace("_", " ")
    return words[:1].upper() + words[1:]


def naming(function: str, callspec_id: str, stage: str) -> tuple[str, str, str]:
    """(key, name, case) of a test: the behaviour it checks, that behaviour in words, and its case in words.

    The cases of one test function are one behaviour (each case's id, the stage left out, names it),
    except the sessions of the stage page (test_docs_commands.py): each is named by its heading.
    """
    label = "-".join(part for part in callspec_id.split("-") if part != stage)
    if heading := re.fullmatch(r"README-md-\d+-(.+)", label):
        words = heading[1].replace("-", " ")
        return f"{function}[{words}]", f"The page's commands under '{words}' work as the page shows", ""
    return function, behaviour(function), label


def module_summary(item: pytest.Item) -> str:
    """The first line of the test module's docstring: what its tests hold the stage to."""
    doc = getattr(getattr(item, "module", None), "__doc__", None) or item.path.name
    return doc.strip().splitlines()[0]


# --- the plugin, in the child pytest --------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("check", "a learner's check (python -m tests.check)")
    group.addoption("--check-stage", metavar="STAGE", help="run only the tests that concern STAGE")
    group.addoption("--check-events", type=int, metavar="FD", help="write what happens as JSON lines to FD")


def pytest_configure(config: pytest.Config) -> None:
    stage, fd = config.getoption("--check-stage", None), config.getoption("--check-events", None)
    if stage:
        config.pluginmanager.register(Selector(stage, fd), "check-selector")


class Selector:
    """Keeps the tests that concern `stage`, and tells the parent (on descriptor `fd`) which, and how each went."""

    def __init__(self, stage: str, fd: int | None) -> None:
        self.stage = stage
        self.failed: set[str] = set()
        self.events: IO[str] | None = None
        if fd is not None:
            os.set_inheritable(fd, False)  # the programs the tests start must not hold the pipe open
            self.events = os.fdopen(fd, "w", buffering=1)

    def send(self, kind: str, **data: Any) -> None:
        if self.events is not None:
            self.events.write(json.dumps({"kind": kind, **data}) + "\n")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        keep = [item for item in items if self.stage in stages_of(item)]
        dropped = [item for item in items if self.stage not in stages_of(item)]
        items[:] = keep
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        self.send("collected", tests=[self.describe(item) for item in keep])

    def describe(self, item: pytest.Item) -> dict[str, str]:
        callspec = getattr(item, "callspec", None)
        key, name, case = naming(getattr(item, "originalname", item.name), callspec.id if callspec else "", self.stage)
        file = item.nodeid.partition("::")[0]
        return {"id": item.nodeid, "file": file, "key": key, "name": name, "case": case, "module": module_summary(item)}

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.send("collect_error", file=report.nodeid, text=str(report.longrepr))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "teardown" and report.passed and report.nodeid in self.failed:
            # What the copy logged once the test had failed, as its tasks were stopped, often says why.
            log = "\n".join(content for title, content in report.sections if title == "Captured log teardown")
            self.send("teardown_log", id=report.nodeid, log=log)
        if report.passed and report.when != "call":
            return
        if report.failed:
            self.failed.add(report.nodeid)
        text = ""
        if report.skipped:
            longrepr = report.longrepr
            text = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).removeprefix("Skipped: ")
        elif report.failed:
            text = report.longreprtext
        log = "\n".join(content for title, content in report.sections if title.startswith("Captured log"))
        log = log if report.failed else ""
        self.send("result", id=report.nodeid, when=report.when, outcome=report.outcome, text=text, log=log)

    def pytest_unconfigure(self) -> None:
        if self.events is not None:
            self.events.close()


# --- the report, in the parent --------------------------------------------------------------------


@dataclass
class Behaviour:
    """One test function: a behaviour, checked by one test or by several cases of it."""

    file: str
    name: str
    module: str
    rank: int  # the order in the report: the stage's own tests first, the docs' sessions last
    cases: dict[str, str] = field(default_factory=dict)  # test id -> case label
    failures: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # test id -> (phase, text, log)
    skips: dict[str, str] = field(default_factory=dict)  # test id -> reason

    @property
    def broken(self) -> bool:
        return bool(self.failures)

    @property
    def unchecked(self) -> bool:
        return not self.failures and len(self.skips) == len(self.cases)


class Run:
    """What the child pytest reported, and the report made of it."""

    def __init__(self, stage: str, shown_dir: str) -> None:
        self.stage, self.shown_dir = stage, shown_dir
        self.behaviours: dict[tuple[str, str], Behaviour] = {}
        self.by_id: dict[str, Behaviour] = {}
        self.collect_errors: list[tuple[str, str]] = []
        self.logs_shown: set[str] = set()  # the kinds of log lines the report showed already
        self.done: set[str] = set()
        self.started = time.monotonic()
        self.collected = False

    def rank(self, file: str) -> int:
        if (match := STAGE_FILE.fullmatch(Path(file).name)) and match[1] == self.stage:
            return 0
        return 2 if Path(file).name.startswith("test_docs_") else 1

    def on(self, event: dict[str, Any]) -> Iterator[str]:
        """Take one event from the child; yield what to print at once."""
        if event["kind"] == "collected":
            self.collected = True
            for test in event["tests"]:
                key = (test["file"], test["key"])
                if key not in self.behaviours:
                    self.behaviours[key] = Behaviour(
                        test["file"], test["name"], test["module"], self.rank(test["file"])
                    )
                self.behaviours[key].cases[test["id"]] = test["case"]
                self.by_id[test["id"]] = self.behaviours[key]
            files = len({b.file for b in self.behaviours.values()})
            if not self.by_id:
                return
            yield (
                f"Checking {self.stage} in {self.shown_dir}: {plural(len(self.by_id), 'test')} of "
                f"{plural(len(self.behaviours), 'behaviour')}, from {plural(files, 'test file')}"
            )
        elif event["kind"] == "collect_error":
            self.collect_errors.append((event["file"], event["text"]))
        elif event["kind"] == "teardown_log" and (found := self.by_id.get(event["id"])):
            if event["id"] in found.failures and event["log"]:
                phase, text, log = found.failures[event["id"]]
                found.failures[event["id"]] = (phase, text, f"{log}\n{event['log']}")
        elif event["kind"] == "result" and (found := self.by_id.get(event["id"])):
            if event["outcome"] == "failed":
                found.failures.setdefault(event["id"], (event["when"], event["text"], event["log"]))
            elif event["outcome"] == "skipped":
                found.skips[event["id"]] = event["text"]
            self.done.add(event["id"])

    def status(self) -> str:
        """The progress line a terminal shows while the tests run."""
        broken = sum(b.broken for b in self.behaviours.values())
        return f"  {len(self.done)} of {len(self.by_id)} tests run, {plural(broken, 'behaviour')} broken so far"

    def report(self, list_all: bool) -> list[str]:
        order = sorted(self.behaviours.values(), key=lambda b: b.rank)  # stable: collection order within a rank
        broken = [b for b in order if b.broken]
        lines: list[str] = []
        for file, text in self.collect_errors:
            lines.append(f"BROKEN  the tests in {file} cannot even be loaded")
            failure = read_failure(text, self.stage, self.shown_dir)
            lines += ["    " + line for line in failure.where + failure.error]
        errors_seen: dict[str, str] = {}
        for n, item in enumerate(broken):
            block = self.broken_lines(item, detailed=n < DETAILED, errors_seen=errors_seen)
            if not list_all and len(lines) + len(block) >= BROKEN_LINES:
                rest = broken[n:]
                files = dict.fromkeys(b.file for b in rest)
                where = ", ".join(f"{sum(b.file == file for b in rest)} in {file}" for file in files)
                lines.append(f"BROKEN  and {plural(len(rest), 'more behaviour')}: {where} (--all names each)")
                break
            lines += block
        holding = [b for b in order if not b.broken and not b.unchecked]
        if lines and (holding or any(b.unchecked for b in order)):
            lines.append("")
        for module in dict.fromkeys(b.module for b in order):
            group = [b for b in order if b.module == module]
            holds = [b for b in group if b in holding]
            if holds:
                count = f"{len(holds)} of {len(group)} behaviours"
                if len(holds) == len(group):
                    count = f"all {len(group)} behaviours" if len(group) > 1 else "the one behaviour"
                lines.append(f"ok      {count} of {group[0].file}: {module}")
                if list_all:
                    lines += [f"          {b.name}" for b in holds]
            for item in group:
                if item.unchecked:
                    reason = next(iter(item.skips.values()))
                    lines.append(f"skipped {item.name}: not checked here ({reason})")
        seconds = time.monotonic() - self.started
        total = len(self.behaviours)
        if broken or self.collect_errors:
            verdict = f"{len(broken)} of {plural(total, 'behaviour')} broken, {len(holding)} hold"
            if self.collect_errors:
                verdict = f"{plural(len(self.collect_errors), 'test file')} cannot be loaded, {verdict}"
        elif len(holding) == total:
            verdict = f"all {total} behaviours hold" if total > 1 else "its one behaviour holds"
        else:
            verdict = f"{len(holding)} of {plural(total, 'behaviour')} hold, the others are not checked here"
        failed = sum(len(b.failures) for b in self.behaviours.values())
        skipped = sum(len(b.skips) for b in self.behaviours.values())
        passed = len(self.by_id) - failed - skipped
        counts = ", ".join(
            f"{n} {what}" for n, what in ((failed, "failed"), (passed, "passed"), (skipped, "skipped")) if n
        )
        lines = [cut(line) for line in lines]
        # The verdict is never cut: a long folder name must not hide it.
        lines += ["", f"{self.stage} in {self.shown_dir}: {verdict} ({counts or 'no tests'} in {seconds:.0f} s)"]
        if broken:  # a command to copy: never cut
            first = next(iter(broken[0].failures))
            lines.append(f"One test in full: .venv/bin/pytest '{first}' --stage-dir {self.stage}={self.shown_dir}")
        return lines

    def broken_lines(self, item: Behaviour, detailed: bool, errors_seen: dict[str, str]) -> list[str]:
        phase, text, log = next(iter(item.failures.values()))
        cases = [item.cases[i] for i in item.failures if item.cases[i]]
        which = f": {len(item.failures)} of {len(item.cases)} cases, {', '.join(cases)}" if cases else ""
        could_not = (
            " (it could not start)" if phase == "setup" else " (its cleanup failed)" if phase == "teardown" else ""
        )
        head = f"BROKEN  {item.name}{could_not}  [{item.file}{which}]"
        failure = read_failure(text, self.stage, self.shown_dir)
        same = re.sub(r"\b[0-9a-f]{6,}\b|\d+", "#", failure.headline)
        if same in errors_seen:
            return [f"{head}: the same error as {errors_seen[same]!r}"]
        errors_seen[same] = item.name
        if not detailed:
            return [f"{head}: {failure.headline}"]
        return [head] + ["    " + line for line in failure.where + failure.error + log_lines(log, self.logs_shown)]


@dataclass
class Failure:
    """A failure cut down to what explains it."""

    where: list[str]  # the lines of the tests, and of the copy, that led to it: path:line: code
    error: list[str]  # the error, in a few lines
    headline: str  # the one line that says most


def read_failure(text: str, stage: str, shown_dir: str) -> Failure:
    """A failure in a few lines: where in the tests (and in the copy) it happened, and the error.

    pytest's short traceback, cut down: only the last exception of a chain (a TimeoutError, not the
    CancelledError it came from), only the frames of the tests and of the copy (not asyncio's), and
    the error message's first lines; a program's traceback inside the message, as a CLI test shows
    it, comes down to its last line in the copy and its exception.
    """
    blocks = re.split(
        r"\n\s*(?:The above exception was the direct cause of the following exception|"
        r"During handling of the above exception, another exception occurred):\s*\n",
        text,
    )
    frames: list[str] = []
    message: list[str] = []
    lines = blocks[-1].splitlines()
    for n, line in enumerate(lines):
        if match := re.fullmatch(r"(\S.*?):(\d+): in \S+", line):
            path = in_copy(match[1], stage, shown_dir)
            if path is None and match[1].startswith("tests/"):
                path = match[1]
            if path is not None:  # not Python's own modules: not where to look
                code = lines[n + 1].strip() if n + 1 < len(lines) and lines[n + 1].startswith(" ") else ""
                if not frames or frames[-1] != f"{path}:{match[2]}: {code}":  # a comprehension shows its line twice
                    frames.append(f"{path}:{match[2]}: {code}")
        elif line.startswith("E "):
            message.append(line[4:] if line.startswith("E   ") else line[1:].strip())
    if not message:  # not a traceback: a skip's reason, a collection error's text
        message = text.strip().splitlines()[-ERROR_LINES:]
    error, headline = summary(message, stage, shown_dir)
    return Failure(frames[-TRACE_LINES:], error, headline)


def summary(message: list[str], stage: str, shown_dir: str) -> tuple[list[str], str]:
    """An error message's first lines, and its first line as the headline.

    If it holds a Python traceback (a program's, that a CLI test shows, maybe with a prefix on each
    line such as "user | "), its first line, the traceback's last line in the copy and its exception,
    which is the headline. pytest's "+  where ..." lines are left out.
    """
    noise = r"\s*(\+ |Use -v to get more diff|[~^]+\s*$)"  # pytest's "where" lines; Python's ^^^^ under code
    lines = [line for line in message if line.strip() and not re.match(noise, line)]
    starts = [n for n, line in enumerate(lines) if line.endswith("Traceback (most recent call last):")]
    if not starts:  # but maybe a place, as a SyntaxError gives it: File "...", line N, then the code
        error: list[str] = []
        for n, line in enumerate(lines):
            if n and FILE_LINE.fullmatch(lines[n - 1]):
                continue  # the code, shown with its place
            if match := FILE_LINE.fullmatch(line):
                code = lines[n + 1].strip() if n + 1 < len(lines) else ""
                line = f"{in_copy(match[1], stage, shown_dir) or match[1]}:{match[2]}: {code}"
            error.append(line.strip())
        error = error[:ERROR_LINES]
        said = [line for line in error if not re.match(r"\S+:\d+: ", line)]  # what happened, not where
        return error, (said or error or ["(no message)"])[0]
    start = starts[-1]
    prefix = lines[start].removesuffix("Traceback (most recent call last):")
    frames: list[tuple[bool, str]] = []  # (in the copy?, where)
    exception = ""
    body = [line.removeprefix(prefix) for line in lines[start + 1 :] if line.startswith(prefix)]
    for n, line in enumerate(body):
        if match := FILE_LINE.fullmatch(line):
            code = body[n + 1].strip() if n + 1 < len(body) else ""
            path = in_copy(match[1], stage, shown_dir)
            code = "" if code.startswith(("^", "~")) else code
            frames.append((path is not None, f"{path or match[1]}:{match[2]}: {code}"))
        elif not line.startswith(" "):
            exception = line.strip()
            break
    # The last place in the copy is where to look; without one, the last place of all.
    where = [frame for copied, frame in frames if copied][-1:] or [frame for _, frame in frames][-1:]
    shown = [line for line in (lines[0].strip(), *where, exception) if line]
    return list(dict.fromkeys(shown)), exception or lines[0].strip()


FILE_LINE = re.compile(r'\s*File "(.+?)", line (\d+)(?:, in .+)?')


def in_copy(path: str, stage: str, shown_dir: str) -> str | None:
    """A file of the stage under test, as the learner knows it (../my_stage_3/relay.py); None for any other file."""
    if match := re.search(rf"(?:^|/){stage}/(.+)$", path):
        return f"{shown_dir}/{match[1]}"
    return None


LOG_RECORD = re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) +(\S+?):\S+:\d+ (.*)")


def log_lines(log: str, seen: set[str] | None = None) -> list[str]:
    """The warnings and errors of a test's captured log, each kind once, with how often it came.

    Kinds in `seen` (shown already, for another test) are left out; those shown here are added to it.
    """
    seen = set() if seen is None else seen
    records: list[list[str]] = []  # a record's line, then its traceback's lines, if any
    for line in log.splitlines():
        if LOG_RECORD.fullmatch(line):
            records.append([line])
        elif records:
            records[-1].append(line)
    kinds: dict[str, list[Any]] = {}
    for first, *more in records:
        match = LOG_RECORD.fullmatch(first)
        if not match or match[1] in ("DEBUG", "INFO"):
            continue
        text = f"{match[1]} {match[2]}: {match[3]}"
        if more and (raised := more[-1].strip()):  # a logged exception: its last line says what it was
            text += f" ({raised})"
        key = re.sub(r"\b[0-9a-f]{6,}\b|\d+", "#", text)
        kinds.setdefault(key, [text, 0])[1] += 1
    shown = [
        f"log: {text}" + (f"  (x{count})" if count > 1 else "")
        for key, (text, count) in kinds.items()
        if key not in seen
    ]
    seen.update(kinds)
    if len(shown) > LOG_LINES:
        shown = [*shown[:LOG_LINES], f"log: ... and {len(shown) - LOG_LINES} more kinds of warnings"]
    return shown


def plural(count: int, thing: str) -> str:
    return f"{count} {thing}" + ("" if count == 1 else "s")


def cut(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 3] + "..."


# --- the command line -------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: {message} (e.g. make check STAGE=3 DIR=../my_stage_3)\n")


def parse(argv: list[str] | None) -> tuple[str, Path, argparse.Namespace]:
    parser = Parser(
        prog="python -m tests.check",
        description="Run every test that concerns a stage against your copy of it, and say what holds.",
    )
    parser.add_argument("stage", help=f"the stage: a number or a name ({', '.join(STAGES)})")
    parser.add_argument("dir", nargs="?", help="your copy of the stage (default: the repository's own)")
    parser.add_argument("--all", action="store_true", help="list every behaviour that holds, not one line a module")
    parser.add_argument("-k", metavar="EXPRESSION", help="only the tests whose names match, as pytest -k takes it")
    args = parser.parse_args(argv)
    stage = args.stage if args.stage.startswith("stage_") else f"stage_{args.stage}"
    if stage not in STAGES:
        parser.exit(2, f"{parser.prog}: no stage {args.stage!r} here: the stages are {STAGES[0]} to {STAGES[-1]}\n")
    folder = Path(args.dir).expanduser().resolve() if args.dir else ROOT / stage
    if not folder.is_dir():
        parser.exit(2, f"{parser.prog}: {args.dir} is not a folder\n")
    if not (folder / "__init__.py").is_file():
        parser.exit(2, f"{parser.prog}: {args.dir} is not a stage folder: it has no __init__.py\n")
    return stage, folder, args


def shown(folder: Path) -> str:
    """`folder` as the learner would type it in the repository: ../my_stage_3 (or /tmp/my_stage_3)."""
    relative = os.path.relpath(folder, ROOT)
    return str(folder) if relative.startswith(os.pardir + os.sep + os.pardir) else relative


def main(argv: list[str] | None = None) -> int:
    stage, folder, args = parse(argv)
    tty = sys.stdout.isatty()
    run = Run(stage, shown(folder))
    env = {k: v for k, v in os.environ.items() if k != "STAGE_DIRS"}  # this stage from this copy, no other
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile("w+") as output:
        command = [
            sys.executable, "-m", "pytest", "-p", "tests.check", f"--check-stage={stage}",
            f"--check-events={write_end}", f"--stage-dir={stage}={folder}", "-q", "--tb=short",
            "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests",
        ] + (["-k", args.k] if args.k else [])  # fmt: skip
        child = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            pass_fds=[write_end],
        )  # fmt: skip
        os.close(write_end)
        try:
            with os.fdopen(read_end) as events:
                for line in events:
                    for say in run.on(json.loads(line)):
                        print(say, flush=True)
                    if tty:
                        print("\r" + run.status(), end="\x1b[K", flush=True)
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the child too: pytest stops its tests and exits
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            print("\r\x1b[Kinterrupted", flush=True)
            return 130
        if tty:
            print("\r\x1b[K", end="", flush=True)
        if run.collected and not run.by_id:
            print(f"python -m tests.check: no test of {stage}" + (f" matches -k {args.k!r}" if args.k else ""))
            return 2
        if not run.collected or code not in (0, 1):
            output.seek(0)
            tail = output.read().strip().splitlines()[-15:]
            print(f"python -m tests.check: pytest could not run the tests of {stage} (exit status {code}):")
            print("\n".join("    " + cut(line) for line in tail))
            return 2 if run.collected else 3
    print("\n".join(run.report(args.all)))
    return 0 if code == 0 and not run.collect_errors else 1


if __name__ == "__main__":
    sys.exit(main())
